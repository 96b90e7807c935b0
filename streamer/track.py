"""A video track that paces frames at exactly `fps` on the 90 kHz RTP video clock.

aiortc's own `VideoStreamTrack.next_timestamp()` paces at 30 FPS. Here frame n of a run carries
pts = n * 90000 / fps (5,625 ticks at 16 FPS) and is released at t0 + n / fps on a monotonic clock, so
timestamps are exact and sending never bursts:

- underrun (generation behind playback): the source returns its last frame again; the track sends it at the
  next slot (the viewer sees a held frame, never a burst) and counts it in `repeated`;
- late caller (the sender was held up for more than a frame): slots in the past are skipped rather than sent
  in a burst and counted in `skipped`;
- paused: `recv()` waits for the source to resume; the slots of the pause are skipped (not counted as late),
  so timestamps keep following wall time.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from collections import deque
from typing import Callable, Protocol

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)


class FrameSource(Protocol):
    async def wait_playable(self) -> bool:
        """Wait until a frame can be shown (not paused, at least one frame exists); True if it had to wait."""

    def pop_frame(self) -> tuple[np.ndarray, bool]:
        """The next frame (H, W, 3) uint8 and whether it is new (False: the last one again, an underrun)."""


class PacedVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, source: FrameSource, fps: int = 16, clock: Callable[[], float] = time.monotonic,
                 on_frame: Callable[[np.ndarray, bool], None] | None = None):
        super().__init__()
        if VIDEO_CLOCK_RATE % fps:
            raise ValueError(f"{fps} FPS does not divide the 90 kHz clock into whole ticks")
        self.fps = fps
        self.ticks_per_frame = VIDEO_CLOCK_RATE // fps    # 5,625 at 16 FPS
        self._source = source
        self._clock = clock
        self._on_frame = on_frame
        self._t0: float | None = None                      # wall time of slot 0
        self._slot = -1
        self.sent = 0          # frames handed to the encoder
        self.repeated = 0      # of which were repeats of the previous frame (generation behind)
        self.skipped = 0       # slots skipped because recv() was called late
        self._sent_times: deque[float] = deque()

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        waited = await self._source.wait_playable()
        if self.readyState != "live":
            raise MediaStreamError
        now = self._clock()
        if self._t0 is None:
            self._t0, self._slot = now, 0
        else:
            self._slot += 1
            due = self._t0 + self._slot / self.fps
            if now - due > 1.0 / self.fps:                # behind by more than a frame: jump to the present
                current = math.floor((now - self._t0) * self.fps)
                if not waited:
                    self.skipped += current - self._slot
                self._slot = current
            due = self._t0 + self._slot / self.fps
            if due > now:
                await asyncio.sleep(due - now)
        frame, fresh = self._source.pop_frame()
        if not fresh:
            self.repeated += 1
        self.sent += 1
        t = self._clock()
        self._sent_times.append(t)
        while self._sent_times and self._sent_times[0] < t - 1.0:
            self._sent_times.popleft()
        if self._on_frame is not None:
            self._on_frame(frame, fresh)
        out = av.VideoFrame.from_ndarray(frame, format="rgb24")
        out.pts = self._slot * self.ticks_per_frame
        out.time_base = VIDEO_TIME_BASE
        return out

    def fps_sent(self) -> float:
        """Frames sent during the last second."""
        t = self._clock()
        return float(sum(1 for s in self._sent_times if s >= t - 1.0))
