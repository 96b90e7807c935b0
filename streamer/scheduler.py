"""Device work off the event loop: one worker thread per device, sessions take turns job by job.

Every call into the engine that touches the device (open, next_chunk, reset, close) is a job run on the
device's worker thread, so the event loop never blocks and the engine never sees two calls at once.

Fairness: jobs are queued per owner (a session); the worker takes one job from the owner at the head of a
round-robin ring, then moves that owner to the back. A session asking for chunk after chunk therefore gets
every n-th turn when n sessions are busy, whatever order they submitted in. Urgent jobs (open, close, warm-up)
go before chunk jobs: they are short and a user is waiting on them.

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
    __slots__ = ("owner", "fn", "future", "loop", "submitted", "started", "cancelled")

    def __init__(self, owner, fn, future, loop):
        self.owner, self.fn, self.future, self.loop = owner, fn, future, loop
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.cancelled = False


class DeviceWorker:
    """Runs jobs on one thread, fairly across owners. `await worker.run(owner, fn)` returns fn()'s result."""

    def __init__(self, device: str = "cpu", init: Callable[[], None] | None = None):
        """`init` runs first on the worker thread (per-thread settings such as torch's CPU thread count)."""
        self.device = device
        self._init = init
        self._cv = threading.Condition()
        self._urgent: deque[_Job] = deque()
        self._ring: OrderedDict[Hashable, deque[_Job]] = OrderedDict()
        self._closed = False
        self._running: _Job | None = None
        self.busy_seconds = 0.0          # total time spent running jobs
        self.jobs_done = 0
        self._thread = threading.Thread(target=self._loop, name=f"device-worker-{device}", daemon=True)
        self._thread.start()

    # ---- event loop side

    async def run(self, owner: Hashable, fn: Callable[[], Any], *, urgent: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        job = _Job(owner, fn, loop.create_future(), loop)
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
        job = self._running
        return job is not None and job.owner == owner

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

    def _next_job(self) -> _Job | None:
        with self._cv:
            while not self._closed and not self._urgent and not self._ring:
                self._cv.wait()
            if self._closed:
                return None
            if self._urgent:
                job = self._urgent.popleft()
            else:
                owner, q = next(iter(self._ring.items()))
                job = q.popleft()
                del self._ring[owner]
                if q:
                    self._ring[owner] = q   # re-inserted at the back: the next owner goes first
            job.started = time.monotonic()
            self._running = job
            return job

    def _loop(self) -> None:
        if self._init is not None:
            try:
                self._init()
            except Exception:  # noqa: BLE001 - a tuning hook; the worker still works without it
                log.exception("device worker init failed")
        while True:
            job = self._next_job()
            if job is None:
                return
            self._run_one(job)
            del job                      # hold no reference to a finished session while idle

    def _run_one(self, job: _Job) -> None:
        result, error = None, None
        try:
            result = job.fn()
        except BaseException as exc:  # noqa: BLE001 - delivered to the awaiting coroutine
            error = exc
        finished = time.monotonic()
        with self._cv:
            self._running = None
            self.busy_seconds += finished - job.started
            self.jobs_done += 1
        if not job.cancelled:
            self._resolve(job, result, error)
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
