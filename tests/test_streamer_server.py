"""The server end to end over loopback: real websocket protocol, real aiortc WebRTC, the real engine (tiny).

On 2 shared CPU cores the tiny preset generates at roughly real time for one session and slower for several.
The tests therefore hold the *pacing* contract (frames leave at 16 FPS on exact 90 kHz timestamps; when
generation is behind the last frame is repeated and counted), not a generation speed.
"""

import asyncio
import gc
import json
import os
import threading
import urllib.error
import urllib.request

import av
import numpy as np
import pytest
import websockets

from streamer.client import ServerError, StreamClient
from streamer.config import ServerConfig
from streamer.protocol import Limits
from aiortc import RTCPeerConnection

from packcache import GenerationSession

from streamer.server import BackgroundServer, ClientConnection
from streamer.session import StreamSession
from streamer.track import PacedVideoTrack

MAX_SESSIONS = 2


@pytest.fixture(scope="module")
def server(tiny_generator, tmp_path_factory):
    config = ServerConfig(port=0, max_sessions=MAX_SESSIONS, record_dir=str(tmp_path_factory.mktemp("rec")))
    with BackgroundServer(config, tiny_generator) as bg:
        yield bg


@pytest.fixture
def idle(server):
    """Each test starts and ends with no session on the server."""
    wait_until(lambda: not server.server.live_sessions())
    yield server
    wait_until(lambda: not server.server.live_sessions())


def wait_until(cond, timeout=15.0):
    import time
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


async def poll(cond, timeout=15.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


async def test_stream_holds_16fps_prompt_ack_pause_resume(idle):
    bg = idle
    async with StreamClient(bg.server.ws_url) as c:
        assert c.welcome["version"] == 1 and c.welcome["fps"] == 16 and c.welcome["preset"] == "tiny"
        await c.start_video()
        await c.wait_frames(1, timeout=30)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        chunk0 = c.last_stats["chunk_index"] if c.last_stats else 0
        await asyncio.sleep(5.5)
        t1 = loop.time()

        # Pacing over the test's own observed window (load-robust: the machine may be shared). Timestamps are
        # exact multiples of 5,625 ticks and never repeat or burst; the slot clock matches the wall clock; a
        # sender held up by load skips slots (counted) rather than bursting; most frames arrive on time.
        window = [pts for t, pts in c.frames if t0 <= t <= t1]
        steps = np.diff(window)
        assert len(steps) and all(d > 0 and d % 5625 == 0 for d in steps.tolist())
        assert abs((window[-1] - window[0]) / 90000 - (t1 - t0)) <= 0.15 * (t1 - t0)
        assert (steps == 5625).mean() >= 0.8
        assert 16 * 0.75 <= c.fps(t0, t1) <= 16 * 1.1
        stats = await c.wait_for(lambda m: m["type"] == "stats", past=False)
        assert 11 <= stats["fps_sent"] <= 17 and stats["state"] == "playing"
        assert stats["chunk_index"] > chunk0                              # chunks were generated meanwhile...
        # ...and the event loop stayed on time: generation runs off the loop, so the loop's worst lateness stays
        # well under one chunk's compute time (what it would be if a chunk ran on the loop)
        assert bg.server.loop_lag(window=t1 - t0) < max(0.1, 0.5 * stats["seconds_per_chunk"])
        for key in ("rtf", "buffer_frames", "repeated_frames", "chunk_latency_p50"):
            assert key in stats
        assert {"sink", "mid", "recent"} <= set(stats["cache"]["partitions"])
        assert stats["cache"]["kv_bytes"] > 0
        assert stats["frames_sent"] >= len(window)
        # honest about speed: repeats are counted (0 when generation keeps up)
        assert 0 <= stats["repeated_frames"] <= stats["frames_sent"]

        # a prompt update is acknowledged with the chunk where it takes effect, then shows up in stats
        ack = await c.request({"type": "prompt", "text": "a green square", "transition": "recache"})
        assert ack["for"] == "prompt" and ack["effective_chunk"] >= stats["chunk_index"]
        shown = await c.wait_for(lambda m: m["type"] == "stats" and m["prompt"] == "a green square"
                                 and m["chunk_index"] > ack["effective_chunk"], timeout=30, past=False)
        assert shown["pending_prompt"] is None or shown["pending_prompt"]["text"] == "a green square"

        # pause stops frame production; resume restarts it
        await c.request({"type": "pause"})
        await asyncio.sleep(0.3)
        n, chunk = len(c.frames), c.last_stats["chunk_index"]
        await asyncio.sleep(1.2)
        assert len(c.frames) - n <= 1
        paused = c.last_stats
        assert paused["state"] == "paused" and paused["chunk_index"] <= chunk + 1
        await c.request({"type": "resume"})
        await c.wait_frames(len(c.frames) + 12, timeout=10)               # frames flow again
        assert c.errors() == []


async def test_bad_input_gets_errors_and_the_stream_goes_on(idle):
    bg = idle
    async with StreamClient(bg.server.ws_url) as c:
        await c.start_video()
        await c.wait_frames(5, timeout=30)
        bad = {
            "b1": ("{nope", "bad_json"),
            "b2": ({"type": "warp"}, "unknown_type"),
            "b3": ({"type": "prompt"}, "missing_field"),
            "b4": ({"type": "prompt", "text": "x", "transition": "wipe"}, "bad_value"),
            "b5": ({"type": "prompt", "text": "y" * 501}, "prompt_too_long"),
            "b6": ({"type": "prompt", "text": "esc\x1b[31m"}, "bad_value"),
            "b7": ({"type": "offer", "sdp": "v=0\r\nthis is not sdp\r\n"}, "bad_sdp"),
            "b8": ({"type": "prompt", "text": "z" * 70_000}, "too_large"),
            "b9": ({"type": "reset", "seed": "seven"}, "bad_value"),
        }
        for mid, (msg, _) in bad.items():
            text = msg if isinstance(msg, str) else json.dumps(dict(msg, id=mid))
            await c.send(text)
        await c.send(b"\x00\x01binary")
        await poll(lambda: len(c.errors()) >= len(bad) + 1)
        got = {e["id"]: e["code"] for e in c.errors() if e["id"] is not None}
        unnamed = sorted(e["code"] for e in c.errors() if e["id"] is None)
        assert unnamed == ["bad_image", "bad_json"]    # unparsed: no id (binary = a picture); b8 is parsed, keeps its id
        for mid, (msg, code) in bad.items():
            if not (isinstance(msg, str) or mid == "b8"):
                assert got[mid] == code, (mid, got)
        assert all(not e["fatal"] and e["message"] for e in c.errors())

        # a prompt flood is rate limited; the first few are accepted
        for i in range(12):
            await c.send({"type": "prompt", "text": f"flood {i}", "id": f"f{i}"})
        await poll(lambda: sum(m.get("id", "") in {f"f{i}" for i in range(12)} for m in c.messages) == 12)
        flood = [m for m in c.messages if str(m.get("id", "")).startswith("f")]
        assert sum(m["type"] == "ack" for m in flood) >= 4
        assert sum(m.get("code") == "rate_limited" for m in flood) >= 4

        # ... and the session keeps streaming and answering (rate over the observed time, with a load margin)
        loop = asyncio.get_running_loop()
        n, t = len(c.frames), loop.time()
        await asyncio.sleep(1.5)
        assert (len(c.frames) - n) / (loop.time() - t) >= 16 * 0.6
        await asyncio.sleep(1.0)                                          # let the prompt bucket refill
        ack = await c.request({"type": "prompt", "text": "after the storm"})
        assert ack["effective_chunk"] >= 0
        assert (await c.request({"type": "ping"}))["type"] == "pong"


async def test_oversized_beyond_hard_limit_closes_with_1009(idle):
    async with StreamClient(idle.server.ws_url) as c:
        await c.send("x" * (Limits().hard_max_message_bytes + 1))
        await asyncio.wait_for(c.ws.wait_closed(), 10)
        assert c.ws.close_code == 1009


async def test_max_sessions_plus_one_is_busy(idle):
    bg = idle
    clients = [StreamClient(bg.server.ws_url) for _ in range(MAX_SESSIONS)]
    try:
        for c in clients:
            await c.connect()
        extra = StreamClient(bg.server.ws_url)
        with pytest.raises(ServerError) as refused:
            await extra.connect()
        assert refused.value.code == "busy" and refused.value.msg["fatal"]
        await asyncio.wait_for(extra.ws.wait_closed(), 5)
        assert extra.ws.close_code == 1013
        await clients[0].close()
        await poll(lambda: len(bg.server.clients) < MAX_SESSIONS)
        again = StreamClient(bg.server.ws_url)
        await again.connect()                                             # a freed slot is usable at once
        await again.close()
    finally:
        for c in clients:
            await c.close()


async def test_token_and_origin_are_enforced(idle):
    cfg = idle.server.config
    cfg.token = "s3cret"
    try:
        with pytest.raises(ServerError) as e:
            await StreamClient(idle.server.ws_url).connect()
        assert e.value.code == "unauthorized"
        with pytest.raises(ServerError) as e:
            await StreamClient(idle.server.ws_url, token="wrong").connect()
        assert e.value.code == "unauthorized"
        c = StreamClient(idle.server.ws_url + "?token=s3cret")
        await c.connect()
        await c.close()
        c = StreamClient(idle.server.ws_url, token="s3cret", origin=f"http://127.0.0.1:{idle.server.port}")
        await c.connect()                                                 # same origin is fine
        await c.close()
        with pytest.raises(ServerError) as e:
            await StreamClient(idle.server.ws_url, token="s3cret", origin="http://evil.example").connect()
        assert e.value.code == "forbidden_origin"
        cfg.allowed_origins = ("http://evil.example",)
        c = StreamClient(idle.server.ws_url, token="s3cret", origin="http://evil.example")
        await c.connect()
        await c.close()
    finally:
        cfg.token, cfg.allowed_origins = None, ()


async def test_healthz_metrics_and_static_files(idle):
    base = idle.server.url
    status, ctype, body = await asyncio.to_thread(http_get, base + "healthz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, ctype, body = await asyncio.to_thread(http_get, base)
    assert status == 200 and ctype.startswith("text/html") and b"app.js" in body
    for name in ("app.js", "style.css"):
        assert (await asyncio.to_thread(http_get, base + name))[0] == 200
    assert (await asyncio.to_thread(http_get, base + "..%2Fpyproject.toml"))[0] == 404
    status, ctype, body = await asyncio.to_thread(http_get, base + "metrics")
    text = body.decode()
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    for name in ("streamer_sessions ", "streamer_chunks_total ", "streamer_frames_sent_total ",
                 "streamer_chunk_latency_seconds_bucket", "streamer_realtime_factor ", "streamer_ready 1"):
        assert name in text


async def test_recording_is_playable_while_running_and_closed_on_disconnect(idle):
    bg = idle
    c = StreamClient(bg.server.ws_url)
    await c.connect()
    ack = await c.request({"type": "record", "action": "start"})
    path = os.path.join(bg.server.config.record_dir, ack["file"])
    await c.start_video()
    await c.wait_frames(40, timeout=40)
    await poll(lambda: decodable(path) >= 16, timeout=20)                # fragmented MP4: readable mid-stream
    generated = (await c.wait_for(lambda m: m["type"] == "stats", past=False))["frames_generated"]
    await c.close()                                                       # the client just goes away
    await poll(lambda: not bg.server.live_sessions())
    with av.open(path) as f:                                              # closed properly: fully decodable
        frames = sum(1 for _ in f.decode(video=0))
        assert f.streams.video[0].average_rate == 16
    assert frames >= generated                                            # played + buffered, nothing lost


def decodable(path):
    try:
        with av.open(path) as f:
            return sum(1 for _ in f.decode(video=0))
    except (av.error.InvalidDataError, OSError):
        return 0


async def test_connect_disconnect_cycles_leave_nothing_behind(idle):
    bg = idle

    async def server_tasks():
        return len(asyncio.all_tasks())

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    tasks0, threads0 = bg.call(server_tasks()), threading.active_count()
    rss = []
    for i in range(50):
        c = StreamClient(bg.server.ws_url)
        await c.connect()
        if i % 5 == 0:
            await c.start_video()                                         # a peer connection too, every 5th
        await c.close()
        if i in (19, 49):                                                 # the allocator settles in ~20 cycles
            await poll(lambda: not bg.server.live_sessions())
            gc.collect()
            rss.append(rss_mb())
    await poll(lambda: not bg.server.live_sessions())
    await asyncio.sleep(0.5)
    gc.collect()
    assert bg.server.worker.queued() == 0
    assert bg.call(server_tasks()) <= tasks0
    assert threading.active_count() <= threads0 + 2                      # executor threads may linger
    # nothing of any session survives: ours, aiortc's, the engine's (its cache tensors go with it)
    kinds = (StreamSession, ClientConnection, PacedVideoTrack, RTCPeerConnection, GenerationSession)
    live = [type(o).__name__ for o in gc.get_objects() if isinstance(o, kinds)]
    assert live == []
    # RSS is a coarse second check: glibc arenas and aiortc's codecs move it by tens of MB either way, while
    # a leaked session per cycle would add its buffers and peer connection state every time
    assert rss[1] - rss[0] < 80, rss
    assert bg.server.metrics.sessions_total.value() >= 50


async def test_silent_client_and_idle_session_are_ended(tiny_generator):
    config = ServerConfig(port=0, ping_interval=0.5, ping_timeout=0.5, record_dir=None,
                          limits=Limits(idle_timeout=1.0))
    with BackgroundServer(config, tiny_generator) as bg:
        silent = await websockets.connect(bg.server.ws_url)
        await asyncio.sleep(0.3)
        silent.transport.pause_reading()                                  # vanishes: no pong ever again
        await poll(lambda: not bg.server.live_sessions(), timeout=5)
        silent.transport.close()

        c = StreamClient(bg.server.ws_url)                                # connects, never offers, stays quiet
        await c.connect()
        err = await c.wait_for(lambda m: m["type"] == "error", timeout=6)
        assert err["code"] == "idle_timeout" and err["fatal"]
        await c.close()


async def test_shutdown_tells_clients_and_frees_sessions(tiny_generator):
    bg = BackgroundServer(ServerConfig(port=0, record_dir=None), tiny_generator).start()
    c = StreamClient(bg.server.ws_url)
    await c.connect()
    await c.start_video()
    await c.wait_frames(3, timeout=30)
    await asyncio.to_thread(bg.stop)
    err = await c.wait_for(lambda m: m["type"] == "error", timeout=5)
    assert err["code"] == "shutting_down"
    await asyncio.wait_for(c.ws.wait_closed(), 5)
    assert c.ws.close_code == 1001 and not bg.server.live_sessions()
    await c.close()


async def test_dropped_websocket_can_resume_the_same_session(tiny_generator):
    config = ServerConfig(port=0, reconnect_grace=5.0, record_dir=None)   # 2 s ran out under load before c2
    with BackgroundServer(config, tiny_generator) as bg:
        c1 = StreamClient(bg.server.ws_url)
        await c1.connect()
        sid, key = c1.welcome["session"], c1.welcome["resume_key"]
        await c1.start_video()
        await c1.wait_frames(10, timeout=30)
        before = (await c1.wait_for(lambda m: m["type"] == "stats", past=False))["chunk_index"]
        c1.ws.transport.abort()                                           # network drop: no close frame
        await c1.close()
        await poll(lambda: sid in bg.server.clients and bg.server.clients[sid].detached_at is not None)

        wrong = StreamClient(bg.server.ws_url + f"?resume={sid}&key=guess")
        assert (await wrong.connect())["session"] != sid                  # a wrong key gets a new session
        await wrong.close()

        c2 = StreamClient(bg.server.ws_url + f"?resume={sid}&key={key}")
        welcome = await c2.connect()
        assert welcome["resumed"] and welcome["session"] == sid and welcome["chunk_index"] >= before
        await c2.start_video()
        await c2.wait_frames(5, timeout=30)
        after = await c2.wait_for(lambda m: m["type"] == "stats" and m["chunk_index"] > before, timeout=30)
        assert after["session"] == sid                                    # the same stream went on
        c2.ws.transport.abort()
        await c2.close()
        await poll(lambda: not bg.server.live_sessions(), timeout=10)     # no resume within the grace: freed

        c3 = StreamClient(bg.server.ws_url)
        await c3.connect()
        await c3.close()                                                  # a clean goodbye ends it at once
        await poll(lambda: not bg.server.live_sessions(), timeout=1.5)
