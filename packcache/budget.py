"""Memory and attention budget of a preset's cache, read off the real cache allocated on the `meta` device.

    python -m packcache.budget --preset packforcing-paper --seconds 120
    python -m packcache.budget --preset wan2.1-t2v-1.3b --seconds 120 --chunk-frames 4
    python -m packcache.budget --sink-chunks 0 --selection fifo --compression lr      # the paper's ablations

Nothing here is a separate formula: the cache object the sessions use is built (without memory) and asked for its
partitions, so the printed numbers are what a session would allocate.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace

import torch

from .cache import BoundedKVCache, CacheGeometry
from .compress import block_grid
from .errors import PackCacheError
from .presets import Preset, get_preset
from .rope import Rope3D

GB = 1e9


@dataclass
class Budget:
    preset: str
    chunk_frames: int
    tokens_per_chunk: int
    tokens_per_block: int
    attended: dict[str, int]          # per layer: sink, mid (selected), recent, current, total
    bytes: dict[str, int]             # all layers: allocated buffers per partition
    active_kv_bytes: int              # sink + selected mid + recent K/V (the paper's "~4 GB")
    full_history_tokens: int
    full_history_bytes: int
    seconds: float
    selection: str = "topk"
    compression: str = "hr+lr"


def compute_budget(preset: Preset, seconds: float, dtype: torch.dtype = torch.bfloat16) -> Budget:
    t = preset.cache.chunk_frames
    ph, pw = preset.transformer.patch_size[1:]
    grid = (t, preset.latent_height // ph, preset.latent_width // pw)
    bgrid = block_grid(*grid)
    tc = preset.transformer
    geo = CacheGeometry(tc.num_layers, tc.num_attention_heads, tc.attention_head_dim, t, grid, bgrid)
    cache = BoundedKVCache(geo, preset.cache, Rope3D(tc.attention_head_dim), device="meta", dtype=dtype)
    n, nb = geo.chunk_tokens, geo.block_tokens
    attended = {
        "sink": cache.sink_chunks * n,
        "mid": cache.topk * nb,
        "recent": cache.recent_cap * n,
        "current": n,
    }
    attended["total"] = sum(attended.values())
    parts = {k: v["bytes"] for k, v in cache.stats().partitions.items()}
    # split the recent partition's buffer into full-res and compressed backups, and mid into active vs archive
    rec_full = cache.recent_k.numel() * cache.recent_k.element_size() * 2
    per_token_all_layers = 2 * tc.num_attention_heads * tc.attention_head_dim * tc.num_layers * torch.finfo(dtype).bits // 8
    active = (attended["sink"] + attended["mid"] + attended["recent"]) * per_token_all_layers
    bytes_ = {
        "sink": parts["sink"],
        "mid bank (capacity %d blocks + 1 spare)" % cache.mid_cap: parts.get("mid", 0),
        "recent (full-res)": rec_full,
        "recent (compressed backups)": parts["recent"] - rec_full,
        "attention workspace (one layer)": parts["workspace"],
    }
    fps = preset.fps
    latent_frames = math.ceil(seconds * fps / preset.vae.temporal_stride)
    full_tokens = latent_frames * grid[1] * grid[2]
    return Budget(preset.name, t, n, nb, attended, bytes_, active, full_tokens, full_tokens * per_token_all_layers,
                  seconds, preset.cache.selection, preset.compressor.mode)


def format_budget(b: Budget) -> str:
    lines = [
        f"preset {b.preset}: chunks of {b.chunk_frames} latent frames = {b.tokens_per_chunk:,} tokens; "
        f"compressed block = {b.tokens_per_block:,} tokens ({b.tokens_per_chunk / b.tokens_per_block:.1f}x fewer)",
        f"mid selection {b.selection}, compression {b.compression} (neither changes the sizes below)",
        "",
        "attended tokens per layer (constant for any length)",
    ]
    for k, v in b.attended.items():
        lines.append(f"  {k:<10} {v:>10,}")
    lines += ["", "K/V bytes (all layers, bf16), allocated once"]
    total = 0
    for k, v in b.bytes.items():
        total += v
        lines.append(f"  {k:<42} {v / GB:>8.3f} GB")
    lines.append(f"  {'total resident':<42} {total / GB:>8.3f} GB")
    lines += [
        "",
        f"active K/V (sink + selected mid + recent): {b.active_kv_bytes / GB:.3f} GB",
        f"full history at {b.seconds:g} s: {b.full_history_tokens:,} tokens = {b.full_history_bytes / GB:.1f} GB "
        f"({b.full_history_bytes / max(1, b.active_kv_bytes):.0f}x the active cache)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m packcache.budget", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="packforcing-paper")
    ap.add_argument("--seconds", type=float, default=120.0, help="stream length for the full-history comparison")
    ap.add_argument("--chunk-frames", type=int, help="override the preset's latent frames per chunk")
    ap.add_argument("--sink-chunks", type=int)
    ap.add_argument("--recent-chunks", type=int)
    ap.add_argument("--mid-topk", type=int)
    ap.add_argument("--mid-capacity", type=int)
    ap.add_argument("--selection", choices=("topk", "fifo"), help="mid-block selection (fifo: the paper's ablation)")
    ap.add_argument("--compression", choices=("hr+lr", "hr", "lr", "pool"), help="mid-block compressor mode")
    args = ap.parse_args(argv)
    try:
        preset = get_preset(args.preset)
        overrides = {k: getattr(args, k) for k in ("chunk_frames", "sink_chunks", "recent_chunks", "mid_topk",
                                                    "mid_capacity", "selection") if getattr(args, k) is not None}
        may_be_zero = ("sink_chunks", "mid_topk")      # no sink / no mid: the paper's ablations
        if any(v < 0 or (v == 0 and k not in may_be_zero) for k, v in overrides.items() if isinstance(v, int)) \
                or args.seconds <= 0:
            raise PackCacheError("--sink-chunks and --mid-topk must be >= 0; other sizes and --seconds positive")
        if overrides:
            preset = preset.with_cache(**overrides)
        if args.compression:
            preset = replace(preset, compressor=replace(preset.compressor, mode=args.compression))
        print(format_budget(compute_budget(preset, args.seconds)))
    except PackCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
