"""Decode off the critical path: `submit_chunk` hands each chunk's finish (decode, compressed K/V backup) to the
side worker, the next chunk's denoising overlaps it, and the frames are identical to the serial path."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from packcache.errors import PackCacheError

CHUNKS = 4   # tiny packed cache: sink 1, recent 1 -> chunk 2's commit moves chunk 1 into the mid bank, and so on


def serial(gen, n, prompt_at=None):
    with gen.open("a red circle", seed=3) as s:
        out = []
        for i in range(n):
            if i == prompt_at:
                s.set_prompt("a blue square", transition="recache")
            out.append(s.next_chunk())
        return out


def test_pipelined_frames_equal_the_serial_path_and_finish_precedes_the_next_commit(tiny_generator):
    gen = tiny_generator
    ref = serial(gen, CHUNKS)
    events: list[tuple[str, int, str, float]] = []
    lock = threading.Lock()

    with gen.open("a red circle", seed=3) as s:
        def traced(name, fn, slow=0.0):
            def wrapper(*args, **kwargs):
                index = s.chunk_index
                with lock:
                    events.append((name + ":start", index, threading.current_thread().name, time.perf_counter()))
                out = fn(*args, **kwargs)
                time.sleep(slow)          # a slow finish: the next chunk's denoising must start meanwhile
                with lock:
                    events.append((name + ":end", index, threading.current_thread().name, time.perf_counter()))
                return out
            return wrapper

        s._denoise = traced("denoise", s._denoise)
        s._commit = traced("commit", s._commit)
        s._finish = traced("finish", s._finish, slow=0.5)
        futures = [s.submit_chunk() for _ in range(CHUNKS)]
        frames = [f.result() for f in futures]
        assert s.stats()["frames"] == 9 + 12 * (CHUNKS - 1)

    for a, b in zip(ref, frames):
        assert a.shape == b.shape and np.array_equal(a, b)
    at = {(name, i): (thread, t) for name, i, thread, t in events}
    caller = at[("denoise:start", 0)][0]
    for k in range(CHUNKS - 1):
        # chunk k's finish indexes as k + 1 (the index advanced at its commit); it runs on the side worker
        finish_end_thread, finish_end = at[("finish:end", k + 1)]
        assert finish_end_thread != caller
        assert finish_end < at[("commit:start", k + 1)][1], f"chunk {k}'s finish ended after chunk {k + 1}'s commit"
        assert at[("denoise:start", k + 1)][1] < finish_end, f"chunk {k + 1} did not denoise during chunk {k}'s finish"


def test_a_recache_prompt_switch_mid_pipeline_matches_serial(tiny_generator):
    gen = tiny_generator
    ref = serial(gen, 3, prompt_at=2)
    with gen.open("a red circle", seed=3) as s:
        futures = []
        for i in range(3):
            if i == 2:
                s.set_prompt("a blue square", transition="recache")   # waits for chunk 1's finish first
            futures.append(s.submit_chunk())
        frames = [f.result() for f in futures]
    assert all(np.array_equal(a, b) for a, b in zip(ref, frames))


def test_a_failed_finish_is_reported_and_close_waits_for_an_inflight_one(tiny_generator):
    gen = tiny_generator
    s = gen.open("a red circle", seed=3)
    real = s._finish

    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    s._finish = broken
    future = s.submit_chunk()
    with pytest.raises(RuntimeError, match="decoder exploded"):
        future.result()
    s._finish = real
    for _ in range(2):                                  # the stream stays refused until a reset
        with pytest.raises(PackCacheError, match="failed to finish"):
            s.submit_chunk()
    s.reset()                                           # a reset drops the broken stream and goes on
    assert s.submit_chunk().result().shape == (9, 64, 64, 3)
    future = s.submit_chunk()
    s.close()                                           # waits for the finish in flight, then frees
    assert future.done() and future.result().shape == (12, 64, 64, 3)
    assert s.cache.sink_k is None
