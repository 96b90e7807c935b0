"""What `python run_server.py` does by default: stream the shipped toy model over real WebRTC, following typed prompts.

The frames are the ones a viewer sees: generated, VP8-encoded by aiortc, sent over loopback and decoded by the
client, then read by the same colour metric as the evaluation.
"""

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from streamer.client import StreamClient
from streamer.config import DEFAULT_PROMPT, ServerConfig
from streamer.server import BackgroundServer
from toyworld import metrics as M

WEIGHTS = Path(__file__).resolve().parent.parent / "packcache" / "weights" / "toy.safetensors"
pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason="toy weights not built (python -m toyworld.train)")


@pytest.fixture(scope="module")
def toy_generator():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from packcache import Generator
    gen = Generator.from_preset("toy", device="cpu")
    gen.warmup()
    return gen


async def on_screen(client: StreamClient, frames: int = 24) -> np.ndarray:
    """The next `frames` distinct decoded frames, as RGB arrays."""
    seen, out = None, []
    while len(out) < frames:
        f = client.last_frame
        if f is not None and f is not seen:
            seen = f
            out.append(f.to_ndarray(format="rgb24"))
        await asyncio.sleep(0.02)
    return np.stack(out)


async def test_default_server_streams_the_toy_world_and_follows_a_typed_prompt(toy_generator):
    """The default session's prompt is red; a viewer types a green one, then a red one again."""
    assert M.prompt_color(DEFAULT_PROMPT) == "red"
    with BackgroundServer(ServerConfig(port=0), toy_generator) as bg:
        async with StreamClient(bg.server.ws_url) as c:
            assert c.welcome["preset"] == "toy" and c.welcome["prompt"] == DEFAULT_PROMPT
            await c.start_video()
            await c.wait_frames(1, timeout=60)
            first = await on_screen(c)
            assert first.shape[1:] == (64, 64, 3)
            assert M.dominant_color(first) == "red"
            for text, colour in (("a green square bouncing on a plain gray background", "green"),
                                 ("a red square bouncing on a plain gray background", "red")):
                ack = await c.request({"type": "prompt", "text": text, "transition": "recache"})
                await c.wait_for(lambda m: m["type"] == "stats" and (m["playing_chunk"] or -1) > ack["effective_chunk"],
                                 timeout=60, past=False)
                assert M.dominant_color(await on_screen(c)) == colour
            assert c.errors() == []
