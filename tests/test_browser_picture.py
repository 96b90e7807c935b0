"""A real browser picks a picture before connecting: the stream starts from it and the page shows its thumbnail;
a broken picture gets one readable error and the stream goes on (headless Debian chromium, as
tests/test_browser_viewer.py)."""

import io
import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from streamer.config import ServerConfig
from streamer.server import BackgroundServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]
FRAMES_DECODED = """async () => {
  const pc = window.viewer && window.viewer.pc;
  if (!pc) return 0;
  let n = 0;
  (await pc.getStats()).forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "video") n = r.framesDecoded || 0; });
  return n;
}"""

SCREENSHOT = os.environ.get("PICTURE_SCREENSHOT", "/tmp/packforcing-picture.png")
pytestmark = [pytest.mark.browser, pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian chromium")]


def picture_png() -> bytes:
    a = np.full((120, 200, 3), 40, np.uint8)
    a[30:90, 70:130] = (230, 40, 40)                  # a red square on dark grey
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def test_viewer_starts_from_a_picked_picture_and_shows_its_thumbnail(tiny_generator):
    sync_api = pytest.importorskip("playwright.sync_api")
    with BackgroundServer(ServerConfig(port=0, record_dir=None), tiny_generator) as bg, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(bg.server.url + "?autoconnect=0")
            page.set_input_files("#picture-file", {"name": "red.png", "mimeType": "image/png",
                                                   "buffer": picture_png()})
            assert "will start from red.png" in page.text_content("#message")
            page.click("#connect")
            page.wait_for_selector("#picture-thumb:not([hidden])", timeout=60_000)
            assert "the stream starts from red.png" in page.text_content("#picture-caption")
            assert page.get_attribute("#picture-img", "src").startswith("data:image/jpeg;base64,")
            page.wait_for_function(f"({FRAMES_DECODED})().then((n) => n >= 8)", timeout=90_000, polling=250)
            session = next(iter(bg.server.clients.values())).session
            end = time.monotonic() + 90                   # decoded frames may be the track's placeholder
            while session.chunk_index < 1 and time.monotonic() < end:
                time.sleep(0.1)
            gs = session._gs
            assert session.start_image and gs.stats()["start_frames"] == 1, page.text_content("#log")
            assert gs.cache.chunks_seen - gs.chunk_index in (1, 2)   # the picture's chunk (+ one being made)

            page.set_input_files("#picture-file", {"name": "broken.png", "mimeType": "image/png",
                                                   "buffer": b"\x89PNG not really"})
            page.wait_for_function("document.getElementById('message').textContent.includes('Picture refused')",
                                   timeout=90_000)
            before = page.evaluate(FRAMES_DECODED)
            page.wait_for_function(f"({FRAMES_DECODED})().then((n) => n >= {before + 8})", timeout=60_000,
                                   polling=250)
            page.screenshot(path=SCREENSHOT)
        finally:
            browser.close()
