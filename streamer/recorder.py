"""Server-side recording of a session's stream to MP4 (H.264 via av), written as the stream plays.

Format: *fragmented* MP4 (`movflags=frag_keyframe+empty_moov+default_base_moof`) with a keyframe every second,
so the file on disk is playable up to its last complete fragment while the server keeps writing, and a crash
loses at most the last second. `close()` flushes the encoder and writes the final fragment.

What is recorded: every newly generated frame, in order, at the stream's FPS (repeated frames from an
underrun and paused time are not recorded, so the file is the generated video itself). When the client
disconnects the server also writes the frames that were generated but not yet played, then closes the file:
nothing generated is lost.

Encoding runs on a thread of its own (one per recording), never on the event loop. Its queue is bounded
(`queue_seconds` of video): an encoder that cannot keep up drops frames (counted in `dropped`, logged once)
rather than growing memory without end; the final leftover frames are queued with waiting, off the loop.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import os
import queue
import threading

import av
import numpy as np

log = logging.getLogger(__name__)

_STOP = object()


class Mp4Recorder:
    def __init__(self, path: str, fps: int, width: int, height: int, codec: str = "libx264",
                 queue_seconds: float = 4.0):
        self.path, self.fps, self.width, self.height, self.codec = path, fps, width, height, codec
        self.frames = 0
        self.dropped = 0                  # frames the encoder could not take in time (queue full)
        self.error: str | None = None
        # a few seconds of frames: enough to ride out a slow encode, bounded (832x480 RGB: 1.2 MB a frame)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_seconds * fps)))
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        # open here, not in the thread, so a bad path fails the `record` request with a clear error
        self._container = av.open(self.path, mode="w", format="mp4",
                                  options={"movflags": "frag_keyframe+empty_moov+default_base_moof",
                                           "flush_packets": "1"})
        stream = self._container.add_stream(self.codec, rate=self.fps)
        stream.width, stream.height = self.width + self.width % 2, self.height + self.height % 2
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = self.fps          # a keyframe (and a fragment) every second
        if self.codec == "libx264":
            stream.codec_context.options = {"preset": "veryfast", "tune": "zerolatency"}
        self._stream = stream
        self._frame_time_base = fractions.Fraction(1, self.fps)
        self._thread = threading.Thread(target=self._run, name=f"recorder-{os.path.basename(self.path)}",
                                        daemon=True)
        self._thread.start()

    def write(self, frame: np.ndarray) -> None:
        """Queue one (H, W, 3) uint8 frame. Cheap: encoding happens on the recorder's thread."""
        if self._closed:
            return
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            if not self.dropped:
                log.warning("recording %s: the encoder is behind; dropping frames", self.path)
            self.dropped += 1

    async def write_all(self, frames) -> None:
        """Queue frames, waiting for room (on a thread, not the loop): the frames left when a session ends."""
        if self._closed or not frames:
            return

        def put_all():
            for f in frames:
                self._queue.put(f)
        await asyncio.to_thread(put_all)

    async def close(self) -> int:
        """Flush and finish the file; returns the number of frames written. Idempotent."""
        if self._closed:
            return self.frames
        self._closed = True
        if self._thread is not None:
            def finish():                 # the queue may be full: wait for room off the event loop
                self._queue.put(_STOP)
                self._thread.join()
            await asyncio.to_thread(finish)
        return self.frames

    def _run(self) -> None:
        stopped = False
        try:
            while True:
                frame = self._queue.get()
                if frame is _STOP:
                    stopped = True
                    break
                if frame.shape[0] != self._stream.height or frame.shape[1] != self._stream.width:
                    frame = _pad_even(frame, self._stream.height, self._stream.width)
                vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
                vf.pts = self.frames
                vf.time_base = self._frame_time_base
                for packet in self._stream.encode(vf):
                    self._container.mux(packet)
                self.frames += 1
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        except Exception as exc:  # noqa: BLE001 - reported in stats; the stream itself goes on
            log.exception("recording %s failed", self.path)
            self.error = str(exc)
            while not stopped:       # drain so close() returns
                stopped = self._queue.get() is _STOP
        finally:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001
                log.exception("closing %s failed", self.path)


def _pad_even(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    out = np.zeros((height, width, 3), np.uint8)
    h, w = min(height, frame.shape[0]), min(width, frame.shape[1])
    out[:h, :w] = frame[:h, :w]
    return out
