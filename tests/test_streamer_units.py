"""The pacing track and the device worker on their own (plain frames and plain callables, no engine)."""

import asyncio
import threading
import time

import numpy as np
import pytest

from streamer.scheduler import DeviceWorker
from streamer.track import PacedVideoTrack


class Frames:
    """A frame source with a fixed list of frames; afterwards it underruns (returns the last one again)."""

    def __init__(self, n):
        self.frames = [np.full((16, 16, 3), i, np.uint8) for i in range(n)]
        self.paused = False
        self.changed = asyncio.Event()
        self.last = None

    async def wait_playable(self):
        waited = False
        while self.paused:
            waited = True
            self.changed.clear()
            await self.changed.wait()
        return waited

    def pop_frame(self):
        if self.frames:
            self.last = self.frames.pop(0)
            return self.last, True
        return self.last, False


async def test_track_paces_16fps_on_the_90khz_clock_and_repeats_on_underrun():
    src = Frames(8)
    track = PacedVideoTrack(src, fps=16)
    start = time.monotonic()
    frames = [await track.recv() for _ in range(20)]
    elapsed = time.monotonic() - start
    assert [f.pts for f in frames] == [i * 5625 for i in range(20)]
    assert all(f.time_base.denominator == 90000 for f in frames)
    assert abs(elapsed - 19 / 16) < 0.1                                  # real time, no burst
    values = [int(f.to_ndarray(format="rgb24")[8, 8, 0]) for f in frames]
    assert values[:8] == list(range(8)) and track.repeated == 12        # underrun: last frame held, counted
    assert track.skipped == 0


async def test_track_pause_skips_slots_but_keeps_timestamps_on_the_grid():
    src = Frames(40)
    track = PacedVideoTrack(src, fps=16)
    for _ in range(4):
        await track.recv()
    src.paused = True
    pending = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0.5)
    assert not pending.done()                                            # paused: nothing is produced
    src.paused = False
    src.changed.set()
    frame = await pending
    assert frame.pts % 5625 == 0 and frame.pts >= (3 + 8) * 5625          # ~0.5 s of slots skipped
    assert track.skipped == 0 and track.repeated == 0


async def test_worker_takes_turns_across_sessions_and_urgent_jobs_go_first():
    worker = DeviceWorker("test")
    order, gate = [], threading.Event()
    try:
        blocker = asyncio.ensure_future(worker.run("z", gate.wait))
        await asyncio.sleep(0.05)
        jobs = [asyncio.ensure_future(worker.run(o, lambda o=o: order.append(o)))
                for o in "aaaaaabbcc"]
        await asyncio.sleep(0.01)
        urgent = asyncio.ensure_future(worker.run("b", lambda: order.append("U"), urgent=True))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(blocker, urgent, *jobs)
        assert "".join(order) == "Uabcabcaaaa"
    finally:
        worker.close()


async def test_cancelled_job_never_runs_and_running_result_is_dropped():
    worker = DeviceWorker("test")
    ran, gate = [], threading.Event()
    try:
        running = asyncio.ensure_future(worker.run("a", lambda: (gate.wait(), ran.append("a"))))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(worker.run("b", lambda: ran.append("b")))
        await asyncio.sleep(0.01)
        assert worker.queued("b") == 1
        queued.cancel()                                  # a disconnect aborts queued work
        running.cancel()                                 # the running one finishes; its result is dropped
        await asyncio.sleep(0.01)
        assert worker.queued() == 0
        gate.set()
        await asyncio.sleep(0.1)
        assert ran == ["a"]
        with pytest.raises(asyncio.CancelledError):
            await queued
    finally:
        worker.close()
