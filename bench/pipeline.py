"""Decode off the critical path on the CPU: `packcache.generate` real-time factor with --pipeline vs --no-pipeline,
with 0, 1 and 2 busy processes (`yes > /dev/null`) beside it, in one sitting.

    python -m bench.pipeline                              # toy preset, 30 s of video, hogs 0,1,2, 2 runs each
    python -m bench.pipeline --seconds 10 --hogs 1 --repeats 1 --extra=--threads=1

Each run is a fresh `python -m packcache.generate` process (its own "real-time factor" line: video seconds over the
generation loop's wall time, model loading excluded). The two variants alternate run by run (their order flips every
repeat), so load from the rest of the machine hits both alike; the 1-minute load average before each run is shown.
The hogs are started and stopped here, by their process ids.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle bouncing on a striped blue background"
VARIANTS = ("--pipeline", "--no-pipeline")


def loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def generate(seconds: float, variant: str, extra: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "packcache.generate", "--seconds", str(seconds), "--prompt", PROMPT,
           "--out", str(out), variant, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    m = re.search(r"real-time factor ([0-9.]+)", run.stdout)
    if run.returncode != 0 or m is None:
        raise SystemExit(f"generate failed ({run.returncode}): {run.stderr.strip().splitlines()[-1:]}")
    return float(m.group(1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="video length per run")
    ap.add_argument("--hogs", default="0,1,2", help="busy processes beside the runs, comma-separated counts")
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant and hog count")
    ap.add_argument("--extra", action="append", default=[], help="more packcache.generate arguments (repeatable)")
    ap.add_argument("--json", type=Path, default=None, help="also write the runs here")
    args = ap.parse_args(argv)
    hog_counts = [int(h) for h in args.hogs.split(",")]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for hogs in hog_counts:
            procs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(hogs)]
            try:
                time.sleep(1.0 if hogs else 0.0)
                for rep in range(args.repeats):
                    for variant in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):
                        load = loadavg()
                        rtf = generate(args.seconds, variant, args.extra, Path(tmp) / "v.mp4")
                        runs.append({"hogs": hogs, "variant": variant.lstrip("-"), "rtf": rtf, "load": load})
                        print(f"hogs {hogs}  {variant:14s} real-time factor {rtf:.2f}  (load {load:.1f})",
                              file=sys.stderr, flush=True)
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    p.wait()
    print(f"\npackcache.generate --seconds {args.seconds:g} {' '.join(args.extra)} (real-time factor per run; "
          f"{os.cpu_count()} cores)\n")
    print("| busy processes | pipeline | runs | median | load avg (1 min) |")
    print("| ---: | --- | --- | ---: | --- |")
    for hogs in hog_counts:
        for variant in ("pipeline", "no-pipeline"):
            rs = [r for r in runs if r["hogs"] == hogs and r["variant"] == variant]
            rtfs = ", ".join("%.2f" % r["rtf"] for r in rs)
            loads = ", ".join("%.1f" % r["load"] for r in rs)
            median = statistics.median(r["rtf"] for r in rs)
            print(f"| {hogs} | {'on' if variant == 'pipeline' else 'off'} | {rtfs} | {median:.2f} | {loads} |")
    if args.json:
        args.json.write_text(json.dumps({"seconds": args.seconds, "extra": args.extra, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
