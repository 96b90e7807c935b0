"""`python -m packcache.generate` writes a playable MP4 and turns user mistakes into one line."""

import subprocess
import sys

import av


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "packcache.generate", *args], capture_output=True, text=True,
                          timeout=600)


def test_writes_a_playable_mp4_with_a_prompt_switch(tmp_path):
    out = tmp_path / "clip.mp4"
    r = run_cli("--preset", "tiny", "--seconds", "1", "--prompt", "a red circle",
                "--switch", "0.5:a blue square:recache", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "frame" in r.stderr          # progress bar on stderr
    with av.open(str(out)) as c:
        stream = c.streams.video[0]
        frames = list(c.decode(video=0))
    assert len(frames) == 16 and stream.average_rate == 16
    assert (frames[0].width, frames[0].height) == (64, 64)


def test_user_mistakes_are_one_line_not_a_traceback(tmp_path, capsys):
    from packcache.generate import main

    r = run_cli("--model-dir", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "a.mp4"))
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    for args, needle in [
        (["--preset", "nope", "--prompt", "x", "--out", str(tmp_path / "a.mp4")], "known presets"),
        (["--preset", "tiny", "--prompt", "x", "--out", str(tmp_path / "a.avi")], ".mp4"),
        (["--preset", "tiny", "--prompt", "x", "--checkpoint", "w.pt", "--out", str(tmp_path / "a.mp4")], "--model-dir"),
        (["--preset", "tiny", "--prompt", "x", "--out", "/proc/no/such/dir/a.mp4"], "error:"),
    ]:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
