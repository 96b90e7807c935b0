"""Moving a live session between workers: snapshot it out of one StreamServer, adopt it into another.

Built on the snapshots of issue 18: `StreamSession.snapshot(path)` stops generating, lets the chunk in flight land,
and writes the engine's state (between chunks, on the device thread) together with the frames generated but not
yet played and the session's prompts; `StreamSession.restore(path)` continues it, unplayed frames first. So a move
loses no chunk and repeats none. The file's bytes travel from worker to worker through Ray's object store.

The adopted session waits as a detached client (like a dropped websocket under --reconnect-grace) with the same
session id and resume key, so the client's ordinary resume, routed by the front door, continues it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

from packcache import snapshot_info

from ..persist import SessionStore
from ..server import StreamServer

log = logging.getLogger(__name__)


async def export(server: StreamServer, sid: str) -> bytes:
    """The session's snapshot file, as bytes. The session generates nothing more here (the caller ends it)."""
    client = server.clients.get(sid)
    s = client.session if client is not None else None
    if s is None or s.closed or s._gs is None:
        raise KeyError(f"no live session {sid} on this worker")
    if s.error is not None:
        raise RuntimeError(f"session {sid} failed: {s.error}")
    fd, path = tempfile.mkstemp(prefix=f"move-{sid}-", suffix=".safetensors")
    os.close(fd)
    try:
        t = time.monotonic()
        info = await s.snapshot(path)
        with open(path, "rb") as f:
            blob = f.read()
    finally:
        os.unlink(path)
    log.info("session %s: snapshot at chunk %d for a move (%.1f MB, %.3f s)", sid, info.chunk_index,
             len(blob) / 1e6, time.monotonic() - t)
    return blob


async def adopt(server: StreamServer, sid: str, resume_key: str | None, blob: bytes) -> int:
    """Restore `blob` as session `sid`, detached and waiting `reconnect_grace` seconds for its client's resume, the
    way --state-dir brings saved sessions back at start (persist.SessionStore). Returns its chunk index."""
    if sid in server.clients:
        raise ValueError(f"session {sid} already exists on this worker")
    with tempfile.TemporaryDirectory(prefix="adopt-") as tmp:
        store = SessionStore(tmp)
        path = store.path_for(sid)
        with open(path, "wb") as f:
            f.write(blob)
        info = snapshot_info(path)
        await store.restore_detached(server, sid, resume_key, path)
    server.metrics.sessions_total.inc()
    log.info("session %s adopted at chunk %d; waiting for its client", sid, info.chunk_index)
    return int(info.chunk_index)
