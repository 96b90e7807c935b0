"""A batched step pipelined (`Generator.submit_chunks`): the batch's denoise and commit on the caller, the finish
of all its rows (`packcache.batch.finish_rows`) on the side worker. Frames equal the synchronous batched path;
each session's finish ends before its next commit, and the next batch denoises while the previous one finishes;
errors stay with their session."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from packcache import PackCacheError
from packcache import batch as B

CHUNKS = 5   # tiny packed cache (sink 1, recent 1): from chunk 2 on each commit moves a chunk into the mid bank


def control(sessions, step):
    """The scripted controls before `step`: a recache switch in session 0, a reset with a new seed in session 1."""
    if step == 2:
        sessions[0].set_prompt("a blue square", transition="recache")
    if step == 3:
        sessions[1].reset(9)


def run(gen, pipelined: bool) -> list[list[np.ndarray]]:
    sessions = [gen.open("a red circle", seed=3), gen.open("a yellow triangle", seed=4)]
    out: list[list[np.ndarray]] = [[], []]
    try:
        pending = None
        for step in range(CHUNKS):
            control(sessions, step)
            if not pipelined:
                results = gen.next_chunks(sessions)
            else:
                futures = gen.submit_chunks(sessions)   # the previous batch may still be finishing
                results = None if pending is None else [f.result() for f in pending]
                pending = futures
            for i, r in enumerate(results or []):
                assert not isinstance(r, BaseException), r
                out[i].append(r)
        if pipelined:
            for i, f in enumerate(pending):
                out[i].append(f.result())
    finally:
        for s in sessions:
            s.close()
    return out


def test_pipelined_batches_equal_the_synchronous_path_through_a_recache_and_a_reset(tiny_generator):
    ref = run(tiny_generator, pipelined=False)
    got = run(tiny_generator, pipelined=True)
    for want, have in zip(ref, got):
        assert len(want) == len(have) == CHUNKS
        for k, (a, b) in enumerate(zip(want, have)):
            assert a.dtype == np.uint8 and np.array_equal(a, b), f"chunk {k} differs"
    assert ref[1][3].shape[0] == 9       # the reset's chunk is a first chunk again (9 frames), in both paths


def test_each_finish_ends_before_the_next_commit_and_overlaps_the_next_denoise(tiny_generator, monkeypatch):
    gen = tiny_generator
    events: list[tuple[str, int, float]] = []
    lock = threading.Lock()
    step = [0]

    def traced(name, fn, slow=0.0):
        def wrapper(gen_, rows, *args):
            index = step[0] if name != "finish" else rows[0].session.chunk_index - 1
            with lock:
                events.append((name + ":start", index, time.perf_counter()))
            out = fn(gen_, rows, *args)
            time.sleep(slow)              # a slow finish: the next batch's denoising must start meanwhile
            with lock:
                events.append((name + ":end", index, time.perf_counter()))
            return out
        return wrapper

    monkeypatch.setattr(B, "_denoise", traced("denoise", B._denoise))
    monkeypatch.setattr(B, "_commit", traced("commit", B._commit))
    monkeypatch.setattr(B, "finish_rows", traced("finish", B.finish_rows, slow=0.4))
    sessions = [gen.open("a red circle", seed=3), gen.open("a blue square", seed=5)]
    try:
        futures = []
        for k in range(3):
            step[0] = k
            futures.append(gen.submit_chunks(sessions))
        results = [[f.result() for f in fs] for fs in futures]
    finally:
        for s in sessions:
            s.close()
    assert all(not isinstance(r, BaseException) for rs in results for r in rs)
    at = {(name, i): t for name, i, t in events}
    for k in range(2):
        assert at[("finish:end", k)] < at[("commit:start", k + 1)], f"batch {k}'s finish ended after the next commit"
        assert at[("denoise:start", k + 1)] < at[("finish:end", k)], f"batch {k + 1} did not denoise meanwhile"


def break_decoder(session) -> None:
    """Make this session's decode raise, alone and in a batch (it no longer batches with the others)."""
    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    session.decoder.decode = broken
    session.decoder.batch_key = lambda latents: None


def mend_decoder(session) -> None:
    del session.decoder.decode, session.decoder.batch_key


def test_a_finish_error_stays_with_its_session_until_a_reset(tiny_generator):
    gen = tiny_generator
    good, bad, closed = gen.open("a red circle", seed=3), gen.open("a blue square", seed=5), gen.open("a cat")
    closed.close()
    try:
        with gen.open("a red circle", seed=3) as alone:
            ref = [alone.next_chunk() for _ in range(3)]

        break_decoder(bad)
        f_good, f_bad, f_closed = gen.submit_chunks([good, bad, closed])
        assert f_closed.done() and isinstance(f_closed.exception(), PackCacheError)
        with pytest.raises(RuntimeError, match="decoder exploded"):
            f_bad.result()
        mend_decoder(bad)
        got = [f_good.result()]
        res = gen.next_chunks([good, bad])        # the broken stream is refused, the other goes on
        assert isinstance(res[1], PackCacheError) and "failed to finish" in str(res[1])
        got.append(res[0])
        bad.reset()
        f_good, f_bad = gen.submit_chunks([good, bad])
        got.append(f_good.result())
        assert f_bad.result().shape[0] == 9        # a reset stream starts over with a first chunk
        assert all(np.array_equal(a, b) for a, b in zip(ref, got))
    finally:
        good.close()
        bad.close()


def test_the_synchronous_batch_refuses_a_session_whose_finish_failed(tiny_generator):
    gen = tiny_generator
    with gen.open("a red circle", seed=3) as s:
        break_decoder(s)
        assert isinstance(gen.next_chunks([s])[0], RuntimeError)
        mend_decoder(s)
        assert isinstance(gen.next_chunks([s])[0], PackCacheError)
        s.reset()
        assert gen.next_chunks([s])[0].shape[0] == 9


def test_threads_are_split_between_the_denoiser_and_the_side_worker_only_when_pipelined():
    from packcache.pipeline import FinishWorker
    from packcache.threads import default_threads, pipeline_threads

    assert pipeline_threads(1, True) == (1, 1)       # at least one each
    assert pipeline_threads(2, True) == (1, 1)
    assert pipeline_threads(5, True) == (3, 2)
    assert pipeline_threads(5, False) == (5, 5)      # serial: the side worker runs while the caller waits
    assert pipeline_threads(0, True) == (0, 0)       # torch's own default
    assert pipeline_threads(None, False) == (default_threads(),) * 2
    worker = FinishWorker("cpu", threads=2)
    try:
        import torch
        assert worker.submit(torch.get_num_threads).result() == 2
        worker.set_threads(1)
        assert worker.submit(torch.get_num_threads).result() == 1
    finally:
        worker.close()
