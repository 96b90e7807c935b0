"""Decode off the critical path: a chunk's finish (decode, compressed K/V backup) runs on a side worker while the
calling thread denoises the next chunk.

One `FinishWorker` per `Generator`: a single thread (so finishes run in submission order) and, on CUDA, its own
stream. A job waits (on the device) for the event recorded after its chunk's commit, runs, and synchronises its
stream before its future resolves: a resolved future means the finish's device work is complete, which is what
the session relies on before the next commit (see `GenerationSession.submit_chunk`).
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Callable

import torch


class FinishWorker:
    def __init__(self, device: torch.device | str, threads: int = 0):
        self.device = torch.device(device)
        self.threads = threads                      # torch CPU threads of the side thread; 0: the creator's
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # called on the side thread with each finished job's seconds (its device work included): a server's
        # metrics, since with the pipeline on the device worker's own step time no longer contains the decode
        self.on_finish: Callable[[float], None] | None = None

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                # OpenMP's thread count is per thread: without an explicit one, the first caller's (the server
                # sets it on its device worker thread)
                threads = self.threads or torch.get_num_threads()
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="packcache-finish", initializer=torch.set_num_threads,
                    initargs=(threads,))
            return self._pool

    def set_threads(self, n: int) -> None:
        """torch CPU threads of the side thread (packcache.threads.pipeline_threads); 0: the creator's. Takes
        effect before the next job."""
        self.threads = n
        with self._lock:
            pool = self._pool
        if pool is not None and n:
            pool.submit(torch.set_num_threads, n).result()

    def submit(self, fn, *args) -> concurrent.futures.Future:
        """Run fn(*args) on the side worker after the device work queued so far on this thread's stream."""
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()                          # on the caller's current stream
        return self._executor().submit(self._run, ready, fn, args)

    def _run(self, ready, fn, args):
        t0 = time.perf_counter()
        out = self._run_on_stream(ready, fn, args)
        report = self.on_finish
        if report is not None:
            report(time.perf_counter() - t0)
        return out

    def _run_on_stream(self, ready, fn, args):
        with torch.no_grad():                       # grad mode is per thread
            if self._stream is None:
                return fn(*args)
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                self._stream.wait_event(ready)
                for a in args:                      # tensors made on the caller's stream, used on this one
                    if isinstance(a, torch.Tensor) and a.is_cuda:
                        a.record_stream(self._stream)
                out = fn(*args)
            self._stream.synchronize()
            return out

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
