"""The real-size benchmark script itself, at the tiny preset on the CPU: the baseline row and one row per decoder,
printed, logged to --out as it runs, and written as JSON with the fields the issue lists."""

import json
import math

from bench.realsize import FIELDS, main


def test_realsize_rows_log_and_json(tmp_path, capsys):
    assert main(["--preset", "tiny", "--device", "cpu", "--chunks", "3", "--baseline-chunks", "2",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "realsize_cpu.json").read_text())
    assert [(r["decoder"], r["pipelined"]) for r in rows] == [("wan", False), ("wan", True), ("taehv", True)]
    for r in rows:
        assert set(FIELDS) <= set(r)
        assert r["device"] and r["torch"] and r["cache"] == "packed" and r["compiled"] is False
        assert r["attention"] == "sdpa" and r["chunks"] == (2 if not r["pipelined"] else 3)
        assert r["first_frame_s"] > 0 and math.isfinite(r["fps"]) and r["fps"] > 0
        assert r["ms_denoise"] > 0 and r["ms_commit"] > 0 and r["ms_decode"] > 0 and r["ms_compress"] > 0
        assert r["kv_gb"] > 0 and len(r["ms_chunk_wall"]) == r["chunks"] - 1
    log = (tmp_path / "realsize_cpu.log").read_text()
    for r in rows:                                   # every printed row is in the log file too
        line = next(l for l in out.splitlines() if l.startswith(r["decoder"]) and f" {r['chunks']:>6} " in l)
        assert line in log
    assert "attention backend: sdpa" in log           # the engine's log lines go to the file as well
