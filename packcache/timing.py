"""Per-stage timing of the chunk loop (denoise / commit / decode / compress), cheap enough to leave on.

On CUDA a stage is a pair of events recorded on the stream the stage runs on (the finish stages run on a side
stream), read only when asked for, so timing adds no host synchronisation to the chunk loop. On the CPU it is
wall-clock time of the stage.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque

import torch

STAGES = ("denoise", "commit", "decode", "compress")


class StageClock:
    """Records, per chunk, the milliseconds each stage took; keeps the last `keep` chunks."""

    def __init__(self, device: torch.device | str, keep: int = 4096):
        self.cuda = torch.device(device).type == "cuda"
        self._rows: deque[dict] = deque(maxlen=keep)       # chunk -> {stage: ms or (start, end) events}
        self._lock = threading.Lock()

    def new_chunk(self, index: int) -> dict:
        row = {"chunk": index}
        with self._lock:
            self._rows.append(row)
        return row

    @contextlib.contextmanager
    def stage(self, row: dict | None, name: str):
        """Time the body as stage `name` of `row` (no-op when row is None)."""
        if row is None:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                row[name] = (start, end)
        else:
            t = time.perf_counter()
            try:
                yield
            finally:
                row[name] = row.get(name, 0.0) + (time.perf_counter() - t) * 1e3

    @staticmethod
    def _ms(value) -> float | None:
        if isinstance(value, tuple):
            start, end = value
            end.synchronize()
            return start.elapsed_time(end)
        return value

    def rows(self, last: int | None = None) -> list[dict]:
        """Per-chunk {chunk, denoise, commit, decode, compress} in ms (missing stages: 0)."""
        with self._lock:
            rows = list(self._rows)[-last:] if last else list(self._rows)
        out = []
        for row in rows:
            done = {"chunk": row["chunk"]}
            for s in STAGES:
                done[s] = self._ms(row.get(s)) or 0.0
            out.append(done)
        return out

    def mean_ms(self, last: int | None = None) -> dict[str, float]:
        rows = self.rows(last)
        return {s: sum(r[s] for r in rows) / len(rows) if rows else 0.0 for s in STAGES}
