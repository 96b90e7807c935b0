"""One client's generation: drives an engine `GenerationSession` into a bounded frame buffer.

The producer task asks the device worker for one chunk at a time (the worker batches the chunks of all sessions that
are due into one engine step), and only while fewer than `chunks_ahead` chunks are buffered or on their way:
generation runs at most that far ahead of playback and memory never grows. The track pops frames from the buffer at
16 FPS; when the buffer is empty it gets the last frame again (underrun).

Pipelined (the default, `pipeline=True`): the worker's job is the batch's denoise and commit only
(`submit_chunks`); its finish (decode, compressed backup) runs on the engine's side worker, and the job returns a
future per session. The producer queues the next chunk at once, so the worker denoises batch k+1 while batch k
decodes; a lander task awaits the futures in order and fills the buffer. Everything that reads or replaces the
engine session between chunks waits for its finish: the engine does it for close, reset, a prompt switch, the
next commit and `state_dict`; `snapshot` here waits until every chunk on its way has landed. With
`pipeline=False` the job is the whole chunk (`generate_chunks`).

Engine calls that touch the device (open, next_chunk, close) run on the device worker, so the event loop never
blocks and a session is never closed mid-chunk. `set_prompt` and `reset` only queue a change inside the engine
(documented thread-safe, applied before its next chunk), so they are called directly and acknowledged at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from .scheduler import DeviceWorker

log = logging.getLogger(__name__)

_LATENCY_WINDOW = 64   # chunks kept for latency percentiles and the real-time factor


def _percentile(values, q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def submit_chunks(sessions: list) -> list:
    """Worker side of pipelined chunk jobs: the due sessions' batched denoise and commit (`Generator.submit_chunks`);
    their finish runs on the engine's side worker. Per session: (future of its frames, stats, device seconds) or its
    exception (refused before its commit). Stats are read after the commit: chunk index and cache are final."""
    t = time.monotonic()
    futures = sessions[0].gen.submit_chunks(sessions)
    share = (time.monotonic() - t) / len(sessions)
    out = []
    for f, gs in zip(futures, sessions):
        failed = f.exception() if f.done() else None
        out.append(failed if failed is not None else (f, gs.stats(), share))
    return out


def generate_chunks(sessions: list) -> list:
    """Worker side of the due sessions' chunk jobs: one batched engine step (`Generator.next_chunks`), then each
    session's stats. Per session: (frames, stats, device seconds) or its exception. The device seconds are the
    step's time divided among its sessions, so summed over sessions they are the device time actually spent."""
    t = time.monotonic()
    results = sessions[0].gen.next_chunks(sessions)
    share = (time.monotonic() - t) / len(sessions)
    return [r if isinstance(r, BaseException) else (r, gs.stats(), share) for r, gs in zip(results, sessions)]


class _Signal:
    """Wake every coroutine waiting for a condition to change (a lock-free asyncio.Condition)."""

    def __init__(self):
        self._waiters: set[asyncio.Future] = set()

    def notify(self) -> None:
        for f in self._waiters:
            if not f.done():
                f.set_result(None)
        self._waiters.clear()

    async def wait_for(self, predicate: Callable[[], bool]) -> bool:
        """Wait until predicate() is true; returns True if it had to wait."""
        waited = False
        while not predicate():
            waited = True
            f = asyncio.get_running_loop().create_future()
            self._waiters.add(f)
            try:
                await f
            finally:
                self._waiters.discard(f)
        return waited


class _InFlight:
    """A chunk whose denoise and commit are done and whose frames are still being finished."""

    __slots__ = ("epoch", "submitted", "future", "info", "seconds")

    def __init__(self, epoch: int, submitted: float, future, info: dict, seconds: float):
        self.epoch, self.submitted, self.future, self.info, self.seconds = epoch, submitted, future, info, seconds


class _Chunk:
    __slots__ = ("index", "frames", "prompt", "pos")

    def __init__(self, index: int, frames: np.ndarray, prompt: str):
        self.index, self.frames, self.prompt, self.pos = index, frames, prompt, 0

    @property
    def left(self) -> int:
        return len(self.frames) - self.pos


class StreamSession:
    """Generation for one client: `await open()`, `start()`, the track pulls frames, `await close()` frees it."""

    def __init__(self, sid: str, generator, worker: DeviceWorker, *, prompt: str, seed: int = 0,
                 cache: str = "packed", chunks_ahead: int = 2, fps: int = 16, pipeline: bool = True,
                 on_chunk: Callable[[int, float, float], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None):
        self.sid = sid
        self.fps = fps
        self.chunks_ahead = chunks_ahead
        self.pipeline = pipeline         # finish on the engine's side worker (see the module docstring)
        self._generator = generator
        self._worker = worker
        self._prompt0, self._seed, self._cache = prompt, seed, cache
        self._on_chunk = on_chunk        # (frames, compute seconds, latency seconds) after each chunk
        self._on_error = on_error
        self._gs = None                  # the engine's GenerationSession
        self._buffer: deque[_Chunk] = deque()
        self._changed = _Signal()
        self._producer: asyncio.Task | None = None
        self._epoch = 0                  # bumped by reset: chunks generated before it are dropped
        self.paused = False
        self.closed = False
        self._hold = False               # a snapshot is being taken: generate nothing more
        self._generating = False         # a chunk job is out on the device worker
        self._inflight: deque[_InFlight] = deque()   # committed, finishing (pipeline): land in this order
        self._landed = _Signal()         # the lander waits on it for the next chunk on its way
        self.error: str | None = None
        # what is generated / what is on screen
        self.prompt = prompt             # prompt of the latest generated chunk
        self.requested_prompt = prompt   # latest prompt asked for
        self._pending: list[tuple[int, str]] = []   # (effective chunk, text) not generated yet
        self.playing_chunk: int | None = None
        self.playing_prompt: str | None = None
        self.chunk_index = 0             # chunks generated so far (the engine's count)
        self.frames_generated = 0
        self._last_frame: np.ndarray | None = None
        self._engine_stats: dict[str, Any] = {}
        self._compute: deque[tuple[int, float]] = deque(maxlen=_LATENCY_WINDOW)   # (frames, seconds)
        self._latency: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self.opened_at: float | None = None
        self.first_frame_at: float | None = None
        self.start_image = False         # the stream starts from a picture (replayed by reset)
        self.images = 0                  # pictures accepted (start and mid-stream cues)

    # ---- lifecycle

    async def open(self) -> None:
        """Open the engine session: its cache memory is reserved now, before anything streams."""
        gen, prompt, seed, cache = self._generator, self._prompt0, self._seed, self._cache
        self._gs = await self._worker.run(self, lambda: gen.open(prompt, seed=seed, cache=cache), urgent=True)
        self.opened_at = time.monotonic()

    def start(self) -> None:
        """Start generating into the buffer (idempotent). The server calls it once video is negotiated."""
        if self._producer is None and not self.closed:
            self._live()
            self._producer = asyncio.create_task(self._produce(), name=f"producer-{self.sid}")

    async def close(self) -> list[np.ndarray]:
        """Stop generating and free the engine session. Returns the frames generated but not yet played."""
        if self.closed:
            return []
        self.closed = True
        if self._producer is not None:
            self._producer.cancel()          # aborts a queued chunk job; a running one finishes and is dropped
            try:
                await self._producer
            except BaseException:            # noqa: BLE001 - cancelled or already failed
                pass
        leftover = [c.frames[c.pos:] for c in self._buffer if c.left]
        self._buffer.clear()
        self._inflight.clear()               # the engine's close below waits for a finish still running
        if self._gs is not None:
            gs, self._gs = self._gs, None
            try:
                await asyncio.shield(self._worker.run(self, gs.close, urgent=True))
            except Exception as exc:          # noqa: BLE001 - freeing must never raise into the caller
                log.warning("session %s: close failed: %r", self.sid, exc)
        self._changed.notify()
        return [f for block in leftover for f in block]

    # ---- control (called from the server's message handlers)

    def set_prompt(self, text: str, transition: str = "cut", blend_chunks: int = 4) -> int:
        """Queue a new prompt with the engine; returns the chunk index at which it takes effect.

        The engine's set_prompt only queues (thread-safe, no device work): it is called right here, so the
        acknowledgement never waits for the chunk in progress. Raises PromptError (a ValueError) on bad input."""
        effective = int(self._live().set_prompt(text, transition=transition, blend_chunks=blend_chunks))
        self.requested_prompt = text
        self._pending = [p for p in self._pending if p[0] < effective] + [(effective, text)]
        return effective

    def set_image(self, frame: np.ndarray, text: str = "", transition: str = "cut", blend_chunks: int = 4,
                  restart: bool = False) -> int:
        """Queue a picture (uint8 (H, W, 3), already fitted) with its prompt (may be empty): the stream's start
        when no chunk was generated yet or with `restart` (a reset first; effective chunk 0; later resets replay
        it), else a cut to it. Queues only, like set_prompt; raises the engine's PromptError / StartFramesError
        (ValueErrors) on bad input, before anything changes."""
        effective = int(self._live().set_prompt(text, transition=transition, blend_chunks=blend_chunks,
                                                image=frame, restart=restart))   # one atomic engine call
        if restart:
            self._restarted(None)
        self.requested_prompt = text
        self._pending = [p for p in self._pending if p[0] < effective] + [(effective, text)]
        self.images += 1
        if effective == 0:
            self.start_image = True
        return effective

    def reset(self, seed: int | None = None) -> None:
        """Restart from chunk 0 with the current prompt; buffered frames and the chunk in progress are dropped."""
        self._live().reset(seed)             # thread-safe: applied before the engine's next chunk
        self._restarted(seed)

    def _restarted(self, seed: int | None) -> None:
        """This side of a reset the engine has queued: drop what was generated for the old stream."""
        self._epoch += 1
        if seed is not None:
            self._seed = seed
        self._buffer.clear()
        self.chunk_index = 0
        self.prompt = self.requested_prompt
        self._pending.clear()
        self._changed.notify()

    def pause(self) -> None:
        self.paused = True
        self._changed.notify()

    def resume(self) -> None:
        self.paused = False
        self._changed.notify()

    def _live(self):
        if self._gs is None or self.closed:
            raise RuntimeError("the session is closed")
        return self._gs

    # ---- producer

    def _room(self) -> bool:
        return self.closed or (not self.paused and not self._hold and self.error is None
                               and len(self._buffer) + len(self._inflight) < self.chunks_ahead)

    def _quiet(self) -> bool:
        """No chunk on its way: none on the device worker, none finishing."""
        return not self._generating and not self._inflight

    async def _produce(self) -> None:
        gs = self._gs
        lander = asyncio.create_task(self._land(), name=f"lander-{self.sid}") if self.pipeline else None
        try:
            while not self.closed:
                await self._changed.wait_for(self._room)
                if self.closed:
                    return
                epoch, submitted = self._epoch, time.monotonic()
                self._generating = True
                try:
                    if self.pipeline:
                        future, info, seconds = await self._worker.run_batched(self, submit_chunks, gs)
                        self._inflight.append(_InFlight(epoch, submitted, future, info, seconds))
                        self._landed.notify()
                        continue
                    frames, info, seconds = await self._worker.run_batched(self, generate_chunks, gs)
                    if epoch != self._epoch or self.closed:
                        continue             # a reset happened meanwhile: this chunk belongs to the old stream
                    latency = time.monotonic() - submitted
                    self._accept(np.ascontiguousarray(frames), info, seconds, latency)
                finally:
                    self._generating = False
                    self._changed.notify()
        except asyncio.CancelledError:
            raise
        except Exception as exc:             # the engine failed: the server ends this session with an error
            self._failed(exc)
        finally:
            if lander is not None:
                lander.cancel()              # a finish still running completes in the engine (close waits)
                try:
                    await lander
                except BaseException:        # noqa: BLE001 - cancelled or already failed
                    pass

    async def _land(self) -> None:
        """Pipeline: await the finishing chunks oldest first (the engine finishes them in that order) and buffer
        their frames; a chunk of the stream before a reset is dropped."""
        try:
            while True:
                await self._landed.wait_for(lambda: bool(self._inflight))
                head = self._inflight[0]
                try:
                    frames = await asyncio.wrap_future(head.future)
                except asyncio.CancelledError:
                    raise                    # still finishing: it stays on its way (close waits for it)
                except Exception:
                    self._inflight.popleft()
                    raise
                self._inflight.popleft()
                self._changed.notify()
                if head.epoch != self._epoch or self.closed:
                    continue
                latency = time.monotonic() - head.submitted
                self._accept(np.ascontiguousarray(frames), head.info, head.seconds, latency)
        except asyncio.CancelledError:
            raise
        except Exception as exc:             # its finish failed: the server ends this session with an error
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        if self.error is not None or self.closed:
            return
        log.error("session %s: generation failed", self.sid, exc_info=exc)
        self.error = f"generation failed: {exc}"
        self._changed.notify()
        if self._on_error is not None:
            self._on_error(exc)

    def _accept(self, frames: np.ndarray, info: dict, seconds: float, latency: float) -> None:
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise TypeError(f"engine returned frames {frames.shape} {frames.dtype}, expected (T, H, W, 3) uint8")
        self._engine_stats = info
        self.chunk_index = int(info.get("chunk_index", self.chunk_index + 1))
        index = self.chunk_index - 1
        while self._pending and self._pending[0][0] <= index:
            self.prompt = self._pending.pop(0)[1]
        self._buffer.append(_Chunk(index, frames, self.prompt))
        self.frames_generated += len(frames)
        self._compute.append((len(frames), seconds))
        self._latency.append(latency)
        if self._on_chunk is not None:
            self._on_chunk(len(frames), seconds, latency)

    # ---- consumer (the track)

    async def wait_playable(self) -> bool:
        def ready():
            return self.closed or (not self.paused and (self._buffer or self._last_frame is not None))
        return await self._changed.wait_for(ready)

    def pop_frame(self) -> tuple[np.ndarray, bool]:
        while self._buffer and self._buffer[0].left == 0:
            self._buffer.popleft()
        if not self._buffer:
            if self._last_frame is None:     # closed before anything was generated
                raise RuntimeError("no frame yet")
            return self._last_frame, False
        chunk = self._buffer[0]
        frame = chunk.frames[chunk.pos]
        chunk.pos += 1
        self.playing_chunk, self.playing_prompt = chunk.index, chunk.prompt
        if chunk.left == 0:
            self._buffer.popleft()
            self._changed.notify()          # room for the producer
        if self.first_frame_at is None:
            self.first_frame_at = time.monotonic()
        self._last_frame = frame
        return frame, True

    # ---- numbers

    def buffer_frames(self) -> int:
        return sum(c.left for c in self._buffer)

    def realtime_factor(self) -> float | None:
        """Video seconds generated per second of device time, over the recent chunks (>1: faster than real time)."""
        frames = sum(n for n, _ in self._compute)
        seconds = sum(s for _, s in self._compute)
        return frames / self.fps / seconds if seconds > 0 else None

    def compute_window(self) -> tuple[int, float]:
        return sum(n for n, _ in self._compute), sum(s for _, s in self._compute)

    def stats(self) -> dict[str, Any]:
        info = self._engine_stats
        lat = list(self._latency)
        frames, seconds = self.compute_window()
        wall = sum(lat)
        state = ("closed" if self.closed else "paused" if self.paused else
                 "starting" if self._last_frame is None else "playing")
        pending = self._pending[-1] if self._pending else None
        return {
            "session": self.sid,
            "state": state,
            "chunk_index": self.chunk_index,
            "playing_chunk": self.playing_chunk,
            "prompt": self.prompt,
            "playing_prompt": self.playing_prompt,
            "pending_prompt": {"text": pending[1], "effective_chunk": pending[0]} if pending else None,
            "seconds_per_chunk": seconds / len(self._compute) if self._compute else None,
            "chunk_latency_p50": _percentile(lat, 0.5),
            "chunk_latency_p95": _percentile(lat, 0.95),
            "rtf": self.realtime_factor(),
            "rtf_wall": frames / self.fps / wall if wall > 0 else None,
            "buffer_frames": self.buffer_frames(),
            "buffer_chunks": len(self._buffer),
            "frames_generated": self.frames_generated,
            "start_image": self.start_image,
            "images": self.images,
            "cache": {
                "kv_bytes": info.get("kv_bytes"),
                "attended_tokens": info.get("attended_tokens"),
                "partitions": info.get("partitions", {}),
            },
        }

    # ---- snapshots (--state-dir: sessions outlive the server process)

    async def snapshot(self, path: str, extra: dict | None = None):
        """Write this session to `path` between chunks: the engine's state, the frames generated but not yet
        played and this object's own state (prompts, pause). Generation stops for good (`_hold`): the caller is
        shutting down or moving the session. The write runs on the device worker, never on the event loop."""
        import torch

        self._hold = True
        self._changed.notify()
        await self._changed.wait_for(self._quiet)   # the chunks on their way (worker, finish) land in the buffer
        gs = self._live()
        chunks = [c for c in self._buffer if c.left]
        tensors = {"frames": torch.from_numpy(np.concatenate([c.frames[c.pos:] for c in chunks]))} if chunks else {}
        if self._last_frame is not None:
            tensors["last_frame"] = torch.from_numpy(np.ascontiguousarray(self._last_frame))
        stream = {
            "buffer": [{"index": c.index, "frames": c.left, "prompt": c.prompt} for c in chunks],
            "prompt": self.prompt, "requested_prompt": self.requested_prompt, "pending": self._pending,
            "paused": self.paused, "seed": self._seed, "frames_generated": self.frames_generated,
            "playing_chunk": self.playing_chunk, "playing_prompt": self.playing_prompt,
        }
        return await self._worker.run(
            self, lambda: gs.snapshot(path, extra={**(extra or {}), "stream": stream}, extra_tensors=tensors),
            urgent=True)

    async def restore(self, path: str):
        """Instead of `open()`: continue the session saved at `path` (unplayed frames first). Returns its
        SnapshotInfo; raises the engine's SnapshotError for a file this generator cannot continue."""
        from packcache import restore_with_extra

        gen = self._generator
        gs, info, tensors = await self._worker.run(self, lambda: restore_with_extra(gen, path), urgent=True)
        self._gs = gs
        self.opened_at = time.monotonic()
        st = info.extra.get("stream", {})
        self.chunk_index = gs.chunk_index
        self.prompt, self.requested_prompt = st.get("prompt", gs.prompt), st.get("requested_prompt", gs.prompt)
        self._pending = [(int(e), str(t)) for e, t in st.get("pending", [])]
        self.paused = bool(st.get("paused", False))
        self._seed = st.get("seed", gs.seed)
        self.frames_generated = int(st.get("frames_generated", 0))
        self.playing_chunk, self.playing_prompt = st.get("playing_chunk"), st.get("playing_prompt")
        frames = tensors["frames"].numpy() if "frames" in tensors else None
        start = 0
        for c in st.get("buffer", []):
            self._buffer.append(_Chunk(int(c["index"]), frames[start:start + int(c["frames"])], c["prompt"]))
            start += int(c["frames"])
        if "last_frame" in tensors:
            self._last_frame = tensors["last_frame"].numpy()
        return info
