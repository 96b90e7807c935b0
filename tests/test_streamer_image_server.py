"""Pictures over the websocket, end to end (real server, real engine on the tiny preset): a start before the
offer, a cut mid-stream, a restart from a picture, and bad pictures that each get one error while the stream
goes on."""

import asyncio
import base64
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from streamer.client import StreamClient
from streamer.config import ServerConfig
from streamer.server import BackgroundServer


@pytest.fixture(scope="module")
def server(tiny_generator):
    with BackgroundServer(ServerConfig(port=0, max_sessions=1), tiny_generator) as bg:
        yield bg


def png(w=80, h=40, seed=0, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(buf, "PNG", **kw)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])) \
        + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def poll(cond, timeout=30.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)


async def test_pictures_start_cut_restart_and_bad_ones_are_refused(server):
    async with StreamClient(server.server.ws_url) as c:
        ack = await c.request({"type": "image", "data": "data:image/png;base64," + b64(png())})
        assert ack["for"] == "image" and ack["start"] is True and ack["effective_chunk"] == 0
        assert (ack["width"], ack["height"]) == (80, 40) and ack["thumbnail"].startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(ack["thumbnail"].split(",", 1)[1])))
        assert thumb.size[0] == thumb.size[1]                        # the fitted (square, 64x64) picture
        session = next(iter(server.server.clients.values())).session
        await c.start_video()
        await c.wait_frames(3, timeout=60)
        assert session._gs.stats()["start_frames"] == 1 and session.start_image and session.prompt == ""

        await c.send(png(seed=1))                                    # a binary message: a cut to the picture
        acks = lambda: [m for m in c.messages if m.get("type") == "ack" and m.get("for") == "image"]   # noqa: E731
        await poll(lambda: len(acks()) == 2)
        ack = acks()[-1]
        assert ack["start"] is False and ack["effective_chunk"] >= 1

        bad = {
            "n1": (b64(b"this is not a picture"), "bad_image", "not an image"),
            "n2": (b64(png(64, 64)[:300]), "bad_image", "truncated"),
            "n3": (b64(png_header(20000, 20000)), "bad_image", "pixels"),
            "n4": (b64(png_header(0, 10)), "bad_image", "zero-sized"),
            "n5": (b64(png(400, 50)), "bad_image", "aspect ratio"),
        }
        frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
        buf = io.BytesIO()
        frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
        bad["n6"] = (b64(buf.getvalue()), "bad_image", "animated")
        limit = c.welcome["limits"]["max_image_bytes"]
        bad["n7"] = (b64(b"\x89PNG" + bytes(limit)), "too_large", "limit")
        for i, (mid, (data, _, _)) in enumerate(bad.items()):
            if i == 4:
                await asyncio.sleep(2.5)                             # stay under the prompt/picture rate
            await c.send({"type": "image", "data": data, "id": mid})
        await poll(lambda: {e["id"] for e in c.errors()} >= set(bad))
        for e in c.errors():
            code, words = bad[e["id"]][1:]
            assert e["code"] == code and words in e["message"] and not e["fatal"] and "\n" not in e["message"], e

        n = len(c.frames)                                            # the stream goes on
        await asyncio.sleep(2.0)
        assert len(c.frames) - n >= 16
        ack = await c.request({"type": "image", "data": b64(png(seed=2)), "text": "a blue square", "restart": True})
        assert ack["start"] is True and ack["effective_chunk"] == 0 and ack["restart"] is True
        await poll(lambda: session.chunk_index >= 1 and session.prompt == "a blue square", timeout=60)
        assert session._gs.stats()["start_frames"] == 1
        assert (await c.request({"type": "ping"}))["type"] == "pong"
