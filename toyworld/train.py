"""Train the toy world model from scratch: one seeded command, CPU-friendly.

    python -m toyworld.train --out packcache/weights/toy.safetensors

Stages (each saves its state under --work, so a stage can be re-run alone with --stages):

1. `vae`   a small `AutoencoderKLWan` (the toy preset's shape) on 9-frame toy clips: L1 + MSE reconstruction and a
           light KL. Afterwards the latent normalisation is *folded into* its quant convs, so the preset's
           latents_mean/std are 0/1 and the encoder emits unit-scale latents directly.
2. `data`  encode 5-second clips (81 frames -> 21 latent frames = 7 chunks of 3) with the trained VAE; keep the
           scenes so captions can be re-drawn (augmented) at every step.
3. `dit`   the causal Wan DiT (packcache.model.CausalWanModel) by flow matching with teacher forcing: the sequence is
           [clean copy ; noisy copy]; noisy chunk i attends clean chunks < i and itself, the clean copy is
           block-causal, both copies share temporal positions. One noise level per chunk (diffusion-forcing
           style), drawn from the 4-step sampler's levels half of the time. Caption augmentation (synonyms,
           templates) and 10% empty prompts. Random context dropping teaches the model the packed/windowed
           contexts it meets beyond 5 s.
4. `hr`    the HR compressor branch, end-to-end through the frozen DiT: chunk i is denoised against
           [sink chunks ; compressed mid blocks ; recent chunk] and the loss back-propagates into the HR convs.

Everything is written into one safetensors file with key prefixes `transformer.`, `vae.`, `compressor.`, plus a
JSON sidecar (same stem) with the recipe, losses and wall times. Loss curves are saved as PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .world import World, caption, render

logger = logging.getLogger("toyworld.train")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "packcache" / "weights" / "toy.safetensors"


def toy_preset():
    from packcache.presets import get_preset
    return get_preset("toy")


def set_threads(n: int | None):
    n = n or int(os.environ.get("TOYWORLD_THREADS", "1"))
    torch.set_num_threads(n)


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (3, F, H, W) in [-1, 1]."""
    return torch.from_numpy(frames).float().permute(3, 0, 1, 2) / 127.5 - 1.0


def cosine_lr(step: int, total: int, base: float, warmup: int = 100, floor: float = 0.05) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def save_curve(path: Path, series: dict[str, list[float]], title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in series.items():
        if not ys:
            continue
        ys = np.asarray(ys, dtype=np.float64)
        k = max(1, len(ys) // 50)
        smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def progress(iterable, total: int, desc: str):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, mininterval=5.0, dynamic_ncols=True)


# ============================================================================================ stage 1: VAE

@dataclass
class VAERecipe:
    steps: int = 2400
    batch: int = 8
    frames: int = 5           # 1 + 4 -> 2 latent frames: trains the first-frame and the grouped (cached) paths
    image_batch: int = 16     # two steps in three are single frames (first-frame path, 5x cheaper per sample)
    # Phase B: the encoder learns luminance first and is nearly colour-blind after phase A (red and blue solid
    # frames get almost the same latent), so a second phase adds an L1 on chroma (x - channel mean).
    chroma_steps: int = 1200
    chroma_weight: float = 4.0
    chroma_lr: float = 1e-3
    crop: int = 32            # random crops: the convs are size-agnostic and a 32x32 crop costs 1/4 of a frame
    lr: float = 2e-3
    kl_weight: float = 1e-4       # weight of the latent L2 penalty


def build_vae(preset):
    from diffusers import AutoencoderKLWan
    return AutoencoderKLWan(**preset.vae.diffusers_kwargs())


def vae_batch(world: World, batch: int, frames: int, size: int, crop: int | None = None,
              on_shapes: bool = False) -> torch.Tensor:
    """Toy clips (B, 3, F, H, W) in [-1, 1]; random crops aligned to the latent grid, or (on_shapes) crops around
    a shape's first position, so the few saturated pixels (the colours the metrics read) weigh more."""
    from .world import positions
    clips = []
    for _ in range(batch):
        x, _, scene = world.sample(frames, size, augment_caption=False)
        if crop and crop < size and on_shapes:
            s = scene.shapes[int(world.rng.integers(len(scene.shapes)))]
            cx, cy = (float(v[0]) * size for v in positions(s, np.array([world.last_start / 16.0])))
            y0 = int(np.clip(round((cy - crop / 2) / 8) * 8, 0, size - crop))
            x0 = int(np.clip(round((cx - crop / 2) / 8) * 8, 0, size - crop))
            x = x[:, y0:y0 + crop, x0:x0 + crop]
        elif crop and crop < size:
            y0, x0 = (int(v) for v in world.rng.integers(0, size - crop + 1, size=2) // 8 * 8)
            x = x[:, y0:y0 + crop, x0:x0 + crop]
        clips.append(to_tensor(np.ascontiguousarray(x)))
    return torch.stack(clips)


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLWan._decode` without its final clamp to [-1, 1]: a clamped pixel has no gradient, and at
    initialisation most pixels are outside the range, which stalls training at the mean colour."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    outs = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(outs, 2)


def vae_loss(vae, x: torch.Tensor, kl_weight: float, chroma_weight: float = 0.0):
    post = vae.encode(x).latent_dist
    # The posterior's noise starts at std 1 against tiny means and would bury the signal (the decoder then
    # settles on the mean image): decode the mean plus a little noise, and keep the latents' scale in check.
    z = post.mean + 0.05 * post.std * torch.randn_like(post.mean)
    rec = decode_unclamped(vae, z)
    l1 = (rec - x).abs().mean()
    mse = F.mse_loss(rec, x)
    reg = post.mean.pow(2).mean()
    lc = (chroma(rec) - chroma(x)).abs().mean()
    return l1 + mse + kl_weight * reg + chroma_weight * lc, {"l1": l1.item(), "mse": mse.item(), "chroma": lc.item()}


def train_vae(preset, work: Path, seed: int, recipe: VAERecipe, phase: str = "A") -> dict:
    """Phase A: reconstruction from scratch. Phase B: continue from phase A's weights with the chroma loss."""
    torch.manual_seed(seed if phase == "A" else seed + 30)
    world = World(seed + 1 if phase == "A" else seed + 31)
    if phase == "A":
        vae = build_vae(preset).train()
        steps, lr, cw = recipe.steps, recipe.lr, 0.0
    else:
        vae = load_vae(preset, work).train().requires_grad_(True)
        steps, lr, cw = recipe.chroma_steps, recipe.chroma_lr, recipe.chroma_weight
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    hist = {"l1": [], "mse": [], "chroma": []}
    t0 = time.time()
    for step in progress(range(steps), steps, f"vae-{phase}"):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup=100 if phase == "A" else 20)
        if step % 3 == 0:
            x = vae_batch(world, recipe.batch, recipe.frames, preset.height, recipe.crop)
        else:
            x = vae_batch(world, recipe.image_batch, 1, preset.height, recipe.crop)
        loss, parts = vae_loss(vae, x, recipe.kl_weight, cw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        for k, v in parts.items():
            hist[k].append(v)
        if step % 50 == 0:
            logger.info("vae step %d l1 %.4f mse %.5f", step, parts["l1"], parts["mse"])
        if step % 200 == 199:
            torch.save(vae.state_dict(), work / "vae_unfolded.pt")
        if (work / "STOP_VAE").exists():   # manual early stop (time budget); the recipe's number is `steps`
            logger.warning("vae: stopped early at step %d", step)
            break
    wall = time.time() - t0
    vae.eval()
    stats = fold_normalisation(vae, world, preset)
    if phase == "A":
        torch.save(vae.state_dict(), work / "vae_phaseA.pt")
    torch.save(vae.state_dict(), work / "vae.pt")
    save_curve(work / f"loss_vae_{phase}.png", hist, f"VAE phase {phase}")
    info = {"wall_s": wall, "final_l1": float(np.mean(hist["l1"][-50:])), "final_mse": float(np.mean(hist["mse"][-50:])),
            "latent_stats_before_fold": stats, "history": hist}
    (work / f"vae_{phase}.json").write_text(json.dumps(info))
    return info


@torch.no_grad()
def fold_normalisation(vae, world: World, preset, clips: int = 64) -> dict:
    """Measure per-channel latent mean/std (posterior means) and fold them into the VAE's 1x1x1 quant convs:
    the encoder then emits (z - mean)/std and the decoder accepts it, so the preset's normalisation is 0/1."""
    x = vae_batch(world, clips, 21, preset.height)
    mu = torch.cat([vae.encode(x[i:i + 8]).latent_dist.mean for i in range(0, clips, 8)])
    mean = mu.mean(dim=(0, 2, 3, 4))
    std = mu.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    z = vae.config.z_dim
    qc, pq = vae.quant_conv, vae.post_quant_conv   # WanCausalConv3d (nn.Conv3d subclasses), kernel 1
    qc.weight[:z] /= std.view(-1, 1, 1, 1, 1)
    qc.bias[:z] = (qc.bias[:z] - mean) / std
    qc.bias[z:] -= 2 * torch.log(std)              # log-variance: shift by -2 log std
    pq.bias += (pq.weight[:, :, 0, 0, 0] @ mean)
    pq.weight *= std.view(1, -1, 1, 1, 1)
    mu2 = torch.cat([vae.encode(x[i:i + 8]).latent_dist.mean for i in range(0, clips, 8)])
    logger.info("latents after fold: mean %.3f std %.3f", mu2.mean().item(), mu2.std().item())
    return {"mean": mean.tolist(), "std": std.tolist()}


@dataclass
class DecoderRecipe:
    steps: int = 4000
    batch: int = 8
    image_batch: int = 16
    frames: int = 9
    crop: int = 32
    lr: float = 1e-3
    chroma_weight: float = 4.0   # extra L1 on colour differences (x - channel mean): the VAE stage learns
                                 # luminance first and colour late, and the metrics read colour


def chroma(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(dim=1, keepdim=True)


def train_decoder(preset, work: Path, seed: int, recipe: DecoderRecipe) -> dict:
    """Fine-tune only the VAE decoder (and post-quant conv) with the encoder frozen: the latent space the DiT is
    trained in stays fixed while reconstructions (colours, edges) keep improving. Runs beside the DiT stage."""
    torch.set_num_threads(1)
    torch.manual_seed(seed + 20)
    world = World(seed + 21)
    vae = load_vae(preset, work)
    train_params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p_ in train_params:
        p_.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(train_params, lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.99))
    hist = {"l1": [], "mse": []}
    t0 = time.time()
    for step in progress(range(recipe.steps), recipe.steps, "vae-decoder"):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, recipe.steps, recipe.lr, warmup=50)
        if step % 3 == 0:
            x = vae_batch(world, recipe.batch, recipe.frames, preset.height, recipe.crop, on_shapes=True)
        else:
            x = vae_batch(world, recipe.image_batch, 1, preset.height, recipe.crop, on_shapes=True)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = decode_unclamped(vae, z)
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        lc = (chroma(rec) - chroma(x)).abs().mean()
        opt.zero_grad(set_to_none=True)
        (l1 + mse + recipe.chroma_weight * lc).backward()
        torch.nn.utils.clip_grad_norm_(train_params, 1.0)
        opt.step()
        hist["l1"].append(l1.item())
        hist["mse"].append(mse.item())
        if step % 100 == 0:
            logger.info("vae-decoder step %d l1 %.4f mse %.5f", step, l1.item(), mse.item())
        if step % 200 == 199:
            torch.save(vae.state_dict(), work / "vae_ft.pt")
        if (work / "STOP_DEC").exists():
            logger.warning("vae-decoder: stopped early at step %d", step)
            break
    torch.save(vae.state_dict(), work / "vae_ft.pt")
    save_curve(work / "loss_vae_decoder.png", hist, "VAE decoder fine-tune (encoder frozen)")
    info = {"wall_s": time.time() - t0, "steps": len(hist["l1"]), "final_l1": float(np.mean(hist["l1"][-50:])),
            "final_mse": float(np.mean(hist["mse"][-50:]))}
    (work / "vae_decoder.json").write_text(json.dumps(info))
    return info


def _decoder_process(preset_name: str, work: str, seed: int, steps: int):
    from packcache.presets import get_preset
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train_decoder(get_preset(preset_name), Path(work), seed, DecoderRecipe(steps=steps))


def load_vae(preset, work: Path, name: str = "vae.pt"):
    vae = build_vae(preset)
    vae.load_state_dict(torch.load(work / name, map_location="cpu"))
    return vae.eval().requires_grad_(False)


# =========================================================================================== stage 2: data

CLIP_FRAMES = 81          # 5 s at 16 FPS -> 21 latent frames = 7 chunks of 3


def scene_to_dict(scene) -> dict:
    import dataclasses
    return dataclasses.asdict(scene)


def scene_from_dict(d: dict):
    from .world import Background, Scene, ShapeSpec
    return Scene(background=Background(**d["background"]), shapes=tuple(ShapeSpec(**s) for s in d["shapes"]))


@torch.no_grad()
def _encode_shard(args) -> tuple[torch.Tensor, list[dict]]:
    preset_name, work, seed, clips, batch = args
    torch.set_num_threads(1)
    from packcache.presets import get_preset
    preset = get_preset(preset_name)
    vae = load_vae(preset, Path(work))
    world = World(seed)
    lat, scenes = [], []
    for _ in progress(range(0, clips, batch), (clips + batch - 1) // batch, f"data[{seed}]"):
        xs = []
        for _ in range(batch):
            frames, _, scene = world.sample(CLIP_FRAMES, preset.height, augment_caption=False)
            xs.append(to_tensor(frames))
            scenes.append(scene_to_dict(scene))
        lat.append(vae.encode(torch.stack(xs)).latent_dist.mean.half())
    return torch.cat(lat)[:clips], scenes[:clips]


def make_dataset(preset, work: Path, seed: int, clips: int, batch: int = 8, workers: int = 2) -> dict:
    """Encode `clips` 5-second toy clips with the trained VAE -> latents (N, 16, 21, h, w) + their scenes.
    Split over `workers` single-threaded processes (each shard has its own world seed)."""
    t0 = time.time()
    per = [clips // workers + (i < clips % workers) for i in range(workers)]
    jobs = [(preset.name, str(work), seed + 2 + 1000 * i, per[i], batch) for i in range(workers)]
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(workers) as pool:
            shards = pool.map(_encode_shard, jobs)
    else:
        shards = [_encode_shard(jobs[0])]
    latents = torch.cat([s[0] for s in shards])
    scenes = [d for s in shards for d in s[1]]
    torch.save({"latents": latents, "scenes": scenes}, work / "data.pt")
    info = {"wall_s": time.time() - t0, "clips": clips, "latent_shape": list(latents.shape),
            "latent_mean": latents.float().mean().item(), "latent_std": latents.float().std().item()}
    (work / "data.json").write_text(json.dumps(info))
    return info


# ============================================================================================ stage 3: DiT

@dataclass
class DiTRecipe:
    steps: int = 4000
    batch: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    sampler_level_prob: float = 0.5     # share of chunks noised at exactly one of the sampler's 4 levels
    ctx_noise_prob: float = 0.5         # share of samples whose clean context gets a little noise (robustness)
    ctx_noise_max: float = 0.1
    drop_prob: float = 0.6              # share of steps that drop a run of middle chunks (packed/window contexts)
    switch_prob: float = 0.2            # share of steps that cut to another scene mid-clip (prompt switches)
    stop_at: int | None = None          # end early (the LR schedule still spans `steps`)
    first_chunk_weight: float = 1.0     # loss weight of the text-only first chunk (phase B raises it)
    ema: float = 0.995


def teacher_forcing_mask(chunk_ids: list[int], tokens_per_frame: int, chunk_frames: int) -> torch.Tensor:
    """bool (2N, 2N) for the sequence [clean copy ; noisy copy] of the same frames.

    chunk_ids: for each *chunk* of the (possibly subsampled) clip, its order index 0..K-1. Clean chunk a sees clean
    chunks <= a; noisy chunk i sees clean chunks < i and itself; clean never sees noisy.
    """
    k = len(chunk_ids)
    per_token = torch.arange(k).repeat_interleave(chunk_frames * tokens_per_frame)
    n = per_token.numel()
    a = per_token[:, None]
    b = per_token[None, :]
    mask = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    mask[:n, :n] = b <= a
    mask[n:, :n] = b < a
    mask[n:, n:] = b == a
    return mask


class CaptionSampler:
    """Re-draws a paraphrased caption for a stored scene each time (caption augmentation), and embeds it."""

    def __init__(self, preset, scenes: list[dict], seed: int):
        from packcache.text import build_text_encoder
        self.encoder = build_text_encoder(preset.text)
        self.scenes = [scene_from_dict(d) for d in scenes]
        self.rng = np.random.default_rng(seed)

    def __call__(self, idx) -> tuple[torch.Tensor, list[str]]:
        texts = [caption(self.scenes[int(i)], self.rng if self.rng.random() < 0.8 else None) for i in idx]
        return self.encoder.encode(texts), texts


def build_model(preset, seed: int):
    from packcache.model import CausalWanModel
    torch.manual_seed(seed)
    return CausalWanModel(preset.transformer)


def sampler_sigmas(preset) -> list[float]:
    from packcache.sampler import FlowSampler
    return FlowSampler(preset.sampler).sigmas


def dit_loss(model, latents: torch.Tensor, text: torch.Tensor, preset, recipe: DiTRecipe,
             gen: torch.Generator, keep_chunks: list[int], loss_from_chunk: int = 0) -> torch.Tensor:
    """Teacher-forcing flow-matching loss on a batch of clips (B, 16, F, h, w), chunks `keep_chunks` only.

    Chunks before `loss_from_chunk` are context only (a prompt switch: they come from another scene)."""
    T = preset.cache.chunk_frames
    b = latents.shape[0]
    frames = torch.cat([torch.arange(c * T, (c + 1) * T) for c in keep_chunks])
    x0 = latents[:, :, frames].float()
    k = len(keep_chunks)
    f = x0.shape[2]
    levels = torch.tensor(sampler_sigmas(preset))
    u = torch.rand(b, k, generator=gen)
    pick = levels[torch.randint(len(levels), (b, k), generator=gen)]
    sigma = torch.where(torch.rand(b, k, generator=gen) < recipe.sampler_level_prob, pick, u)
    sig_f = sigma.repeat_interleave(T, dim=1)                                   # (B, F)
    eps = torch.randn(x0.shape, generator=gen)
    xn = (1 - sig_f)[:, None, :, None, None] * x0 + sig_f[:, None, :, None, None] * eps
    ctx_s = torch.rand(b, generator=gen) * recipe.ctx_noise_max
    ctx_s = torch.where(torch.rand(b, generator=gen) < recipe.ctx_noise_prob, ctx_s, torch.zeros(b))
    eps2 = torch.randn(x0.shape, generator=gen)
    xc = (1 - ctx_s)[:, None, None, None, None] * x0 + ctx_s[:, None, None, None, None] * eps2
    inp = torch.cat([xc, xn], dim=2)
    timestep = torch.cat([ctx_s[:, None].expand(b, f), sig_f], dim=1) * 1000.0
    pos = torch.arange(f, dtype=torch.float64)
    mask = teacher_forcing_mask(list(range(k)), preset.tokens_per_frame, T)
    v = model.forward_sequence(inp, timestep, text, torch.cat([pos, pos]), mask)[:, :, f:]
    err = (v.float() - (eps - x0)).pow(2).mean(dim=(1, 3, 4))                   # (B, F)
    weight = torch.tensor([float(c >= loss_from_chunk) * (recipe.first_chunk_weight if c == 0 else 1.0)
                           for c in keep_chunks]).repeat_interleave(T)
    return (err * weight).sum() / (weight.sum() * b)


def choose_chunks(rng: np.random.Generator, n_chunks: int, sink: int, drop_prob: float) -> list[int]:
    """All chunks, or (with drop_prob) the sink chunks then a run of >= 2 consecutive later chunks, which may
    start right after the sink or leave a gap: the contexts bounded caches (sink + recent) produce. Shorter
    sequences are also cheaper."""
    if rng.random() >= drop_prob or n_chunks < sink + 3:
        return list(range(n_chunks))
    start = int(rng.integers(sink, n_chunks - 1))
    end = int(rng.integers(start + 2, n_chunks + 1))
    return list(range(sink)) + list(range(start, end))


def train_dit(preset, work: Path, seed: int, recipe: DiTRecipe, data: dict | None = None, phase: str = "A") -> dict:
    """Phase A from scratch; phase B continues from phase A's last weights (fresh optimizer, EMA and schedule)."""
    data = data or torch.load(work / "data.pt")
    latents = data["latents"]
    n = latents.shape[0]
    T = preset.cache.chunk_frames
    n_chunks = latents.shape[2] // T
    model = build_model(preset, seed).train()
    if phase == "B":
        model.load_state_dict(torch.load(work / "dit_last.pt"))
        seed = seed + 100
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    captions = CaptionSampler(preset, data["scenes"], seed + 3)
    gen = torch.Generator().manual_seed(seed + 4)
    rng = np.random.default_rng(seed + 5)
    hist = {"loss": [], "loss_sampler_levels": []}
    t0 = time.time()
    total = recipe.stop_at or recipe.steps
    for step in progress(range(total), total, f"dit-{phase}"):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, recipe.steps, recipe.lr, warmup=100)
        idx = rng.integers(0, n, size=recipe.batch)
        text, _ = captions(idx)
        keep = choose_chunks(rng, n_chunks, preset.cache.sink_chunks, recipe.drop_prob)
        batch = latents[idx]
        loss_from = 0
        if rng.random() < recipe.switch_prob:   # context from scene A, prompt and continuation from scene B
            j = int(rng.choice(keep[1:]))
            other = latents[rng.integers(0, n, size=recipe.batch)]
            batch = torch.cat([other[:, :, :j * T], batch[:, :, j * T:]], dim=2)
            loss_from = j
        loss = dit_loss(model, batch, text, preset, recipe, gen, keep, loss_from)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(recipe.ema, (1 + step) / (10 + step))
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        hist["loss"].append(loss.item())
        if step % 100 == 0:
            logger.info("dit step %d loss %.4f (%.1fs)", step, loss.item(), time.time() - t0)
            save_curve(work / f"loss_dit_{phase}.png", {"flow-matching loss": hist["loss"]}, f"causal DiT phase {phase}")
        if (work / f"STOP_DIT_{phase}").exists():
            logger.warning("dit: stopped early at step %d", step)
            break
        if step % 500 == 499:
            torch.save(ema, work / "dit_ema.pt")
    wall = time.time() - t0
    torch.save(ema, work / "dit_ema.pt")
    torch.save(model.state_dict(), work / "dit_last.pt")
    save_curve(work / f"loss_dit_{phase}.png", {"flow-matching loss": hist["loss"]}, f"causal DiT phase {phase}")
    info = {"wall_s": wall, "steps": len(hist["loss"]), "final_loss": float(np.mean(hist["loss"][-100:])),
            "history": hist["loss"]}
    (work / f"dit_{phase}.json").write_text(json.dumps(info))
    return info


# ========================================================================================== pack and save

def pack(preset, work: Path, out: Path, extra_info: dict) -> None:
    from safetensors.torch import save_file
    state = {}
    for k, v in torch.load(work / "dit_ema.pt").items():
        state[f"transformer.{k[len('transformer.'):]}" if k.startswith("transformer.") else f"transformer.{k}"] = v
    vae_file = work / "vae_ft.pt" if (work / "vae_ft.pt").exists() else work / "vae.pt"
    for k, v in torch.load(vae_file).items():
        state[f"vae.{k}"] = v
    if (work / "hr.pt").exists():
        for k, v in torch.load(work / "hr.pt").items():
            state[f"compressor.{k}"] = v
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"preset": "toy", "format": "packcache-bundle-1"})
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps(extra_info, indent=2))
    logger.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)


# ===================================================================================================== main

STAGES = ("vae", "vae_b", "data", "dit", "dit_b", "decoder", "hr", "pack")
# The shipped run: phase A's cosine schedule spans 4000 steps but was stopped at 2204 (time budget), then phase B
# continues with the text-only first chunk weighted 4x and a fresh cosine schedule from a lower LR.
DIT_A_STOP = 2204
DIT_B = DiTRecipe(steps=1500, lr=5e-4, first_chunk_weight=4.0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="safetensors file to write")
    ap.add_argument("--work", type=Path, default=None, help="working folder for stage outputs (default: next to --out)")
    ap.add_argument("--stages", default="vae,data,dit,decoder,pack",
                    help=f"comma list of stages to run, from {STAGES} (hr: optional, not in the shipped weights)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1: on a shared 2-core CPU one thread per process is far faster), or $TOYWORLD_THREADS")
    ap.add_argument("--vae-steps", type=int, default=VAERecipe.steps)
    ap.add_argument("--clips", type=int, default=384, help="5-second clips encoded for DiT training")
    ap.add_argument("--dit-steps", type=int, default=DiTRecipe.steps)
    ap.add_argument("--hr-steps", type=int, default=300)
    ap.add_argument("--decoder-steps", type=int, default=DecoderRecipe.steps)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    set_threads(args.threads)
    preset = toy_preset()
    work = args.work or args.out.parent / "toy_train"
    work.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            raise SystemExit(f"unknown stage {s!r}; stages: {STAGES}")
    summary_path = work / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    t_all = time.time()
    if "vae" in stages:
        info = train_vae(preset, work, args.seed, VAERecipe(steps=args.vae_steps), phase="A")
        logger.info("vae phase A done in %.0fs: l1 %.4f", info["wall_s"], info["final_l1"])
        summary["vae_A"] = {k: v for k, v in info.items() if k != "history"}
    if "vae" in stages or "vae_b" in stages:
        info = train_vae(preset, work, args.seed, VAERecipe(), phase="B")
        logger.info("vae phase B done in %.0fs: l1 %.4f", info["wall_s"], info["final_l1"])
        summary["vae_B"] = {k: v for k, v in info.items() if k != "history"}
    if "data" in stages:
        info = make_dataset(preset, work, args.seed, args.clips)
        logger.info("data done in %.0fs", info["wall_s"])
        summary["data"] = info
    dec_proc = None
    if "decoder" in stages:   # in a second process, beside the DiT (it only needs the frozen encoder)
        import multiprocessing as mp
        dec_proc = mp.get_context("spawn").Process(
            target=_decoder_process, args=(preset.name, str(work), args.seed, args.decoder_steps))
        dec_proc.start()
    if "dit" in stages:
        info = train_dit(preset, work, args.seed, DiTRecipe(steps=args.dit_steps, stop_at=DIT_A_STOP), phase="A")
        logger.info("dit phase A done in %.0fs: loss %.4f", info["wall_s"], info["final_loss"])
        summary["dit_A"] = {k: v for k, v in info.items() if k != "history"}
    if "dit" in stages or "dit_b" in stages:
        info = train_dit(preset, work, args.seed, DIT_B, phase="B")
        logger.info("dit phase B done in %.0fs: loss %.4f", info["wall_s"], info["final_loss"])
        summary["dit_B"] = {k: v for k, v in info.items() if k != "history"}
    if dec_proc is not None:
        dec_proc.join()
        if dec_proc.exitcode != 0:
            raise SystemExit("the VAE decoder fine-tune failed")
        summary["vae_decoder"] = json.loads((work / "vae_decoder.json").read_text())
    if "hr" in stages:   # shipped in the bundle either way; the preset's compressor mode decides whether it is used
        from .train_hr import train_hr
        info = train_hr(preset, work, args.seed, steps=args.hr_steps)
        summary["hr"] = {k: v for k, v in info.items() if k != "history"}
    summary_path.write_text(json.dumps(summary, indent=2))
    if "pack" in stages:
        summary["command"] = "python -m toyworld.train " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
        summary["this_run_wall_s"] = time.time() - t_all
        pack(preset, work, args.out, summary)


if __name__ == "__main__":
    main()
