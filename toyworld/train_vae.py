"""Stage 1 of `toyworld.train`: the toy preset's small `AutoencoderKLWan` (Wan2.2 layout), from scratch.

What makes a VAE this small train in minutes on a CPU (each measured on a fixed batch, see toyworld/README.md):
- Mean squared error, not L1. With L1 every Wan layout we tried sat at the "mean colour" plateau (L1 ~0.24) for
  hundreds of steps: the sign-only gradient carries almost no structure once the output is near the median.
- The Wan2.2 layout (2x2 pixel patches, parameter-free shortcuts across each resolution change): a quarter of the
  pixels per conv and a direct path from pixels to latents.
- Foreground pixels weigh more: shapes cover ~5% of a frame, yet their colour is what prompts name and metrics read.

Clips of 9 frames (3 latent frames) train both the first-frame path and the grouped path whose causal cache holds a
previous group. Single frames (the first-frame path, cheapest) fill the other steps. That is not all the streaming
decoder's steady state needs: a stream's later chunks decode from a cache carried over many chunks, and a VAE trained
on 9 frames alone textures their flat areas and splits their subjects (session 18, `StreamDecoderRecipe`), which the
`vae_stream` stage fixes on the decoder alone. At the end the latent normalisation is folded into the quant convs,
so the preset's latents_mean/std stay 0/1 and the DiT sees unit-scale latents.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from packcache.vae import decode_unclamped, frames_to_uint8

from .common import cosine_lr, progress, save_curve, to_tensor
from .metrics import foreground
from .world import World

logger = logging.getLogger("toyworld.train")


@dataclass
class VAERecipe:
    steps: int = 4000
    clip_batch: int = 4
    clip_frames: int = 9
    image_batch: int = 12
    lr: float = 1e-3
    fg_weight: float = 4.0        # foreground pixels count 1 + fg_weight times
    latent_noise: float = 0.1     # decoder input noise, relative to the latents' spread: tolerates DiT error
    latent_l2: float = 1e-3       # keeps the latents' scale from drifting
    blotch: float = 0.0           # blotchy decoder input noise (`blotches`), amplitude drawn per clip in [0, blotch)
    blotch_blur: float = 1.0      # its Gaussian blur, latent pixels


@dataclass
class VAETuneRecipe:
    """The `vae_tune` stage: the trained VAE, encoder and decoder, fine-tuned against what breaks the scene readers
    after encode + decode (`toyworld.evaluate.vae_scene_ceiling`): rims of a neighbouring hue and ghosts of the
    complementary colour beside a subject (each a second "subject"), and rounded square corners. Measured on the
    session-16 VAE, 800 steps: one subject in 67 -> 81% of frames, shapes read right 88 -> 97% (squares 75 ->
    96%), patterns 83 -> 81% (solid backgrounds stay faintly textured)."""
    steps: int = 800
    lr: float = 3e-4
    chroma_weight: float = 2.0    # the colour part of the error (each pixel minus its channel mean), squared
    rim_weight: float = 4.0       # extra weight on the background ring around a subject, where rims and ghosts are
    rim_px: int = 2               # the ring's width


@dataclass
class StreamDecoderRecipe:
    """The `vae_stream` stage: the decoder alone fine-tuned on stream-length clips, encoded chunk by chunk as the DiT's
    training latents are (`encode_by_chunks`) and decoded with the carried cache, under the `vae_tune` loss. The
    encoder is frozen, so the latents a trained DiT draws keep their meaning and no DiT stage has to run again.
    Measured on the session-17 VAE (its scene ceiling by chunk index, chunk-wise encoded, 6 chunks): one subject
    in chunks 1-5 90-97% -> 98-100% of frames, the luma spread of a plain background 4.8-6.3 -> 2.5-3.3 (chunk 0:
    2.2 either way), the pattern in chunks 1-5 75% -> 75-92%; through the shipped DiT (17 prompts x 8 chunks,
    guidance 2) one subject 79 -> 88% of frames."""
    steps: int = 400
    lr: float = 3e-4
    clip_frames: int = 33         # three stream chunks (9 + 12 + 12 frames): chunk 2 decodes from a carried cache
    clip_batch: int = 4
    blotch: float = 0.0           # VAERecipe.blotch: 0 here, BLOTCH_DECODER's stage sets it
    blotch_blur: float = 1.0


BLOTCH_DECODER = StreamDecoderRecipe(steps=300, blotch=0.6, blotch_blur=0.5)
"""The `vae_blotch` stage (session 20): the stream decoder fine-tuned, under the same loss, on latents with blotches
added: Gaussian noise blurred over half a latent pixel, one draw held over each chunk's three latent frames, of an
amplitude drawn per clip up to 0.6 (the latents are unit-scale). That is the DiT's error on a plain background: the
model's latents there spread no more than the encoder's (0.28 vs 0.27 away from the subject), but the decoder turned
their blotches into a texture of luma spread 6-7 where the true latents give 2.8. Per-frame white noise it had
learned to tolerate (`VAERecipe.latent_noise`; the reader's median over a chunk removes the rest), a draw held over a
chunk it had not. The encoder and so the
DiT's latents stay as they were. Measured from the shipped VAE and DiT over every plain-background prompt of the
evaluation (18 x 8 chunks): the texture's luma spread (10th/50th/90th percentile) 4.8/6.2/8.3 -> 4.1/5.3/6.9. The
VAE alone on rendered clips: plain backgrounds flatter (median spread 2.8 -> 2.6), gradients a little fainter
(16 -> 14), every pattern read as before. Tried beside it: blur 1 latent pixel at 0.35 / 0.6 / 0.9 (0.6 and 0.9
flatten gradients more: median spread 11 and 9; 0.9 leaves true plain backgrounds more textured, 2.8 -> 3.1)."""


def subject_rims(x: torch.Tensor, px: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground, the `px`-wide background ring around it), each (B, 1, F, H, W) float on x's device."""
    from scipy import ndimage
    fg, _ = foreground(frames_to_uint8(x))
    ring = ndimage.binary_dilation(fg, structure=np.ones((1, 1, 2 * px + 1, 2 * px + 1), bool)) & ~fg
    as_t = lambda m: torch.from_numpy(m.astype(np.float32))[:, None].to(x.device)
    return as_t(fg), as_t(ring)


def vae_tune_loss(vae, x: torch.Tensor, recipe: VAERecipe, tune: VAETuneRecipe,
                  encode=None) -> tuple[torch.Tensor, dict]:
    """`vae_loss` with the subject's ring weighted up, plus the chroma error weighted the same way. `encode(vae, x)`
    (default: the whole clip's posterior mean) -> latents."""
    mu, rec = reconstruct(vae, x, recipe, encode)
    fg, ring = subject_rims(x, tune.rim_px)
    w = 1 + recipe.fg_weight * fg + tune.rim_weight * ring
    mse = ((rec - x).pow(2) * w).sum() / (w.sum() * 3)
    chroma = lambda a: a - a.mean(1, keepdim=True)
    cw = 1 + tune.rim_weight * ring
    cerr = ((chroma(rec) - chroma(x)).pow(2) * cw).sum() / (cw.sum() * 3)
    loss = mse + tune.chroma_weight * cerr + recipe.latent_l2 * mu.pow(2).mean()
    return loss, {"weighted_mse": mse.item(), "chroma": cerr.item()}


def tune_vae(preset, work: Path, seed: int, tune: VAETuneRecipe, world: World, device: str = "cpu") -> dict:
    """Stage `vae_tune`: the work folder's vae.pt fine-tuned per `tune`, the normalisation folded again (so the
    latents stay unit-scale), written back; the untuned copy is kept as vae_untuned.pt."""
    recipe = VAERecipe()
    torch.manual_seed(seed + 5)
    vae = load_vae(preset, work, device=device).train().requires_grad_(True)
    (work / "vae_untuned.pt").write_bytes((work / "vae.pt").read_bytes())
    hist, wall = vae_steps(vae, world, preset, recipe, tune.steps, tune.lr, 50,
                           lambda v, x: vae_tune_loss(v, x, recipe, tune), "vae_tune", work / "loss_vae_tune.png", device)
    vae.eval().requires_grad_(False)
    stats = fold_normalisation(vae, World(seed + 2, style=world.style), preset)
    return save_tuned_vae(vae, work, "vae_tune", tune, hist, wall, latent_stats_before_fold=stats)


def save_tuned_vae(vae, work: Path, name: str, tune, hist: dict[str, list[float]], wall: float, **extra) -> dict:
    """A tuning stage's end: the VAE written back as vae.pt, its report (recipe, last 100 steps' loss parts and
    `extra`) as `name`.json."""
    torch.save({k: v.cpu() for k, v in vae.state_dict().items()}, work / "vae.pt")
    info = {"wall_s": wall, "steps": tune.steps, "recipe": tune.__dict__,
            "final_weighted_mse": float(np.mean(hist["weighted_mse"][-100:])),
            "final_chroma": float(np.mean(hist["chroma"][-100:])), **extra}
    (work / f"{name}.json").write_text(json.dumps(info))
    return info


def tune_stream_decoder(preset, work: Path, seed: int, tune: StreamDecoderRecipe, world: World,
                        device: str = "cpu", name: str = "vae_stream") -> dict:
    """Stage `vae_stream` (and `vae_blotch`, with `BLOTCH_DECODER` and that `name`): the work folder's vae.pt with
    its decoder (and post-quant conv) fine-tuned per `tune`, written back; the encoder, quant conv and so the
    latents are untouched (no normalisation to fold again). The previous copy is kept as vae_before_stream.pt
    (vae_before_blotch.pt)."""
    recipe = VAERecipe(clip_frames=tune.clip_frames, clip_batch=tune.clip_batch, blotch=tune.blotch,
                       blotch_blur=tune.blotch_blur)
    loss_tune = VAETuneRecipe()
    torch.manual_seed(seed + (9 if name == "vae_stream" else 10))
    vae = load_vae(preset, work, device=device)
    vae.decoder.requires_grad_(True).train()
    vae.post_quant_conv.requires_grad_(True)
    (work / f"vae_before_{name.removeprefix('vae_')}.pt").write_bytes((work / "vae.pt").read_bytes())
    chunkwise = torch.no_grad()(lambda v, x: encode_chunkwise(v, x, preset.cache.chunk_frames))
    hist, wall = vae_steps(vae, world, preset, recipe, tune.steps, tune.lr, 20,
                           lambda v, x: vae_tune_loss(v, x, recipe, loss_tune, encode=chunkwise),
                           name, work / f"loss_{name}.png", device, images=False)
    vae.eval().requires_grad_(False)
    return save_tuned_vae(vae, work, name, tune, hist, wall)


def encode_chunkwise(vae, x: torch.Tensor, chunk_latents: int = 3) -> torch.Tensor:
    """(B, 3, F, H, W) -> latents, each stream chunk encoded afresh: chunk 0 from its 9 frames, every later chunk
    from its previous frame plus its own 12 (keeping the last 3 latents). Encoding a long clip in one go lets the
    causal encoder's state drift: by chunk 7-8 the subject's colour is lost in 12% of clips, chunk by chunk in none
    (toyworld/README.md), and the DiT learns whatever drift its targets carry."""
    from packcache.vae import encode_by_chunks
    return torch.cat(encode_by_chunks(lambda c: vae.encode(c).latent_dist.mean, x, chunk_latents,
                                      vae.config.scale_factor_temporal), dim=2)


def build_vae(preset):
    from diffusers import AutoencoderKLWan
    return AutoencoderKLWan(**preset.vae.diffusers_kwargs())


def load_vae(preset, work: Path, name: str = "vae.pt", device: str = "cpu"):
    vae = build_vae(preset)
    vae.load_state_dict(torch.load(work / name, map_location="cpu"))
    return vae.to(device).eval().requires_grad_(False)


def clip_batch(world: World, batch: int, frames: int, size: int) -> torch.Tensor:
    """Toy clips (B, 3, F, H, W) in [-1, 1]."""
    return torch.stack([to_tensor(world.sample(frames, size, augment_caption=False)[0]) for _ in range(batch)])


def pixel_weights(x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """1 + fg_weight on foreground pixels (the metrics' own test: saturated and bright), (B, 1, F, H, W), on x's
    device."""
    mask, _ = foreground(frames_to_uint8(x))
    return torch.from_numpy(1.0 + fg_weight * mask.astype(np.float32))[:, None].to(x.device)


def reconstruct(vae, x: torch.Tensor, recipe: VAERecipe, encode=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE stages' pass: posterior mean (or `encode(vae, x)`), `latent_noise` of its spread added (the decoder
    learns to tolerate the DiT's error), unclamped decode -> (latents, reconstruction)."""
    mu = vae.encode(x).latent_dist.mean if encode is None else encode(vae, x)
    z = mu + recipe.latent_noise * mu.detach().std() * torch.randn_like(mu)
    if recipe.blotch > 0:
        amp = recipe.blotch * torch.rand(mu.shape[0], 1, 1, 1, 1, device=mu.device)
        z = z + amp * blotches(mu.shape, recipe.blotch_blur).to(mu.device)
    return mu, decode_unclamped(vae, z)


def blotches(shape: torch.Size, blur: float, chunk_latents: int = 3) -> torch.Tensor:
    """Unit-spread noise of `shape` (B, C, T, H, W), blurred over `blur` latent pixels and held over each chunk's
    `chunk_latents` frames: the DiT's error on a plain background, which a whole chunk is denoised with at once."""
    import torch.nn.functional as F
    b, c, t, h, w = shape
    n = torch.randn(b * c * -(-t // chunk_latents), 1, h, w)
    if blur > 0:
        r = min(3, h - 1, w - 1)
        k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * blur ** 2))
        k = k / k.sum()
        n = F.conv2d(F.pad(n, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        n = F.conv2d(F.pad(n, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    n = n.reshape(b, c, -1, h, w)
    n = n / n.std(dim=(1, 3, 4), keepdim=True).clamp_min(1e-6)
    return n.repeat_interleave(chunk_latents, dim=2)[:, :, :t]


def vae_loss(vae, x: torch.Tensor, recipe: VAERecipe) -> tuple[torch.Tensor, dict]:
    mu, rec = reconstruct(vae, x, recipe)
    w = pixel_weights(x, recipe.fg_weight)
    mse = ((rec - x).pow(2) * w).sum() / (w.sum() * 3)
    loss = mse + recipe.latent_l2 * mu.pow(2).mean()
    return loss, {"weighted_mse": mse.item(), "l1": (rec - x).abs().mean().item()}


def vae_steps(vae, world: World, preset, batch: VAERecipe, steps: int, lr: float, warmup: int, loss_fn, name: str,
              curve: Path, device: str = "cpu", images: bool = True) -> tuple[dict[str, list[float]], float]:
    """The VAE stages' loop: AdamW on a cosine schedule over the parameters that take gradients, clips
    (`batch.clip_batch` x `clip_frames`) and, with `images`, single frames (`image_batch`) on alternate steps,
    gradients clipped at 1, a log line and the curve every 100 steps. `loss_fn(vae, x) -> (loss, parts)`.
    -> (each part per step, wall seconds)."""
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    hist: dict[str, list[float]] = {}
    t0 = time.time()
    for step in progress(range(steps), steps, name):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup=warmup)
        if step % 2 == 0 or not images:
            x = clip_batch(world, batch.clip_batch, batch.clip_frames, preset.height)
        else:
            x = clip_batch(world, batch.image_batch, 1, preset.height)
        loss, parts = loss_fn(vae, x.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, v in parts.items():
            hist.setdefault(k, []).append(v)
        if step % 100 == 0 or step == steps - 1:
            logger.info("%s step %d %s (%.0fs)", name, step, " ".join(f"{k} {v:.4f}" for k, v in parts.items()),
                        time.time() - t0)
            save_curve(curve, hist, name)
    return hist, time.time() - t0


def train_vae(preset, work: Path, seed: int, recipe: VAERecipe, device: str = "cpu") -> dict:
    torch.manual_seed(seed)
    world = World(seed + 1)
    vae = build_vae(preset).to(device).train()
    hist, wall = vae_steps(vae, world, preset, recipe, recipe.steps, recipe.lr, 100, lambda v, x: vae_loss(v, x, recipe),
                           "vae", work / "loss_vae.png", device)
    vae.eval()
    stats = fold_normalisation(vae, World(seed + 2), preset)
    torch.save({k: v.cpu() for k, v in vae.state_dict().items()}, work / "vae.pt")
    info = {"wall_s": wall, "steps": recipe.steps, "final_l1": float(np.mean(hist["l1"][-100:])),
            "final_weighted_mse": float(np.mean(hist["weighted_mse"][-100:])), "latent_stats_before_fold": stats}
    (work / "vae.json").write_text(json.dumps(info))
    return info


@torch.no_grad()
def fold_normalisation(vae, world: World, preset, clips: int = 32) -> dict:
    """Measure per-channel latent mean/std (posterior means) and fold them into the 1x1x1 quant convs: the encoder
    then emits (z - mean)/std and the decoder accepts it, so the preset's normalisation is 0/1."""
    x = clip_batch(world, clips, 21, preset.height).to(vae.device)
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
