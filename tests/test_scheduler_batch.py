"""The device worker's batching on plain callables (no engine): due owners' jobs run as one call, round-robin under
a cap, a plain job runs alone, an item's error stays with its owner, a paused owner simply is not in the batch."""

import asyncio
import threading
import time

import pytest

from streamer.scheduler import DeviceWorker


class Recorder:
    """A batch function that records each call's items and answers per item (ValueError for item 'bad')."""

    def __init__(self, seconds=0.0):
        self.calls, self.seconds = [], seconds

    def __call__(self, items):
        self.calls.append(list(items))
        time.sleep(self.seconds)
        return [ValueError("bad item") if i == "bad" else f"done {i}" for i in items]


async def test_due_jobs_run_as_one_batch_and_errors_stay_with_their_owner():
    worker, rec, gate = DeviceWorker("test", linger=0), Recorder(), threading.Event()
    try:
        blocker = asyncio.ensure_future(worker.run("z", gate.wait))
        await asyncio.sleep(0.05)
        jobs = {o: asyncio.ensure_future(worker.run_batched(o, rec, o)) for o in ("a", "bad", "c")}
        plain = asyncio.ensure_future(worker.run("d", lambda: "plain"))
        await asyncio.sleep(0.02)
        gate.set()
        await blocker
        assert await jobs["a"] == "done a" and await jobs["c"] == "done c"
        with pytest.raises(ValueError, match="bad item"):
            await jobs["bad"]
        assert await plain == "plain"
        assert rec.calls == [["a", "bad", "c"]]        # one call; the plain job ran alone after it
        assert worker.last_batch_size == 3 and worker.batches_done == 1
    finally:
        worker.close()


async def test_capped_batches_take_turns_round_robin():
    """Five owners always due, at most two per batch: every owner is served once per 2.5 batches, in ring order."""
    sizes = []
    worker = DeviceWorker("test", max_batch=2, linger=0.05, on_batch=lambda n, s: sizes.append(n))
    rec, served = Recorder(), {o: 0 for o in "abcde"}

    async def session(owner, chunks):
        for _ in range(chunks):
            await worker.run_batched(owner, rec, owner)
            served[owner] += 1

    try:
        gate = threading.Event()
        blocker = asyncio.ensure_future(worker.run("z", gate.wait))
        await asyncio.sleep(0.05)
        tasks = [asyncio.ensure_future(session(o, 4)) for o in "abcde"]
        await asyncio.sleep(0.02)
        gate.set()
        await asyncio.gather(blocker, *tasks)
    finally:
        worker.close()
    assert all(len(c) <= 2 for c in rec.calls)
    assert sum(len(c) for c in rec.calls) == 20 and served == {o: 4 for o in "abcde"}
    flat = [o for c in rec.calls for o in c]
    for start in range(0, 20, 5):                      # each window of 5 consecutive turns serves every owner once
        assert sorted(flat[start:start + 5]) == list("abcde"), flat
    assert sizes == [len(c) for c in rec.calls]


async def test_owner_that_stops_submitting_leaves_the_batch_and_a_new_one_joins():
    worker, rec = DeviceWorker("test", linger=0.05), Recorder(seconds=0.01)
    stop_b = asyncio.Event()

    async def session(owner, chunks, stop=None):
        for _ in range(chunks):
            if stop is not None and stop.is_set():
                return
            await worker.run_batched(owner, rec, owner)

    try:
        a = asyncio.ensure_future(session("a", 30))
        b = asyncio.ensure_future(session("b", 30, stop_b))
        while len(rec.calls) < 2:
            await asyncio.sleep(0.01)
        stop_b.set()                                   # b pauses: it submits nothing more
        stopped_at = len(rec.calls)
        c = asyncio.ensure_future(session("c", 2))     # c joins
        await asyncio.gather(a, b, c)
    finally:
        worker.close()
    assert ["a", "b"] in rec.calls
    later = rec.calls[stopped_at:]
    assert sum("b" in c for c in later) <= 1, rec.calls          # at most the job it had already queued
    assert any(set(c) == {"a", "c"} for c in later), rec.calls
