"""Admission: which worker a new session goes to. The front door's view of each worker, and the choice.

The view is the worker's last reported status plus what the front door has admitted since: a session counts
from the moment it is routed (before the worker could report it) until a status requested after its welcome
arrives, so two clients arriving together never both take the last free slot of the same worker.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class WorkerView:
    name: str
    actor: Any = None                       # the Ray actor handle
    status: dict | None = None              # last status() answer (None: never answered)
    status_asked: float = 0.0               # monotonic time the request for `status` was sent
    down: bool = True                       # the last status call failed (dead, restarting, not answering)
    draining: bool = False                  # no new sessions; its sessions are being moved away
    admitted_total: int = 0
    _pending: dict[int, float | None] = field(default_factory=dict)   # admission -> welcome time (None: waiting)
    _ids: Any = field(default_factory=itertools.count)

    @property
    def ready(self) -> bool:
        return not self.down and self.status is not None and bool(self.status.get("ready"))

    @property
    def incarnation(self) -> str | None:
        return self.status.get("incarnation") if self.status else None

    @property
    def url(self) -> str | None:
        return self.status.get("ws_url") if self.status else None

    def counted(self) -> int:
        """Admissions not yet in the worker's own count."""
        return sum(1 for t in self._pending.values() if t is None or t >= self.status_asked)

    def free(self) -> int:
        """Free session slots as far as the front door knows (0 when not ready or draining)."""
        if not self.ready or self.draining:
            return 0
        s = self.status
        return max(0, int(s["max_sessions"]) - int(s["sessions"]) - self.counted())

    def sessions(self) -> int:
        return (int(self.status["sessions"]) if self.status else 0) + self.counted()

    # ---- bookkeeping of one admission

    def reserve(self) -> int:
        token = next(self._ids)
        self._pending[token] = None
        self.admitted_total += 1
        return token

    def welcomed(self, token: int) -> None:
        if token in self._pending:
            self._pending[token] = time.monotonic()

    def release(self, token: int) -> None:
        self._pending.pop(token, None)

    def update(self, status: dict | None, asked: float) -> None:
        """A status answer (None: the call failed) for a request sent at `asked`."""
        if status is None:
            self.down = True
            return
        if self.status is not None and status.get("incarnation") != self.incarnation:
            self._pending.clear()                 # a restarted worker: nothing routed before counts
        self.status, self.status_asked, self.down = status, asked, False
        self._pending = {k: t for k, t in self._pending.items() if t is None or t >= asked}


def pick(workers: list[WorkerView]) -> WorkerView | None:
    """The worker with the most free slots (ties: the fewest sessions, then name order); None when all are full."""
    best = None
    for w in workers:
        f = w.free()
        if f <= 0:
            continue
        if best is None or (f, -w.sessions()) > (best.free(), -best.sessions()):
            best = w
    return best
