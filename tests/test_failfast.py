"""Wrong arguments and environments end in one line before any model loads (run_server.py, packcache.generate)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
NO_GPU = not any(os.path.exists(d) for d in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd"))


def run(args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=ENV)


def one_line(r, needle):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "loading the model" not in r.stdout and "listening" not in r.stderr


def test_server_checks_port_device_model_folder_and_prompt_before_loading(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        one_line(run(["run_server.py", "--port", str(busy.getsockname()[1])]), "cannot listen on")
    (tmp_path / "transformer").mkdir()
    one_line(run(["run_server.py", "--port", "0", "--model-dir", str(tmp_path)]), "incomplete model folder")
    one_line(run(["run_server.py", "--port", "0", "--prompt", " \u200b "]), "starting prompt")
    if NO_GPU:
        one_line(run(["run_server.py", "--port", "0", "--device", "cuda"]), "no CUDA device")
    one_line(run(["run_server.py", "--port", "0", "--threads", "-1"]), "threads")


def test_generate_checks_everything_before_loading(tmp_path):
    out = str(tmp_path / "v.mp4")
    base = ["-m", "packcache.generate", "--preset", "tiny", "--seconds", "2"]
    cases = [
        (["--prompt", "", "--out", out], "prompt is empty"),
        (["--prompt", "x", "--switch", "1:y:wobble", "--out", out], "unknown transition 'wobble'"),
        (["--prompt", "x", "--switch", "5:later", "--out", out], "outside the video"),
        (["--prompt", "x", "--out", str(tmp_path / "missing" / "v.mp4")], "does not exist"),
        (["--prompt", "x", "--out", out, "--model-dir", str(tmp_path)], "incomplete model folder"),
    ]
    if NO_GPU:
        cases.append((["--prompt", "x", "--out", out, "--device", "cuda"], "no CUDA device"))
    for args, needle in cases:
        r = run(base + args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, r.stderr)
    assert not (tmp_path / "missing").exists() and not (tmp_path / "v.mp4").exists()


def test_switch_parsing_keeps_colons_in_prompts_when_told():
    from packcache.generate import parse_switch

    assert parse_switch("3:a cat: sitting:cut").text == "a cat: sitting"
    assert parse_switch("3:a dog:blend").transition == "blend"


def test_help_shows_the_defaults():
    out = run(["run_server.py", "--help"], timeout=120).stdout
    flat = " ".join(out.split())
    for needle in ("--seed SEED seed a new session starts with (default: 0)", "(default: 0.0)",
                   "--log-level {debug,info,warning,error}", "(default: info)", "--threads N"):
        assert needle in flat, needle
