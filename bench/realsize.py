"""Real-size speed and memory: the Wan2.1-T2V-1.3B architecture with random weights (speed does not depend on
weight values), full Wan VAE, 832x480, on a GPU. The DESIGN's anchors: Self-Forcing ~17 FPS and ~0.7 s to the
first frame on one H100; LongLive ~20 FPS.

    python -m bench.realsize --device cuda --chunks 40                 # packed, window and full side by side
    python -m bench.realsize --preset tiny --device cpu --chunks 3     # smoke test of the script itself

The umT5-XXL text encoder is replaced by a one-layer random umT5 of the same width (4096): the prompt is encoded
once per prompt, off the per-chunk path, so it does not change the numbers measured here.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import torch
from tqdm import tqdm

from packcache import Generator
from packcache.presets import get_preset, register_preset


def random_weights_preset(name: str) -> str:
    base = get_preset(name)
    bench = replace(base, name=f"{name}-random", weights=None,
                    text=replace(base.text, kind="tiny", tiny_layers=1, tiny_heads=32 if base.text.dim >= 4096
                                 else base.text.tiny_heads))
    register_preset(bench)
    return bench.name


def measure(gen: Generator, cache: str, chunks: int, decode: bool = True) -> dict:
    """decode=False steps with `advance()`: the transformer and the cache alone, no VAE decode (window/full only:
    the packed cache's LR branch decodes anyway)."""
    cuda = gen.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with gen.open("a red panda eating bamboo in a snowy forest", seed=0, cache=cache) as s:
        step = s.next_chunk if decode else s.advance
        step()
        if cuda:
            torch.cuda.synchronize()
        ttff = time.perf_counter() - t0
        first = s.stats()["frames"]
        t1 = time.perf_counter()
        for _ in tqdm(range(chunks - 1), desc=cache, unit="chunk", file=sys.stderr):
            step()
        if cuda:
            torch.cuda.synchronize()
        steady = time.perf_counter() - t1
        st = s.stats()
    later = st["frames"] - first
    return {
        "cache": cache if decode else f"{cache}, no VAE", "ttff": ttff, "fps": later / steady if steady else float("nan"),
        "s_per_chunk": steady / max(1, chunks - 1), "kv_gb": st["kv_bytes"] / 1e9,
        "attended": st["attended_tokens"],
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.realsize", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan2.1-t2v-1.3b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--compression", default="lr", choices=("hr+lr", "hr", "lr", "pool"))
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--caches", nargs="+", default=["packed", "window", "full"])
    ap.add_argument("--no-vae-row", action="store_true",
                    help="add a row for the window cache without VAE decode: where the time goes")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for --device cpu (default: cores - 1, see packcache/threads.py)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        from packcache.threads import set_threads
        set_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    gen = Generator.from_preset(random_weights_preset(args.preset), device=args.device, dtype=dtype,
                                compression=args.compression)
    warm = gen.warmup()
    device = torch.cuda.get_device_name() if gen.device.type == "cuda" else "cpu"
    print(f"{args.preset} random weights, {gen.preset.width}x{gen.preset.height}, {device}, {gen.dtype}, "
          f"warm-up {warm:.1f} s, {args.chunks} chunks per cache")
    print(f"{'cache':<15} {'first frame s':>14} {'FPS':>7} {'s/chunk':>8} {'attended':>9} {'KV GB':>7} {'peak GB':>8}")
    runs = [(cache, True) for cache in args.caches] + ([("window", False)] if args.no_vae_row else [])
    for cache, decode in runs:
        r = measure(gen, cache, args.chunks, decode)
        print(f"{r['cache']:<15} {r['ttff']:>14.2f} {r['fps']:>7.1f} {r['s_per_chunk']:>8.3f} {r['attended']:>9,} "
              f"{r['kv_gb']:>7.2f} {r['peak_gb']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
