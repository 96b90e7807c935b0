"""A Python client for the streaming server: websocket control + aiortc video, for scripts, tests and bench.

    async with StreamClient("ws://127.0.0.1:8080/ws") as c:     # waits for "welcome"
        await c.start_video()                                   # offer/answer; frames are counted as they arrive
        ack = await c.request({"type": "prompt", "text": "a green square"})
        print(ack["effective_chunk"], c.last_stats["fps_sent"], len(c.frames))
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Callable

import websockets
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError


class ServerError(Exception):
    """The server answered with an error message."""

    def __init__(self, msg: dict):
        super().__init__(f"{msg.get('code')}: {msg.get('message')}")
        self.code, self.message, self.msg = msg.get("code"), msg.get("message"), msg


class StreamClient:
    def __init__(self, url: str, token: str | None = None, origin: str | None = None):
        self.url, self.token, self.origin = url, token, origin
        self.ws = None
        self.welcome: dict | None = None
        self.messages: list[dict] = []          # everything the server sent, in order
        self.last_stats: dict | None = None
        self.frames: list[tuple[float, int]] = []   # (arrival monotonic time, pts) of every decoded frame
        self.last_frame = None                  # the latest av.VideoFrame
        self.pc: RTCPeerConnection | None = None
        self._ids = itertools.count(1)
        self._waiters: list[tuple[Callable[[dict], bool], asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()
        self.connected_at: float | None = None

    # ---- connection

    async def connect(self, timeout: float = 60.0) -> dict:
        """Open the websocket and wait for `welcome`; raises ServerError if the server refuses."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self.connected_at = time.monotonic()
        self.ws = await websockets.connect(self.url, additional_headers=headers, origin=self.origin,
                                           max_size=2**22, open_timeout=timeout)
        self._spawn(self._read())
        first = await self.wait_for(lambda m: m["type"] in ("welcome", "error"), timeout)
        if first["type"] == "error":
            raise ServerError(first)
        self.welcome = first
        return first

    async def close(self) -> None:
        if self.pc is not None:
            await self.pc.close()
        if self.ws is not None:
            await self.ws.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self):
        await self.connect()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # ---- messages

    async def send(self, msg: dict | str) -> None:
        await self.ws.send(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))

    async def request(self, msg: dict, timeout: float = 30.0) -> dict:
        """Send a message with a fresh id and wait for the reply with that id; ServerError if it is an error."""
        msg = dict(msg)
        msg.setdefault("id", f"r{next(self._ids)}")
        waiter = self._waiter(lambda m: m.get("id") == msg["id"] and m["type"] != "stats")
        await self.send(msg)
        reply = await asyncio.wait_for(waiter, timeout)
        if reply["type"] == "error":
            raise ServerError(reply)
        return reply

    async def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 30.0,
                       past: bool = True) -> dict:
        """The first message (already received if past=True, else future) for which predicate() is true."""
        if past:
            for m in self.messages:
                if predicate(m):
                    return m
        return await asyncio.wait_for(self._waiter(predicate), timeout)

    def errors(self) -> list[dict]:
        return [m for m in self.messages if m["type"] == "error"]

    def _waiter(self, predicate) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, fut))
        return fut

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                self.messages.append(msg)
                if msg["type"] == "stats":
                    self.last_stats = msg
                for pred, fut in list(self._waiters):
                    if not fut.done() and pred(msg):
                        fut.set_result(msg)
                self._waiters = [(p, f) for p, f in self._waiters if not f.done()]
        except websockets.ConnectionClosed:
            pass
        finally:
            for _, fut in self._waiters:
                if not fut.done():
                    fut.set_exception(ConnectionError("the server closed the websocket"))

    # ---- video

    async def start_video(self, timeout: float = 30.0) -> None:
        """Negotiate a receive-only video connection; decoded frames are recorded in `frames`."""
        pc = self.pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")

        @pc.on("track")
        def on_track(track):
            self._spawn(self._consume(track))

        await pc.setLocalDescription(await pc.createOffer())     # aiortc gathers ICE candidates here
        answer = await self.request({"type": "offer", "sdp": pc.localDescription.sdp}, timeout)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))

    async def _consume(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                self.frames.append((time.monotonic(), frame.pts))
                self.last_frame = frame
        except MediaStreamError:
            pass

    async def wait_frames(self, n: int, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while len(self.frames) < n:
            if time.monotonic() > end:
                raise TimeoutError(f"{len(self.frames)} of {n} frames after {timeout} s")
            await asyncio.sleep(0.05)

    def fps(self, since: float | None = None, until: float | None = None) -> float:
        """Decoded frames per second of arrival time in [since, until] (default: first to last frame)."""
        times = [t for t, _ in self.frames if (since is None or t >= since) and (until is None or t <= until)]
        if since is not None and until is not None:
            return len(times) / (until - since)
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
