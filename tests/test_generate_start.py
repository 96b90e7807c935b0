"""`python -m packcache.generate --start picture.png` writes a video that starts from a picture."""

import subprocess
import sys

import av
import numpy as np
from PIL import Image


def test_writes_a_video_from_a_picture_with_no_prompt(tmp_path):
    pic, out = tmp_path / "start.png", tmp_path / "v.mp4"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 96, 3), np.uint8)).save(pic)
    r = subprocess.run([sys.executable, "-m", "packcache.generate", "--preset", "tiny", "--seconds", "1",
                        "--start", str(pic), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    with av.open(str(out)) as c:
        frames = list(c.decode(video=0))
    assert len(frames) == 16 and (frames[0].width, frames[0].height) == (64, 64)


def test_bad_start_files_are_one_line(tmp_path, capsys):
    from packcache.generate import main

    (tmp_path / "x.png").write_bytes(b"not a picture")
    (tmp_path / "x.mp4").write_bytes(b"not a video")
    for name, needle in [("missing.png", "no such file"), ("x.png", "not a picture"), ("x.mp4", "cannot read")]:
        assert main(["--preset", "tiny", "--start", str(tmp_path / name), "--out", str(tmp_path / "a.mp4")]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    assert main(["--preset", "tiny", "--out", str(tmp_path / "a.mp4")]) == 2      # no prompt and no picture
    assert "only when a start image" in capsys.readouterr().err
