"""Device work off the event loop: one worker thread per device, sessions take turns job by job, and the
sessions whose next chunk is due advance together in one batched step.

Every call into the engine that touches the device (open, next_chunk, reset, close) is a job run on the
device's worker thread, so the event loop never blocks and the engine never sees two calls at once.

Fairness: jobs are queued per owner (a session); the worker takes one job from the owner at the head of a
round-robin ring, then moves that owner to the back. A session asking for chunk after chunk therefore gets
every n-th turn when n sessions are busy, whatever order they submitted in. Urgent jobs (open, close, warm-up)
go before chunk jobs: they are short and a user is waiting on them.

Batching: `run_batched(owner, batch_fn, item)` queues a job that may run together with other owners' jobs of the
same `batch_fn`: the worker takes, in ring order, every owner whose next job is such a job (at most `max_batch`),
calls `batch_fn([items])` once, and hands each owner its own result (an exception instance in the returned list is
that owner's error alone). A paused session has no job queued, so it simply is not in the next batch; a new one
joins the next batch it is due for. With the cap, the owners taken go to the back of the ring, so the next batch
starts with those left out (round-robin). Because owners resubmit a moment after their result arrives, the worker
waits up to `linger` seconds for the owners of the previous batch before starting a smaller one.

Pipelining: the worker's busy time is only what it runs. With the decode pipeline (streamer/session.py) a chunk
job is the batch's denoise and commit, returning one future per session for the finish the engine runs on its own
side worker; the worker is then free for the next batch at once.

Cancellation: cancelling the awaiting coroutine (a disconnect) removes its job if it has not started; a job
already running finishes (the engine cannot be interrupted mid-chunk) and its result is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Hashable

log = logging.getLogger(__name__)


class WorkerClosed(RuntimeError):
    pass


class _Job:
    __slots__ = ("owner", "fn", "future", "loop", "submitted", "started", "cancelled", "batch_fn", "item")

    def __init__(self, owner, fn, future, loop, batch_fn=None, item=None):
        self.owner, self.fn, self.future, self.loop = owner, fn, future, loop
        self.batch_fn, self.item = batch_fn, item
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.cancelled = False


class DeviceWorker:
    """Runs jobs on one thread, fairly across owners. `await worker.run(owner, fn)` returns fn()'s result."""

    def __init__(self, device: str = "cpu", init: Callable[[], None] | None = None, *, max_batch: int | None = None,
                 linger: float = 0.02, on_batch: Callable[[int, float], None] | None = None):
        """`init` runs first on the worker thread (per-thread settings such as torch's CPU thread count).
        `max_batch` caps the jobs of one batched call (None: no cap); `on_batch(size, seconds)` is called on the
        worker thread after each batched call (metrics)."""
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.device = device
        self._init = init
        self.max_batch = max_batch
        self.linger = linger
        self._on_batch = on_batch
        self._returning: set[int] = set()   # id() of the last batch's owners (expected back at once); ids, so
                                            # the worker keeps no session alive
        self.last_batch_size = 0
        self.batches_done = 0
        self._cv = threading.Condition()
        self._urgent: deque[_Job] = deque()
        self._ring: OrderedDict[Hashable, deque[_Job]] = OrderedDict()
        self._closed = False
        self._running: list[_Job] = []
        self.busy_seconds = 0.0          # total time spent running jobs
        self.jobs_done = 0
        self._thread = threading.Thread(target=self._loop, name=f"device-worker-{device}", daemon=True)
        self._thread.start()

    # ---- event loop side

    async def run(self, owner: Hashable, fn: Callable[[], Any], *, urgent: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        return await self._submit(_Job(owner, fn, loop.create_future(), loop), urgent)

    async def run_batched(self, owner: Hashable, batch_fn: Callable[[list], list], item: Any) -> Any:
        """Queue `item` for `batch_fn(items) -> results` (one per item, in order; an exception instance is that
        item's error), run together with the other owners' due items of the same batch_fn."""
        loop = asyncio.get_running_loop()
        return await self._submit(_Job(owner, None, loop.create_future(), loop, batch_fn, item), False)

    async def _submit(self, job: _Job, urgent: bool) -> Any:
        owner = job.owner
        with self._cv:
            if self._closed:
                raise WorkerClosed(f"the {self.device} worker is closed")
            if urgent:
                self._urgent.append(job)
            else:
                self._ring.setdefault(owner, deque()).append(job)
            self._cv.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            with self._cv:
                if not self._remove(job):
                    job.cancelled = True   # running now: let it finish, drop the result
            raise

    def queued(self, owner: Hashable | None = None) -> int:
        with self._cv:
            if owner is None:
                return len(self._urgent) + sum(len(q) for q in self._ring.values())
            return sum(j.owner == owner for j in self._urgent) + len(self._ring.get(owner, ()))

    def busy_with(self, owner: Hashable) -> bool:
        return any(job.owner == owner for job in self._running)

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new jobs, fail queued ones, wait for the running one to finish, stop the thread."""
        with self._cv:
            self._closed = True
            pending = list(self._urgent) + [j for q in self._ring.values() for j in q]
            self._urgent.clear()
            self._ring.clear()
            self._cv.notify_all()
        for job in pending:
            self._resolve(job, None, WorkerClosed("the worker closed before this job ran"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- worker thread side

    def _remove(self, job: _Job) -> bool:
        if job in self._urgent:
            self._urgent.remove(job)
            return True
        q = self._ring.get(job.owner)
        if q is not None and job in q:
            q.remove(job)
            if not q:
                del self._ring[job.owner]
            return True
        return False

    def _next_jobs(self) -> list[_Job] | None:
        """The next job alone, or the next batch: the ring's head owner and every later owner whose next job has
        the same batch_fn, in ring order, up to max_batch; those taken move to the back."""
        with self._cv:
            while not self._closed and not self._urgent and not self._ring:
                self._cv.wait()
            if self._closed:
                return None
            if self._urgent:
                jobs = [self._urgent.popleft()]
            else:
                self._linger()
                if self._closed:
                    return None
                if self._urgent or not self._ring:     # an urgent job came in, or the due ones were cancelled
                    jobs = [self._urgent.popleft()] if self._urgent else []
                else:
                    jobs = self._take_batch()
            now = time.monotonic()
            for job in jobs:
                job.started = now
            self._running = jobs
            return jobs

    def _batch_owners(self, batch_fn) -> list:
        return [o for o, q in self._ring.items() if q[0].batch_fn is batch_fn and batch_fn is not None]

    def _linger(self) -> None:
        """Wait (at most `linger` s) for the last batch's owners, while the batch would be smaller than both the cap
        and the number of owners that were due last time. Called with the lock held."""
        head = next(iter(self._ring.values()))[0]
        if head.batch_fn is None or not self._returning or self.linger <= 0:
            return
        cap = self.max_batch or 1 << 30
        deadline = time.monotonic() + self.linger
        while not self._closed and not self._urgent and self._ring:
            due = {id(o) for o in self._batch_owners(head.batch_fn)}
            if len(due) >= cap or self._returning <= due:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._cv.wait(left)

    def _take_batch(self) -> list[_Job]:
        owner, q = next(iter(self._ring.items()))
        batch_fn = q[0].batch_fn
        owners = [owner] if batch_fn is None else self._batch_owners(batch_fn)[:self.max_batch or None]
        jobs = []
        for o in owners:
            q = self._ring.pop(o)
            jobs.append(q.popleft())
            if q:
                self._ring[o] = q   # re-inserted at the back: the owners left out go first next time
        return jobs

    def _loop(self) -> None:
        if self._init is not None:
            try:
                self._init()
            except Exception:  # noqa: BLE001 - a tuning hook; the worker still works without it
                log.exception("device worker init failed")
        while True:
            jobs = self._next_jobs()
            if jobs is None:
                return
            if jobs:
                self._run_jobs(jobs)
            del jobs                     # hold no reference to a finished session while idle

    def _run_jobs(self, jobs: list[_Job]) -> None:
        batch_fn = jobs[0].batch_fn
        if batch_fn is None:
            try:
                results = [jobs[0].fn()]
            except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting coroutine
                results = [exc]
        else:
            try:
                results = list(batch_fn([job.item for job in jobs]))
                if len(results) != len(jobs):
                    raise RuntimeError(f"batch function returned {len(results)} results for {len(jobs)} items")
            except BaseException as exc:  # noqa: BLE001 - a failure of the whole call: every item gets it
                results = [exc] * len(jobs)
        finished = time.monotonic()
        with self._cv:
            self._running = []
            self.busy_seconds += finished - jobs[0].started
            self.jobs_done += len(jobs)
            if batch_fn is not None:
                self._returning = {id(job.owner) for job in jobs}
                self.last_batch_size = len(jobs)
                self.batches_done += 1
        if batch_fn is not None and self._on_batch is not None:
            try:
                self._on_batch(len(jobs), finished - jobs[0].started)
            except Exception:  # noqa: BLE001 - metrics must never stop the worker
                log.exception("on_batch callback failed")
        for job, result in zip(jobs, results):
            error = result if isinstance(result, BaseException) else None
            if not job.cancelled:
                self._resolve(job, None if error is not None else result, error)
            elif error is not None:
                log.debug("dropped error of a cancelled job: %r", error)

    @staticmethod
    def _resolve(job: _Job, result, error) -> None:
        def settle():
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass
