"""The sessions benchmark script itself at the tiny preset on the CPU: a batched and a serial row per session
count, in the JSON fields the issue names, and a PNG."""

import json

import pytest

from bench.sessions import main


def test_sessions_bench_writes_rows_and_plot(tmp_path, capsys):
    out, png = tmp_path / "rows.json", tmp_path / "plot.png"
    assert main(["--preset", "tiny", "--sessions", "1,2", "--rounds", "1", "--warm", "0", "--threads", "1",
                 "--json", str(out), "--plot", str(png)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["sessions"], r["mode"]) for r in rows] == [(1, "batched"), (1, "serial"), (2, "batched"),
                                                          (2, "serial")]
    for r in rows:
        assert {"device", "preset", "sessions", "mode", "aggregate_fps", "per_session_fps", "p50_s",
                "p95_s"} <= set(r)
        assert r["device"] == "cpu" and r["preset"] == "tiny"
        assert r["aggregate_fps"] >= r["per_session_fps"] > 0 and r["p95_s"] >= r["p50_s"] > 0
        assert r["chunks"] == r["sessions"]
    assert png.stat().st_size > 0 and "batched/serial" in capsys.readouterr().out


def test_sessions_bench_with_the_taehv_decoder(tmp_path):
    """--decoder taehv (random weights in the published layout): its rows say so, and the batched row is one pass."""
    out = tmp_path / "rows.json"
    assert main(["--preset", "tiny", "--sessions", "2", "--rounds", "1", "--warm", "0", "--threads", "1",
                 "--decoder", "taehv", "--json", str(out), "--plot", ""]) == 0
    rows = json.loads(out.read_text())
    assert [(r["sessions"], r["mode"], r["decoder"]) for r in rows] == [(2, "batched", "taehv"),
                                                                      (2, "serial", "taehv")]
    assert all(r["device"] == "cpu" and r["aggregate_fps"] > 0 for r in rows)


def test_sessions_bench_refuses_bad_arguments():
    with pytest.raises(SystemExit) as e:
        main(["--sessions", "0,2"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", "--taehv-weights", "x.pth"])
    assert e.value.code == 2
