"""A real browser: headless Debian chromium (driven by playwright) opens the viewer, decodes the stream, steers it.

Browser downloads fail on these machines, so playwright launches the system chromium via `executable_path`.
"""

import os
import shutil
import time

import pytest

from streamer.config import ServerConfig
from streamer.server import BackgroundServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]
SCREENSHOT = os.environ.get("VIEWER_SCREENSHOT", "/tmp/packforcing-viewer.png")

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian chromium")]

FRAMES_DECODED = """async () => {
  const pc = window.viewer && window.viewer.pc;
  if (!pc) return 0;
  let n = 0;
  (await pc.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "video") n = r.framesDecoded || 0;
  });
  return n;
}"""


def test_viewer_decodes_video_and_acknowledges_a_typed_prompt(tiny_generator):
    sync_api = pytest.importorskip("playwright.sync_api")
    config = ServerConfig(port=0, record_dir=None, reconnect_grace=10.0)
    with BackgroundServer(config, tiny_generator) as bg, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            page.goto(bg.server.url)
            page.wait_for_function("document.getElementById('status').textContent.startsWith('live')",
                                   timeout=60_000)
            page.wait_for_function(f"({FRAMES_DECODED})().then((n) => n >= 16)", timeout=60_000, polling=250)
            first = page.evaluate(FRAMES_DECODED)
            time.sleep(2.0)
            second = page.evaluate(FRAMES_DECODED)
            assert second - first >= 24                                   # ~16 FPS decoded in the page

            page.fill("#prompt", "a green square sliding left")
            page.press("#prompt", "Enter")
            page.wait_for_function(
                "document.getElementById('ack').textContent.includes('takes effect at chunk')", timeout=30_000)
            assert bg.server.clients and next(iter(bg.server.clients.values())).session.requested_prompt == \
                "a green square sliding left"
            page.wait_for_function("document.getElementById('s-cache').textContent !== '–'", timeout=10_000)
            page.screenshot(path=SCREENSHOT)
            assert page.text_content("#message") == ""                   # no error shown

            # a reload resumes the same stream (sessionStorage + --reconnect-grace): same session, video again
            session = page.evaluate("window.viewer.welcome.session")
            page.reload()
            page.wait_for_function("window.viewer.welcome && window.viewer.welcome.resumed", timeout=30_000)
            assert page.evaluate("window.viewer.welcome.session") == session
            page.wait_for_function(f"({FRAMES_DECODED})().then((n) => n >= 8)", timeout=60_000, polling=250)
            page.click("#connect")                                        # Disconnect: the session ends now
            wait = time.monotonic() + 5
            while bg.server.live_sessions() and time.monotonic() < wait:
                time.sleep(0.05)
            assert bg.server.live_sessions() == 0
        finally:
            browser.close()
