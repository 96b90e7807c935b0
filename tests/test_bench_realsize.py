"""The real-size benchmark script itself, at the tiny preset on the CPU: one row per cache, plus the no-VAE row."""

import math

from bench.realsize import main


def test_realsize_prints_a_row_per_cache_and_the_no_vae_row(capsys):
    assert main(["--preset", "tiny", "--device", "cpu", "--chunks", "2", "--caches", "packed", "full",
                 "--no-vae-row"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:15].strip(): line[15:].split() for line in lines[2:]}
    assert set(rows) == {"packed", "full", "window, no VAE"}
    for cells in rows.values():
        ttff, fps, s_per_chunk = (float(c) for c in cells[:3])
        assert ttff > 0 and s_per_chunk > 0 and math.isfinite(fps) and fps > 0
