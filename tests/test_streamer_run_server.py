"""run_server.py as a user runs it: --help, one-line errors, warm-up before ready, clean exit on SIGTERM."""

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from streamer.client import StreamClient

ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(ROOT / "run_server.py")]


def test_help_lists_every_option():
    out = subprocess.run(RUN + ["--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0
    for opt in ("--host", "--port", "--preset", "--model-dir", "--checkpoint", "--device", "--max-sessions",
                "--token", "--allowed-origin", "--log-level", "--record-dir", "--prompt", "--idle-timeout"):
        assert opt in out.stdout


def test_bad_arguments_fail_with_one_line():
    for args in (["--port", "http"], ["--max-sessions", "0"], ["--preset", "no-such-model", "--port", "0"],
                 ["--checkpoint", "/nonexistent.pt", "--port", "0"]):
        out = subprocess.run(RUN + args, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("run_server.py: error:"), (args, out.stderr)


def test_serves_after_warmup_and_sigterm_exits_cleanly(capsys, tiny_generator):
    """run_server's own serve() in this process (the model loads fast once torch is imported): SIGTERM
    tells the connected client, closes its peer connection and session, and returns 0."""
    import run_server

    args = run_server.build_parser().parse_args(
        ["--preset", "tiny", "--port", "0", "--record-dir", "", "--device", "cpu", "--log-level", "warning"])
    result = {}

    def client():                    # a viewer in another thread; SIGTERM once it receives video
        async def run():
            url, deadline = None, time.monotonic() + 120
            while url is None:
                assert time.monotonic() < deadline, "the server never printed its URL"
                await asyncio.sleep(0.1)
                url = next((line.split("open ")[1].split()[0] for line in printed if "open http" in line), None)
            async with StreamClient(url.replace("http", "ws") + "ws") as c:
                await c.start_video()
                await c.wait_frames(1, timeout=60)
                terminate()
                err = await c.wait_for(lambda m: m["type"] == "error", timeout=15)
                await asyncio.wait_for(c.ws.wait_closed(), 15)
                result["client"] = (err["code"], c.ws.close_code)
        try:
            asyncio.run(run())
        except BaseException as exc:  # noqa: BLE001
            result["client"] = exc
            terminate()                  # serve() must return either way (its handler is installed by now)

    sent = threading.Event()

    def terminate():                     # once: after serve() returns, SIGTERM would kill pytest itself
        if not sent.is_set():
            sent.set()
            os.kill(os.getpid(), signal.SIGTERM)

    printed = []
    real_print = print

    def tee(*a, **kw):
        printed.append(" ".join(map(str, a)))
        real_print(*a, **kw)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    run_server.print = tee
    try:
        code = asyncio.run(run_server.serve(args))
    finally:
        sent.set()                       # serve() is over: no more signals from the client thread
        del run_server.print
    assert code == 0
    thread.join(20)
    assert result["client"] == ("shutting_down", 1001)
    assert any(line.startswith("ready: open http://127.0.0.1:") for line in printed)
    assert printed[-1] == "shutting down…"
