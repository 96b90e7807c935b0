"""--state-dir: live sessions outlive the server process.

On shutdown (`StreamServer.close`, i.e. SIGTERM/SIGINT in run_server.py) every live session is written to
`<state dir>/<session id>.snapshot.safetensors` between two chunks (the engine's snapshot plus the frames not yet
played and the session's prompts); on the next start, before the server says ready, each snapshot is restored
into a detached session that waits `reconnect_grace` seconds for its client, exactly like a session whose
websocket dropped. A client resuming with `?resume=<session>&key=<resume_key>` continues where it stopped.

Files never pile up: a snapshot is deleted when its client resumes, when its grace runs out, and at start when it
cannot be restored (unreadable, another model, over --max-sessions); a new shutdown overwrites it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from packcache import SNAPSHOT_SUFFIX, PackCacheError, snapshot_info

from . import protocol as P
from .session import StreamSession

if TYPE_CHECKING:
    from .server import ClientConnection, StreamServer

log = logging.getLogger(__name__)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class SessionStore:
    """The state directory: one snapshot file per saved session, named by its session id."""

    def __init__(self, path: str):
        self.dir = path

    def path_for(self, sid: str) -> str:
        return os.path.join(self.dir, sid + SNAPSHOT_SUFFIX)

    def discard(self, sid: str) -> None:
        try:
            os.unlink(self.path_for(sid))
            log.info("session %s: snapshot deleted", sid)
        except FileNotFoundError:
            pass

    def _files(self) -> list[str]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        for name in names:                      # a write interrupted by a crash leaves only its temporary file
            if ".snapshot.safetensors.tmp" in name:
                os.unlink(os.path.join(self.dir, name))
        return sorted(os.path.join(self.dir, n) for n in names if n.endswith(SNAPSHOT_SUFFIX))

    # ---- shutdown

    async def park_all(self, server: "StreamServer") -> set[str]:
        """Snapshot every live session, one after another on the device worker. Returns the saved session ids."""
        clients = [c for c in server.clients.values()
                   if c.session is not None and c.session._gs is not None and not c.session.closed
                   and c.session.error is None and not c.failing and c.resume_key]
        if not clients:
            return set()
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        log.info("saving %d live session(s) to %s", len(clients), self.dir)
        saved, total, start = set(), 0, time.perf_counter()
        for i, client in enumerate(clients, 1):
            t = time.perf_counter()
            try:
                info = await client.session.snapshot(
                    self.path_for(client.sid), extra={"server": {"session": client.sid, "key": client.resume_key}})
            except Exception as exc:  # noqa: BLE001 - one session failing must not lose the others
                log.warning("session %s: could not save it: %s", client.sid, exc)
                continue
            saved.add(client.sid)
            total += info.tensor_bytes
            log.info("saved session %d/%d: %s at chunk %d (%s, %.2f s)", i, len(clients), client.sid,
                     info.chunk_index, _mb(info.tensor_bytes), time.perf_counter() - t)
        log.info("saved %d/%d session(s), %s in %.2f s", len(saved), len(clients), _mb(total),
                 time.perf_counter() - start)
        return saved

    # ---- start

    async def restore_all(self, server: "StreamServer") -> int:
        """Bring every snapshot back as a detached session waiting for its client (before the server is ready)."""
        found = []
        for path in self._files():
            try:
                info = snapshot_info(path)
                sid, key = info.extra["server"]["session"], info.extra["server"]["key"]
                found.append((info.created, path, info, sid, key))
            except (PackCacheError, KeyError, TypeError) as exc:
                log.warning("state dir: cannot restore %s (%s); deleting it", os.path.basename(path), exc)
                os.unlink(path)
        if not found:
            log.info("state dir %s: no saved sessions", self.dir)
            return 0
        log.info("state dir %s: %d saved session(s): %s", self.dir, len(found), ", ".join(
            f"{sid} (chunk {info.chunk_index}, {_mb(info.tensor_bytes)}, {info.prompt[:40]!r})"
            for _, _, info, sid, _ in found))
        found.sort(key=lambda f: f[0], reverse=True)     # newest first when over --max-sessions
        restored = 0
        for n, (_, path, info, sid, key) in enumerate(found):
            if n >= server.config.max_sessions or sid in server.clients:
                log.warning("session %s: over --max-sessions (%d) or already live; deleting its snapshot",
                            sid, server.config.max_sessions)
                os.unlink(path)
                continue
            t = time.perf_counter()
            try:
                await self.restore_detached(server, sid, key, path)
            except Exception as exc:  # noqa: BLE001 - another model, corrupted data...: say so, drop the file
                log.warning("session %s: cannot restore it (%s); deleting its snapshot", sid, exc)
                os.unlink(path)
                continue
            restored += 1
            log.info("restored session %s at chunk %d (%.2f s); waiting %g s for its client", sid, info.chunk_index,
                     time.perf_counter() - t, server.config.reconnect_grace)
        return restored

    async def restore_detached(self, server: "StreamServer", sid: str, key: str | None, path: str) -> None:
        """Bring the snapshot at `path` back as session `sid`, detached: it waits `reconnect_grace` seconds for a
        resume with `key` and then ends (a restart's saved sessions, and a session moved in from another worker)."""
        from .server import ClientConnection

        cfg = server.config
        client = ClientConnection(server, sid)
        client.resume_key = key
        session = client.new_stream_session()
        await session.restore(path)
        client.session = session
        client.detached_at = time.monotonic()
        server.clients[sid] = client
        client._expiry = server._spawn(self._expire(client, cfg.reconnect_grace))

    async def _expire(self, client: "ClientConnection", grace: float) -> None:
        """ClientConnection._expire, and the file goes first (a shutdown may cancel this while the session stops)."""
        await asyncio.sleep(grace)
        if client.detached_at is not None:
            log.info("session %s: no resume within %g s; ending it", client.sid, grace)
            self.discard(client.sid)
            await client.stop()
