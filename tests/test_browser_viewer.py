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


def decoded_over(page, seconds, want, timeout=60.0):
    """Frames decoded in the page over at least `seconds` of the test's own time, and on until `want` frames (a
    loaded machine may stall for seconds). Sampled every 0.25 s and summed step by step, so a counter that
    restarts (a new peer connection) does not read as a negative or a zero."""
    total, prev = 0, page.evaluate(FRAMES_DECODED)
    t0 = time.monotonic()
    while (time.monotonic() - t0 < seconds or total < want) and time.monotonic() - t0 < timeout:
        time.sleep(0.25)
        n = page.evaluate(FRAMES_DECODED)
        total += n - prev if n >= prev else n
        prev = n
    return total, time.monotonic() - t0


def test_viewer_decodes_video_and_acknowledges_a_typed_prompt(tiny_generator):
    sync_api = pytest.importorskip("playwright.sync_api")
    # the grace covers the page reload below: 10 s once ran out while the full suite and two busy loops shared
    # the 2 cores (the reload came back as a new session); Disconnect still ends the session at once
    config = ServerConfig(port=0, record_dir=None, reconnect_grace=120.0)
    with BackgroundServer(config, tiny_generator) as bg, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            page.goto(bg.server.url)
            page.wait_for_function("document.getElementById('status').textContent.startsWith('live')",
                                   timeout=60_000)
            page.wait_for_function(f"({FRAMES_DECODED})().then((n) => n >= 16)", timeout=60_000, polling=250)
            # A fixed "24 frames in 2 s" once failed with 12 while five other jobs shared the 2 cores.
            # The page decodes what the server sends: compared with the server's own count over the same window,
            # since on a loaded machine both may run below 16 FPS (the server's pacing is test_streamer_server's)
            sent0 = bg.server.metrics.frames_sent.value()
            decoded, seconds = decoded_over(page, 3.0, want=24)
            sent = bg.server.metrics.frames_sent.value() - sent0
            assert decoded >= 24 and decoded >= 0.6 * sent, (decoded, sent, seconds)

            # the stats sit under the video, not on it
            video, stats = page.locator("#video").bounding_box(), page.locator("#overlay").bounding_box()
            assert stats["y"] >= video["y"] + video["height"] - 1, (video, stats)
            # an empty prompt says so instead of doing nothing
            page.fill("#prompt", "   ")
            page.press("#prompt", "Enter")
            assert "empty prompt" in page.text_content("#message")

            page.fill("#prompt", "a green square sliding left")
            page.press("#prompt", "Enter")
            page.wait_for_function(
                "document.getElementById('ack').textContent.includes('takes effect at chunk')", timeout=60_000)
            assert bg.server.clients and next(iter(bg.server.clients.values())).session.requested_prompt == \
                "a green square sliding left"
            page.wait_for_function("document.getElementById('s-cache').textContent !== '–'", timeout=90_000)
            assert page.text_content("#message") == ""                   # no error shown (the hint is gone)
            # the prompt box shows what is playing once the new prompt is on screen
            page.wait_for_function("document.getElementById('prompt').placeholder === "
                                   "'now playing: a green square sliding left'", timeout=60_000)
            # the session log's item numbers are not clipped (inside the list's box)
            assert page.evaluate("getComputedStyle(document.getElementById('log')).listStylePosition") == "inside"
            page.evaluate("document.querySelector('details').open = true")
            page.screenshot(path=SCREENSHOT)

            # a reload resumes the same stream (sessionStorage + --reconnect-grace): same session, video again
            session = page.evaluate("window.viewer.welcome.session")
            page.reload()
            page.wait_for_function("window.viewer.welcome && window.viewer.welcome.resumed", timeout=90_000)
            assert page.evaluate("window.viewer.welcome.session") == session
            page.wait_for_function(f"({FRAMES_DECODED})().then((n) => n >= 8)", timeout=60_000, polling=250)
            page.click("#connect")                                        # Disconnect: the session ends now
            wait = time.monotonic() + 5
            while bg.server.live_sessions() and time.monotonic() < wait:
                time.sleep(0.05)
            assert bg.server.live_sessions() == 0
        finally:
            browser.close()
