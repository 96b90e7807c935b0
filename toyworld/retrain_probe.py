"""Cheap checks for the next retrain (issue 16, deliverable 3; the write-up is toyworld/eval/RETRAIN_PLAN.md):
what the training data holds, what the shipped VAE alone keeps, and what the candidate sizes cost per chunk.

    python -m toyworld.retrain_probe --only data,vae,speed
    python -m toyworld.retrain_probe --only denoise [--weights BUNDLE]

- data:  the training world's clips: share of one-subject clips and frames, sizes, patterns.
- vae:   the scene readers after the shipped VAE's encode + decode, by shape size (is shape lost before the DiT?).
- speed: one chunk (4 denoising steps with guidance + the commit pass) of the toy DiT at the shipped 8x8 latents
         with patch 1x2x2 against 16x16 latents (a 4x-spatial VAE) and patch 1x1x1, random weights, packed cache,
         side by side in one run; and the decoder per chunk for the shipped 8x VAE and a 4x one.
- denoise: where the DiT loses the scene: the first chunk of each evaluation grid scene, rendered and encoded, then
         entered into the sampler at each of its levels (noised with one draw) and run through the remaining guided
         steps, as the stream runs them; level 0 is pure noise, i.e. the stream's own first chunk. Also the true
         latents decoded (the VAE's ceiling). Read with the scene readers (RETRAIN_PLAN.md, "Session 11").
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


def denoise_by_level(gen, seeds: tuple[int, ...] = (0, 1, 2), scenes: list | None = None) -> list[dict]:
    """Per sampler level (plus the true latents): share of one-subject frames, and of chunks whose shape,
    background colour, pattern and subject colour read right, over `scenes` (default: the evaluation grid) x seeds.
    One noise draw per scene and seed, shared by every level, so the rows differ only in where the DiT starts."""
    import torch

    from packcache.vae import frames_to_uint8

    from .common import to_tensor
    from .scene_eval import grid_scenes
    from .world import caption, render

    scenes = grid_scenes() if scenes is None else scenes
    model, vae, sampler = gen.model, gen.vae, gen.sampler
    null = gen.encode_prompt("")
    n_frames = gen.preset.chunk_video_frames(0)[1]
    levels = ["true latents"] + list(range(sampler.steps - 1, -1, -1))
    hits: dict = {lv: [] for lv in levels}
    for seed in seeds:
        noise = torch.Generator().manual_seed(seed)
        for scene in scenes:
            prompt = caption(scene)
            want, text = M.prompt_scene(prompt), gen.encode_prompt(prompt)
            z = vae.encode(to_tensor(render(scene, start=0, num_frames=n_frames, size=gen.preset.height))[None])
            eps = torch.randn(z.shape, generator=noise)
            for lv in levels:
                x0 = z if lv == "true latents" else _sample_from(model, sampler, z, eps, lv, text, null)
                frames = frames_to_uint8(vae.decode(x0))[0]
                r = M.scene_report(frames)
                hits[lv].append((r["one_subject"], r["shape"] == want["shape"], r["bg_color"] == want["bg_color"],
                                 r["pattern"] == want["pattern"], M.dominant_color(frames) == want["color"]))
    rows = []
    for lv in levels:
        a = np.array(hits[lv], dtype=float).mean(0)
        start = lv if lv == "true latents" else (f"sigma {sampler.sigmas[lv]:.2f}, {sampler.steps - lv} step(s)"
                                                  + (" (the stream)" if lv == 0 else ""))
        rows.append({"start": start, "samples": len(hits[lv]), **dict(zip(
            ("one_subject", "shape", "bg_color", "pattern", "color"), map(float, a)))})
    return rows


def _sample_from(model, sampler, z, eps, level: int, text, null):
    """The sampler's last x0 estimate for latents `z` entering it at `level` (noised with `eps`), guided."""
    import torch

    sigma = sampler.sigmas[level]
    x = (1 - sigma) * z + sigma * eps
    x0 = x
    with torch.no_grad():
        for k in range(level, sampler.steps):
            s = sampler.sigmas[k]
            t = torch.full((x.shape[0], x.shape[2]), s * 1000.0)
            v = model.forward_sequence(x, t, text)
            if sampler.guided:
                v = sampler.guide(v, model.forward_sequence(x, t, null))
            x0 = sampler.x0_from_velocity(x, v, s)
            if k + 1 < sampler.steps:
                x = sampler.next_x(x, v, x0, k, lambda: torch.randn(x.shape))
    return x0


def main(argv=None):
    ap = argparse.ArgumentParser(description="Cheap checks before retraining the toy model (RETRAIN_PLAN.md)")
    ap.add_argument("--only", default="data,vae,speed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", default=None, help="a bundle .safetensors for denoise (default: the shipped weights)")
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
    if "denoise" in only:
        from .evaluate import load_generator, md_table
        rows = denoise_by_level(load_generator(args.weights))
        print(md_table(rows, [("start", "DiT starts at", ""), ("samples", "chunks", "d"),
                              ("one_subject", "one subject", ".0%"), ("shape", "shape", ".0%"),
                              ("bg_color", "bg colour", ".0%"), ("pattern", "pattern", ".0%"),
                              ("color", "colour", ".0%")]), flush=True)


if __name__ == "__main__":
    main()
