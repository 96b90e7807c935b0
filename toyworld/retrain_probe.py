"""Cheap checks for the next retrain (issue 16, deliverable 3; the write-up is toyworld/eval/RETRAIN_PLAN.md):
what the training data holds, what the shipped VAE alone keeps, and what the candidate sizes cost per chunk.

    python -m toyworld.retrain_probe --only data,vae,speed

- data:  the training world's clips: share of one-subject clips and frames, sizes, patterns.
- vae:   the scene readers after the shipped VAE's encode + decode, by shape size (is shape lost before the DiT?).
- speed: one chunk (4 denoising steps with guidance + the commit pass) of the toy DiT at the shipped 8x8 latents
         with patch 1x2x2 against 16x16 latents (a 4x-spatial VAE) and patch 1x1x1, random weights, packed cache,
         side by side in one run; and the decoder per chunk for the shipped 8x VAE and a 4x one.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np

from . import metrics as M
from .scene_check import check_shapes, vae_roundtrip
from .world import BACKGROUNDS, SHAPES, World


def data_stats(clips: int = 400, seed: int = 0, frames: int = 81, every: int = 8) -> dict:
    """Clips as the `data` stage draws them (`World(seed).sample`): one-subject share of clips and of frames (read
    from the renders: overlapping shapes and shapes of other colours count), mean shape radius in px and in
    latent pixels (8x VAE) and DiT tokens (patch 2: 16 px per token side)."""
    world = World(seed)
    one_clip, one_frame, radii = [], [], []
    kinds = dict.fromkeys(BACKGROUNDS, 0)
    shapes = dict.fromkeys(SHAPES, 0)
    for _ in range(clips):
        fr, _, scene = world.sample(frames, 64, augment_caption=False)
        one_clip.append(len(scene.shapes) == 1)
        one_frame += [M.frame_scene(f)["count"] == 1 for f in fr[::every]]
        radii += [s.size * 64 for s in scene.shapes]
        kinds[scene.background.kind] += 1
        for s in scene.shapes:
            shapes[s.shape] += 1
    r = float(np.mean(radii))
    return {"clips": clips, "one_subject_clips": float(np.mean(one_clip)),
            "one_subject_frames": float(np.mean(one_frame)),
            "radius_px": r, "diameter_latent_px": 2 * r / 8, "diameter_tokens": 2 * r / 16,
            "patterns": kinds, "shapes": shapes}


def vae_by_size(vae, sizes=(0.11, 0.14, 0.17, 0.22, 0.28)) -> list[dict]:
    """Shape accuracy of the shipped VAE's round trip per shape size (the world drew 0.11-0.17 of the frame when
    this was measured; `SHAPE_SIZE_RANGE` since the retrain)."""
    through = vae_roundtrip(vae)
    rows = []
    for size in sizes:
        r = check_shapes(frames_per_clip=5, seed=int(size * 1000), through=through, sizes=(size,))
        rows.append({"size": size, "radius_px": size * 64, "accuracy": r["accuracy"],
                     **{f"{s}_ok": r["confusion"][s][s] / max(1, sum(r["confusion"][s].values())) for s in SHAPES}})
    return rows


def chunk_speed(threads: int = 1, reps: int = 6, chunks_warm: int = 4) -> list[dict]:
    """s per chunk of the DiT alone (no decode; compressor HR only, so no VAE in the loop) at each candidate size,
    random weights, packed cache past warm-up; variants interleaved so machine load hits them alike."""
    import torch

    from packcache.compress import MidCompressor
    from packcache.generator import Generator
    from packcache.model import CausalWanModel
    from packcache.presets import get_preset
    from packcache.text import build_text_encoder
    from packcache.vae import VideoVAE
    torch.set_num_threads(threads)
    base = get_preset("toy")
    variants = {
        "shipped: 8x8 latents, patch 1x2x2": (64, (1, 2, 2)),
        "4x VAE: 16x16 latents, patch 1x2x2": (128, (1, 2, 2)),
        "8x8 latents, patch 1x1x1": (64, (1, 1, 1)),
        "16x16 latents, patch 1x1x1": (128, (1, 1, 1)),
    }
    text = build_text_encoder(base.text)
    sessions, times = {}, {}
    for name, (px, patch) in variants.items():
        preset = replace(base, height=px, width=px, transformer=replace(base.transformer, patch_size=patch),
                         compressor=replace(base.compressor, mode="hr"), weights=None)
        torch.manual_seed(0)
        model = CausalWanModel(preset.transformer)
        vae = VideoVAE.build(preset.vae)
        comp = MidCompressor(preset.compressor, model.dim, model.patch_embedding, vae)
        gen = Generator._assemble(preset, model, vae, text, comp, "cpu", torch.float32)
        s = gen.open("a red circle bouncing on a striped blue background", seed=0)
        for _ in range(chunks_warm):
            s.advance()
        lat = (px // 8) ** 2 // (patch[1] * patch[2])
        sessions[name], times[name] = (s, lat), []
    for _ in range(reps):
        for name, (s, _) in sessions.items():
            t = time.perf_counter()
            s.advance()
            times[name].append(time.perf_counter() - t)
    rows = []
    for name, (s, tokens) in sessions.items():
        st = s.stats()
        s.close()
        med = statistics.median(times[name])
        rows.append({"variant": name, "tokens_per_latent_frame": tokens, "attended": st.get("attended_tokens", 0),
                     "s_per_chunk": med, "dit_rtf": 0.75 / med})
    return rows


def decode_speed(threads: int = 1, reps: int = 6) -> list[dict]:
    """s per chunk of the streaming decoder: the shipped 8x VAE (8x8 latents) against a 4x one of the same widths
    (Wan2.2 layout without the pixel patch: 16x16 latents), random weights."""
    import torch

    from packcache.presets import get_preset
    from packcache.vae import VideoVAE
    torch.set_num_threads(threads)
    cfg = get_preset("toy").vae
    rows = []
    for name, c, hw in (("8x VAE (shipped layout)", cfg, 8),
                        ("4x VAE (no pixel patch)", replace(cfg, patch_size=None, spatial_stride=4), 16)):
        vae = VideoVAE.build(c)
        dec = vae.stream_decoder()
        z = torch.randn(1, 16, 3, hw, hw)
        with torch.no_grad():
            dec.decode(z)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                out = dec.decode(z)
                ts.append(time.perf_counter() - t)
        rows.append({"decoder": name, "latents": f"16x3x{hw}x{hw}", "frames": int(out.shape[2]),
                     "s_per_chunk": statistics.median(ts)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description="Cheap checks before retraining the toy model (RETRAIN_PLAN.md)")
    ap.add_argument("--only", default="data,vae,speed")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    only = set(args.only.split(","))
    if "data" in only:
        print("data:", data_stats(), flush=True)
    if "vae" in only:
        from packcache import Generator
        vae = Generator.from_preset("toy", device="cpu").vae
        for r in vae_by_size(vae):
            print("vae by size:", r, flush=True)
    if "speed" in only:
        for r in decode_speed(args.threads):
            print("decode:", r, flush=True)
        for r in chunk_speed(args.threads):
            print("dit:", r, flush=True)


if __name__ == "__main__":
    main()
