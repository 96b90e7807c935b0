"""--state-dir: a real server process is stopped with SIGTERM between chunks, a new one starts on the same state
dir, the client resumes with its session id and key, and the stream continues bit for bit. Frames are compared
through the engine (WebRTC video is lossy): the unplayed frames each shutdown saved, and the state the second
server reached, against a reference session that never stopped (same seed, prompts and switch chunk)."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from packcache import snapshot_info, snapshot_tensors
from streamer.client import StreamClient

ROOT = Path(__file__).resolve().parent.parent
P0, P1 = "a red circle bouncing", "a green square sliding"
SEED = 7


class ServerProcess:
    """run_server.py in a child process; its log is collected on a thread so the pipe never fills."""

    def __init__(self, state_dir: Path):
        args = [sys.executable, str(ROOT / "run_server.py"), "--preset", "tiny", "--port", "0", "--device", "cpu",
                "--cpu-threads", "1", "--record-dir", "", "--state-dir", str(state_dir), "--reconnect-grace", "120",
                "--seed", str(SEED), "--prompt", P0, "--chunks-ahead", "2"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def url(self, timeout=300.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.lines:
                if line.startswith("ready: open "):
                    return line.split("open ")[1].split()[0].replace("http://", "ws://") + "ws"
            assert self.proc.poll() is None, "\n".join(self.lines[-30:])
            time.sleep(0.1)
        raise TimeoutError("the server never became ready:\n" + "\n".join(self.lines[-30:]))

    def terminate(self, timeout=120.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return "\n".join(self.lines)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def _watch(url: str, until_chunk: int, switch_at: int | None = None) -> tuple[dict, int | None]:
    """Connect (or resume), start video, optionally switch prompts, return once `until_chunk` chunks exist."""
    c = StreamClient(url)
    await c.connect()
    effective = None
    try:
        await c.start_video()
        while True:
            s = await c.wait_for(lambda m: m["type"] == "stats", timeout=120, past=False)
            if switch_at is not None and effective is None and s["chunk_index"] >= switch_at:
                ack = await c.request({"type": "prompt", "text": P1, "transition": "blend", "blend_chunks": 4})
                effective = ack["effective_chunk"]
            if s["chunk_index"] >= until_chunk and (switch_at is None or effective is not None):
                return c, effective
    except BaseException:
        await c.close()
        raise


def _check_saved_frames(path: Path, reference: list[np.ndarray]) -> None:
    """The frames a shutdown saved (generated, not yet played) are exactly the reference's frames there."""
    info = snapshot_info(path)
    buffer = info.extra["stream"]["buffer"]
    frames = snapshot_tensors(path)["frames"].numpy()
    assert buffer and len(frames) == sum(c["frames"] for c in buffer)
    start = 0
    for c in buffer:
        ref = reference[c["index"]]
        np.testing.assert_array_equal(frames[start:start + c["frames"]], ref[len(ref) - c["frames"]:])
        start += c["frames"]


def test_sigterm_saves_sessions_and_a_new_server_continues_them(tiny_generator, tmp_path):
    state, keep = tmp_path / "state", tmp_path / "kept"
    keep.mkdir()
    first = ServerProcess(state)
    second = None
    try:
        async def part_one():
            c, effective = await _watch(first.url(), until_chunk=4, switch_at=2)
            sid, key = c.welcome["session"], c.welcome["resume_key"]
            assert first.terminate() == 0          # SIGTERM: save every live session, then exit
            err = await c.wait_for(lambda m: m["type"] == "error", timeout=30)
            await c.close()
            return sid, key, effective, err
        sid, key, effective, err = asyncio.run(part_one())
        assert err["code"] == "shutting_down" and "saved" in err["message"]
        assert "saved session 1/1: " + sid in first.log()
        snap1 = state / f"{sid}.snapshot.safetensors"
        shutil.copy(snap1, keep / "one.snapshot.safetensors")
        n1 = snapshot_info(snap1).chunk_index

        second = ServerProcess(state)
        url = second.url()
        assert f"restored session {sid} at chunk {n1}" in second.log()

        async def part_two():
            wrong = StreamClient(url + f"?resume={sid}&key=guess")    # a wrong key starts a new session
            assert (await wrong.connect())["resumed"] is False
            await wrong.close()
            c, _ = await _watch(url + f"?resume={sid}&key={key}", until_chunk=n1 + 2)
            welcome = c.welcome
            assert not (state / f"{sid}.snapshot.safetensors").exists()   # deleted once resumed
            assert second.terminate() == 0
            await c.close()
            return welcome
        welcome = asyncio.run(part_two())
        assert welcome["resumed"] and welcome["session"] == sid and welcome["chunk_index"] == n1
        assert welcome["prompt"] == P1
        snap2 = state / f"{sid}.snapshot.safetensors"
        n2 = snapshot_info(snap2).chunk_index
        assert n2 >= n1 + 2
    finally:
        first.kill()
        if second is not None:
            second.kill()

    # the never-stopped reference: same preset weights, seed, prompt and switch chunk
    with tiny_generator.open(P0, seed=SEED) as ref:
        reference = []
        for i in range(n2 + 1):
            if i == effective:
                ref.set_prompt(P1, transition="blend", blend_chunks=4)
            reference.append(ref.next_chunk())
    _check_saved_frames(keep / "one.snapshot.safetensors", reference)
    _check_saved_frames(snap2, reference)
    with tiny_generator.restore(snap2) as s:           # the state the second server reached
        np.testing.assert_array_equal(s.next_chunk(), reference[n2])


def test_state_dir_needs_reconnect_grace():
    out = subprocess.run([sys.executable, str(ROOT / "run_server.py"), "--state-dir", "/tmp/x", "--port", "0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "reconnect_grace" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_unusable_snapshots_are_deleted_at_start(tiny_generator, tmp_path):
    """A corrupted file and one of another model are reported and removed; the server still starts."""
    from streamer.config import ServerConfig
    from streamer.server import BackgroundServer

    state = tmp_path / "state"
    state.mkdir()
    (state / "aaaa.snapshot.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    (state / "bbbb.snapshot.safetensors.tmp123").write_bytes(b"partial")
    config = ServerConfig(port=0, reconnect_grace=5.0, record_dir=None, state_dir=str(state))
    with BackgroundServer(config, tiny_generator) as bg:
        assert bg.server.ready and not bg.server.clients
    assert list(state.iterdir()) == []


def test_restored_session_expires_and_its_file_goes(tiny_generator, tmp_path):
    """A saved session nobody resumes: restored at start, ended after the grace, its file deleted."""
    from streamer.config import ServerConfig
    from streamer.server import BackgroundServer

    state = tmp_path / "state"
    config = ServerConfig(port=0, reconnect_grace=1.0, record_dir=None, state_dir=str(state))
    with BackgroundServer(config, tiny_generator) as bg:
        async def watch_then_stop():
            c = StreamClient(bg.server.ws_url)
            await c.connect()
            await c.start_video()
            await c.wait_for(lambda m: m["type"] == "stats" and m["chunk_index"] >= 1, timeout=120, past=False)
            await bg.server.close()                    # what SIGTERM does: the session is saved
            await c.close()
        bg.call(watch_then_stop(), 180)
    assert len(list(state.glob("*.snapshot.safetensors"))) == 1
    with BackgroundServer(config, tiny_generator) as bg2:
        assert len(bg2.server.clients) == 1            # restored, detached, waiting for its client
        end = time.monotonic() + 30
        while bg2.server.clients and time.monotonic() < end:
            time.sleep(0.1)
        assert not bg2.server.clients
    assert list(state.iterdir()) == []
