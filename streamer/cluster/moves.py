"""Moving a live session between workers: snapshot it out of one StreamServer, adopt it into another.

Uses the engine's snapshots (`GenerationSession.snapshot(path)`, `Generator.restore(path)`, packcache/snapshot.py);
a worker whose engine has none reports `snapshots: False` and its drained clients get a new session instead.

No chunk is lost or repeated: the session is paused (no new chunk job is queued after the one in flight), the
snapshot is taken by an urgent job on the device thread, so between chunks, and the chunks generated before it
but not yet played travel with it (the viewer sees them on the new worker). A chunk job that was still queued runs
after the snapshot on the old worker and is dropped with the old session; the new worker generates that chunk
again, identically (the noise generator's state is in the snapshot).

The adopted session waits as a detached client (like a dropped websocket under --reconnect-grace) with the same
session id and resume key, so the client's ordinary resume continues it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import numpy as np

from .. import protocol as P
from ..server import ClientConnection, StreamServer
from ..session import StreamSession, _Chunk

log = logging.getLogger(__name__)


def supported(server: StreamServer) -> bool:
    return server.generator is not None and hasattr(server.generator, "restore")


async def export(server: StreamServer, sid: str) -> dict:
    """The session's snapshot (bytes) and its unplayed chunks; the session is left paused (the caller ends it)."""
    client = server.clients.get(sid)
    if client is None or client.session is None or client.session.closed:
        raise KeyError(f"no live session {sid} on this worker")
    s = client.session
    if s.error is not None:
        raise RuntimeError(f"session {sid} failed: {s.error}")
    was_paused = s.paused
    s.pause()
    gs = s._gs
    fd, path = tempfile.mkstemp(prefix=f"move-{sid}-", suffix=".safetensors")
    os.close(fd)

    def snap():                                  # on the device thread: between chunks
        gs.snapshot(path)
        return gs.chunk_index

    try:
        t = time.monotonic()
        index = await server.worker.run(s, snap, urgent=True)
        with open(path, "rb") as f:
            blob = f.read()
    finally:
        os.unlink(path)
    chunks = [(c.index, np.ascontiguousarray(c.frames[c.pos:]), c.prompt) for c in s._buffer
              if c.index < index and c.left]
    log.info("session %s: snapshot at chunk %d (%d bytes, %d unplayed chunks) in %.3f s", sid, index, len(blob),
             len(chunks), time.monotonic() - t)
    return {"snapshot": blob, "chunk_index": index, "chunks": chunks, "paused": was_paused,
            "requested_prompt": s.requested_prompt, "last_frame": s._last_frame}


async def adopt(server: StreamServer, sid: str, resume_key: str | None, payload: dict) -> int:
    """Restore `payload` as session `sid`, detached and waiting for its client's resume. Returns its chunk index."""
    if sid in server.clients:
        raise ValueError(f"session {sid} already exists on this worker")
    cfg, gen = server.config, server.generator
    fd, path = tempfile.mkstemp(prefix=f"adopt-{sid}-", suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(payload["snapshot"])
    client = ClientConnection(server, sid)
    client.resume_key = resume_key
    server.clients[sid] = client                 # the slot is taken before the first await
    try:
        metrics = server.metrics

        def on_chunk(frames: int, seconds: float, latency: float) -> None:
            metrics.chunks.inc()
            metrics.frames_generated.inc(frames)
            metrics.chunk_seconds.observe(latency)

        def on_error(exc: BaseException) -> None:
            server._spawn(client.fail("internal", f"generation failed: {exc}", P.CLOSE_INTERNAL))

        session = StreamSession(sid, gen, server.worker, prompt=payload["requested_prompt"], cache=cfg.cache,
                                chunks_ahead=cfg.chunks_ahead, fps=gen.preset.fps, on_chunk=on_chunk,
                                on_error=on_error)
        try:
            gs = await server.worker.run(session, lambda: gen.restore(path), urgent=True)
        finally:
            os.unlink(path)
        session._gs, session.opened_at = gs, time.monotonic()
        session.chunk_index = int(gs.chunk_index)
        session.prompt, session._seed = gs.prompt, gs.seed
        for index, frames, prompt in payload["chunks"]:
            session._buffer.append(_Chunk(index, frames, prompt))
        session._last_frame = payload["last_frame"]
        session.paused = bool(payload["paused"])
        client.session = session
    except BaseException:
        server.clients.pop(sid, None)
        raise
    metrics.sessions_total.inc()
    client.detached_at = time.monotonic()
    client._expiry = server._spawn(client._expire(cfg.reconnect_grace or 30.0))
    log.info("session %s adopted at chunk %d; waiting for its client", sid, session.chunk_index)
    return session.chunk_index
