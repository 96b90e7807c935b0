"""Session snapshots: time and size of `session.snapshot(path)` / `gen.restore(path)`, per cache kind, and the size a
real-size session's snapshot has (computed on the `meta` device from the cache geometry and the streaming decoder's
feature cache, nothing allocated).

    python -m bench.snapshot                        # toy preset (CPU) + real-size sizes
    python -m bench.snapshot --io-scale 0.25        # also write + read a file of 1/4 of the real size on this machine

Each toy row also checks that the restored session's next chunk equals the never-stopped session's (bit for bit).
The I/O rows time the snapshot's own file path (crc32 + safetensors + fsync + rename, then load + crc32) on
tensors of the real-size shapes scaled by --io-scale: a full-size write needs about twice the file size in RAM.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from packcache import Generator
from packcache.snapshot import _checksum, _load, write_file


def toy_rows(preset: str, chunks: int, repeats: int) -> list[dict]:
    gen = Generator.from_preset(preset, device="cpu", dtype=torch.float32)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.snapshot.safetensors"
        for kind in ("packed", "window", "full"):
            with gen.open("a red circle bouncing on a striped blue background", seed=0, cache=kind) as s:
                for _ in range(chunks):
                    s.next_chunk()
                s.snapshot(path)                                      # first call: the weights' fingerprint
                save, load = [], []
                for _ in range(repeats):
                    t = time.perf_counter()
                    s.snapshot(path)
                    save.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    gen.restore(path).close()
                    load.append(time.perf_counter() - t)
                with gen.restore(path) as r:
                    same = np.array_equal(r.next_chunk(), s.next_chunk())
            rows.append({"preset": preset, "cache": kind, "chunks": chunks, "bytes": path.stat().st_size,
                         "snapshot_s": statistics.median(save), "restore_s": statistics.median(load), "same": same})
    return rows


def realsize_state(preset: str, dtype: torch.dtype) -> dict[str, dict[str, tuple]]:
    """Per cache kind: every tensor of a warm session's state as (shape, dtype), built on `meta`."""
    gen = Generator.from_preset(preset, device="meta", dtype=dtype)
    p = gen.preset
    dec = gen.vae.stream_decoder()
    z = torch.zeros(1, p.transformer.in_channels, p.cache.chunk_frames, p.latent_height, p.latent_width,
                    device="meta")
    dec.decode(z)
    dec.decode(z)                                    # a warm decoder: every conv cache filled
    decoder = {f"decoder.{i}": (tuple(c.shape), c.dtype) for i, c in enumerate(dec._cache) if torch.is_tensor(c)}
    latent = (tuple(z.shape), dtype)
    text = ((1, p.text.max_tokens, p.transformer.text_dim), dtype)
    out = {}
    for kind in ("packed", "window"):
        cache = gen.new_cache(kind)
        state = {f"cache.{k}": (tuple(v.shape), v.dtype) for k, v in cache.state_dict().items() if torch.is_tensor(v)}
        state.update({f"cache.recent_latents.{i}": latent for i in range(cache.recent_cap)})
        state.update(decoder)
        state["text"] = text
        out[kind] = state
    return out


def _bytes(state: dict[str, tuple], prefix: str = "") -> int:
    return sum(int(np.prod(shape)) * torch.empty(0, dtype=dt).element_size()
               for k, (shape, dt) in state.items() if k.startswith(prefix))


def io_row(state: dict[str, tuple], scale: float) -> dict:
    """Write and read a snapshot-shaped file (each tensor's largest dimension scaled) through the snapshot's code."""
    tensors = {}
    for k, (shape, dt) in state.items():
        if shape:                                    # scale the largest dimension
            i = max(range(len(shape)), key=lambda j: shape[j])
            shape = shape[:i] + (max(1, round(shape[i] * scale)),) + shape[i + 1:]
        tensors[k] = torch.empty(shape, dtype=torch.uint8).random_().view(dt) if dt.itemsize == 1 else \
            torch.randn(shape).to(dt)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.snapshot.safetensors"
        t = time.perf_counter()
        write_file(path, tensors, {"format": "packforcing-session", "format_version": "1",
                                   "checksum": _checksum(tensors), "summary": "{}", "identity": "{}", "extra": "{}"})
        write = time.perf_counter() - t
        del tensors
        t = time.perf_counter()
        _load(path)
        read = time.perf_counter() - t
    return {"bytes": size, "write_s": write, "read_s": read}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--preset", default="toy", help="preset for the timed rows (CPU)")
    ap.add_argument("--chunks", type=int, default=8, help="chunks generated before the snapshot")
    ap.add_argument("--repeats", type=int, default=3, help="snapshots/restores timed (median)")
    ap.add_argument("--realsize", nargs="*", default=["wan2.1-t2v-1.3b", "packforcing-paper"],
                    help="presets whose snapshot size is computed on the meta device (bf16)")
    ap.add_argument("--io-scale", type=float, default=0.0,
                    help="also write+read a file this fraction of the first real-size packed snapshot (0: skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    print(f"## snapshot + restore, {args.preset} preset, CPU, 1 thread, after {args.chunks} chunks "
          f"(median of {args.repeats})\n")
    print("| preset | cache | file size | snapshot (s) | restore (s) | next chunk identical |")
    print("|---|---|---:|---:|---:|---|")
    for r in toy_rows(args.preset, args.chunks, args.repeats):
        print(f"| {r['preset']} | {r['cache']} | {r['bytes'] / 1e6:.2f} MB | {r['snapshot_s']:.3f} | "
              f"{r['restore_s']:.3f} | {'yes' if r['same'] else 'NO'} |")
    sys.stdout.flush()

    states = {name: realsize_state(name, torch.bfloat16) for name in args.realsize}
    print("\n## real-size snapshot size (bf16, computed on the meta device; the full cache grows without bound)\n")
    print("| preset | cache | cache K/V | decoder state | latents + text | total |")
    print("|---|---|---:|---:|---:|---:|")
    for name, kinds in states.items():
        for kind, st in kinds.items():
            total = _bytes(st)
            kv, dec = _bytes(st, "cache."), _bytes(st, "decoder.")
            print(f"| {name} | {kind} | {kv / 1e9:.2f} GB | {dec / 1e9:.2f} GB | "
                  f"{(total - kv - dec) / 1e6:.1f} MB | {total / 1e9:.2f} GB |")
    if args.io_scale > 0 and states:
        name = next(iter(states))
        full = _bytes(states[name]["packed"])
        r = io_row(states[name]["packed"], args.io_scale)
        print(f"\n## writing and reading a snapshot-shaped file on this machine ({name} packed x {args.io_scale:g})\n")
        print("| file | write + fsync (s) | read + verify (s) | write GB/s | read GB/s | full size: write / read (s) |")
        print("|---:|---:|---:|---:|---:|---:|")
        w, rd = r["bytes"] / r["write_s"] / 1e9, r["bytes"] / r["read_s"] / 1e9
        print(f"| {r['bytes'] / 1e9:.2f} GB | {r['write_s']:.2f} | {r['read_s']:.2f} | {w:.2f} | {rd:.2f} | "
              f"{full / 1e9 / w:.1f} / {full / 1e9 / rd:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
