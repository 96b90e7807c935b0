"""Decode off the critical path in the server and the CLI: a StreamSession with `pipeline=True` gets the same frames
as with it off and as the engine's serial path (two sessions batched, a prompt switch in the middle); a snapshot
taken while a chunk is still finishing holds that chunk; `python -m packcache.generate` writes the same video with
`--pipeline` and `--no-pipeline`; /healthz and /metrics say whether it is on."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import av
import numpy as np
import pytest

from packcache import batch as B
from packcache import snapshot_info
from streamer.config import ServerConfig
from streamer.scheduler import DeviceWorker
from streamer.server import BackgroundServer
from streamer.session import StreamSession

CHUNKS = 5
STREAMS = {"a": ("a red circle", 3), "b": ("a yellow triangle", 4)}
SWITCH = ("a blue square", "recache")


def one_thread() -> None:
    import torch
    torch.set_num_threads(1)


def serial(gen, name: str, chunks: int, switch_at: int | None = None) -> list[np.ndarray]:
    prompt, seed = STREAMS[name]
    with gen.open(prompt, seed=seed) as s:
        out = []
        for i in range(chunks):
            if i == switch_at:
                s.set_prompt(SWITCH[0], transition=SWITCH[1])
            out.append(s.next_chunk())
    return out


async def drain(session: StreamSession, chunks: dict[int, list]) -> None:
    """Play every buffered frame at once (no pacing), grouped by the chunk it belongs to."""
    while session.buffer_frames():
        frame, fresh = session.pop_frame()
        assert fresh
        chunks.setdefault(session.playing_chunk, []).append(frame)


async def stream(gen, pipeline: bool) -> tuple[dict[str, list[np.ndarray]], int]:
    """Two sessions on one device worker (batched), session a switching prompt after its second chunk."""
    worker = DeviceWorker("cpu", init=one_thread)
    sessions = {n: StreamSession(n, gen, worker, prompt=p, seed=s, pipeline=pipeline) for n, (p, s) in
                STREAMS.items()}
    got: dict[str, dict[int, list]] = {n: {} for n in sessions}
    effective = None
    try:
        for s in sessions.values():
            await s.open()
            s.start()
        end = time.monotonic() + 300
        while any(len(got[n]) < CHUNKS + 1 for n in sessions):   # chunk CHUNKS started: chunk CHUNKS - 1 complete
            assert time.monotonic() < end, "timed out"
            for n, s in sessions.items():
                assert s.error is None, s.error
                await drain(s, got[n])
            if effective is None and sessions["a"].chunk_index >= 2:
                effective = sessions["a"].set_prompt(*SWITCH)
            await asyncio.sleep(0.01)
    finally:
        for s in sessions.values():
            await s.close()
        await asyncio.to_thread(worker.close)
    frames = {n: [np.stack(got[n][k]) for k in range(CHUNKS)] for n in sessions}
    return frames, effective


@pytest.mark.parametrize("pipeline", [True, False])
async def test_stream_session_frames_equal_the_serial_engine_with_pipeline_on_and_off(tiny_generator, pipeline):
    gen = tiny_generator
    frames, effective = await stream(gen, pipeline)
    assert 2 <= effective < CHUNKS
    want = {"a": serial(gen, "a", CHUNKS, switch_at=effective), "b": serial(gen, "b", CHUNKS)}
    for name in STREAMS:
        for k in range(CHUNKS):
            assert np.array_equal(frames[name][k], want[name][k]), f"{name} chunk {k} (pipeline {pipeline})"


async def test_a_snapshot_waits_for_the_chunk_still_finishing_and_close_frees_one(tiny_generator, monkeypatch,
                                                                                 tmp_path):
    gen = tiny_generator
    finishing = threading.Event()

    def slow_finish(*args):
        finishing.set()
        time.sleep(0.5)                  # long enough for the snapshot to be asked for meanwhile
        return B.finish_rows.__wrapped__(*args)

    slow_finish.__wrapped__ = B.finish_rows
    monkeypatch.setattr(B, "finish_rows", slow_finish)
    worker = DeviceWorker("cpu", init=one_thread)
    try:
        s = StreamSession("snap", gen, worker, prompt=STREAMS["a"][0], seed=STREAMS["a"][1], chunks_ahead=2)
        await s.open()
        s.start()
        end = time.monotonic() + 120
        while not s._inflight:           # a chunk committed, its frames still on the side worker
            assert time.monotonic() < end
            await asyncio.sleep(0.005)
        path = tmp_path / "s.snapshot.safetensors"
        info = await s.snapshot(str(path))
        saved = snapshot_info(path).extra["stream"]["buffer"]
        assert [c["index"] for c in saved] == list(range(info.chunk_index)), "a committed chunk is missing"
        assert sum(c["frames"] for c in saved) == 9 + 12 * (info.chunk_index - 1)
        await s.close()

        t = StreamSession("close", gen, worker, prompt="a cat", seed=1)
        await t.open()
        t.start()
        finishing.clear()
        await asyncio.to_thread(finishing.wait, 120)
        gs = t._gs
        await t.close()                  # mid-finish: the engine waits for it, then frees
        assert gs._closed and gs.cache.sink_k is None and gs._finishing is None
    finally:
        await asyncio.to_thread(worker.close)


def test_healthz_and_metrics_say_whether_the_pipeline_is_on(tiny_generator):
    with BackgroundServer(ServerConfig(port=0, pipeline=False), tiny_generator) as bg:
        with urllib.request.urlopen(bg.server.url + "healthz", timeout=10) as r:
            assert json.loads(r.read())["pipeline"] is False
        with urllib.request.urlopen(bg.server.url + "metrics", timeout=10) as r:
            assert "\nstreamer_pipeline 0\n" in r.read().decode()


def read_frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_generate_cli_writes_the_same_video_with_the_pipeline_on_and_off(tmp_path, monkeypatch):
    """The frames the CLI hands its encoder are identical with the pipeline on and off (the pipeline reorders work,
    never results). Compared before encoding: libx264's bytes for identical frames can differ within a process that
    ran torch (packcache.generate.Mp4Writer), which made a comparison of the decoded files flaky."""
    import packcache.generate as generate

    written: dict[str, list[np.ndarray]] = {}

    class RecordingWriter(generate.Mp4Writer):
        def write(self, frame):
            written.setdefault(self.key, []).append(np.array(frame))
            super().write(frame)

    monkeypatch.setattr(generate, "Mp4Writer", RecordingWriter)
    for flag in ("--pipeline", "--no-pipeline"):
        out = tmp_path / f"{flag.strip('-')}.mp4"
        RecordingWriter.key = flag
        assert generate.main(["--preset", "tiny", "--seconds", "3", "--prompt", "a red circle", "--threads", "1",
                              "--switch", "1.2:a blue square:recache", flag, "--out", str(out)]) == 0
        assert read_frames(out).shape == (48, 64, 64, 3)        # a playable file with every frame
    on, off = np.stack(written["--pipeline"]), np.stack(written["--no-pipeline"])
    assert on.shape == (48, 64, 64, 3) and on.std() > 0
    assert np.array_equal(on, off)


async def test_metrics_time_the_finishes_the_side_worker_runs(tiny_generator):
    """With the pipeline on, a chunk's decode runs on the engine's side worker, outside streamer_batch_seconds:
    streamer_finish_seconds times each of the session's finishes (not the warm-up's)."""
    from streamer.client import StreamClient

    def metric(text: str, name: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    def scrape(url: str) -> str:
        with urllib.request.urlopen(url + "metrics", timeout=10) as r:
            return r.read().decode()

    with BackgroundServer(ServerConfig(port=0, pipeline=True), tiny_generator) as bg:
        before = await asyncio.to_thread(scrape, bg.server.url)
        assert metric(before, "streamer_finish_seconds_count") == 0
        async with StreamClient(bg.server.ws_url) as c:
            await c.start_video()
            await c.wait_frames(30, timeout=60)                  # chunk 0 (9 frames) and later ones landed
        text = await asyncio.to_thread(scrape, bg.server.url)
        assert metric(text, "streamer_finish_seconds_count") >= 2
        assert metric(text, "streamer_finish_seconds_sum") > 0
        assert 'streamer_finish_seconds_bucket{le="+Inf"}' in text
