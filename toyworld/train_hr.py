"""Stage 4 of `toyworld.train`: the HR compressor branch, trained end-to-end through the frozen DiT.

One forward pass reproduces the attention view the packed cache builds at inference (`packcache.cache`), on the
relative timeline the cache uses (anchor A = (sink + top-k + recent) * T, context packed backwards from it):

    tokens            positions (T = 3)            attends to
    sink chunks       [0, 2T)                     earlier sink chunks and itself (block-causal)
    mid chunk j       [m_j, m_j + T)              the sink and itself (only its compressed tokens read it)
    compressed j      m_j + {0, T/2} (x4 grid)    mid chunk j and itself (as `compressor_writer` does)
    recent chunk      [A - T, A)                  sink, compressed mids, itself
    noisy chunk       [A, A + T)                  sink, compressed mids, recent, itself  (the packed view)

Only the noisy chunk's flow-matching loss is used; gradients reach the HR convs through the compressed tokens'
keys and values in every layer. The LR branch's tokens do not depend on trainable weights, so they are computed
once per clip (decode-pool-encode through the frozen VAE) before training.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .common import noise_like

logger = logging.getLogger("toyworld.train")


def _positions(model, grid, t0: float, t_offsets=None, spatial_stride: float = 1.0) -> torch.Tensor:
    from packcache.rope import grid_positions
    t = torch.arange(grid[0], dtype=torch.float64) if t_offsets is None else t_offsets
    return grid_positions(*grid, t + t0, spatial_stride=spatial_stride)


@torch.no_grad()
def lr_tokens_for(preset, model, vae_wrapper, compressor, latents: torch.Tensor, block_grid) -> torch.Tensor:
    """LR-branch tokens of every chunk of each clip: (N, chunks, block_tokens, D). Pixels come from one decode of
    the whole clip, sliced per chunk as the streaming decoder emits them (9 frames, then 12)."""
    from packcache.compress import MidCompressor
    T = preset.cache.chunk_frames
    n_chunks = latents.shape[2] // T
    out = []
    for i in range(latents.shape[0]):
        px = vae_wrapper.vae.decode(latents[i:i + 1].float()).sample           # (1, 3, 81, H, W)
        per = []
        start = 0
        for c in range(n_chunks):
            nf = 1 + 4 * (T - 1) if c == 0 else 4 * T
            pix = px[:, :, start:start + nf]
            start += nf
            tok = MidCompressor.lr_branch(compressor, pix, block_grid)         # (1, D, Tc, hc, wc)
            per.append(tok.flatten(2).transpose(1, 2)[0])
        out.append(torch.stack(per))
    return torch.stack(out)


def packed_view_loss(preset, model, compressor, x0: torch.Tensor, lr_tok: torch.Tensor, text, gen: torch.Generator,
                     current: int, mids: list[int], recipe=None) -> torch.Tensor:
    """Flow-matching loss of chunk `current` denoised against [sink ; compressed `mids` ; recent] (see module doc)."""
    from packcache.model import AttnPlan
    T = preset.cache.chunk_frames
    c = preset.cache
    b = x0.shape[0]
    sink = list(range(c.sink_chunks))
    recent = current - 1
    A = float((c.sink_chunks + c.mid_topk + c.recent_chunks) * T)
    chunk_grid = model.token_grid(T, preset.latent_height, preset.latent_width)
    from packcache.compress import block_grid as _bg
    bgrid = _bg(*chunk_grid)
    n_c = chunk_grid[0] * chunk_grid[1] * chunk_grid[2]
    sl = lambda j: x0[:, :, j * T:(j + 1) * T]   # noqa: E731

    from .train import DiTRecipe, draw_sigmas
    dev = x0.device   # random draws come from `gen` on the CPU, so every device draws the same
    sigma = draw_sigmas((b,), preset, recipe or DiTRecipe(), gen).to(dev)   # as the DiT stage trains
    eps = noise_like(sl(current), gen)
    xn = (1 - sigma)[:, None, None, None, None] * sl(current) + sigma[:, None, None, None, None] * eps

    # packed starts, walking back from the anchor: recent, mids, sink
    cursor = A - T
    recent_start = cursor
    mid_starts = []
    for _ in mids:
        cursor -= T
        mid_starts.insert(0, cursor)
    sink_starts = []
    for _ in sink:
        cursor -= T
        sink_starts.insert(0, cursor)

    parts, pos, group, tsteps = [], [], [], []   # group ids define the mask

    def add(tokens, positions, gid, t):
        parts.append(tokens)
        pos.append(positions)
        group.extend([gid] * tokens.shape[1])
        tsteps.append(torch.full((b, tokens.shape[1]), float(t)))

    for k, j in enumerate(sink):
        add(model._patchify(sl(j)), _positions(model, chunk_grid, sink_starts[k]), ("sink", k), 0.0)
    hr = compressor.hr
    offsets = torch.arange(bgrid[0], dtype=torch.float64) * (T / bgrid[0])
    for k, j in enumerate(mids):
        add(model._patchify(sl(j)), _positions(model, chunk_grid, mid_starts[k]), ("midfull", k), 0.0)
        h = hr(sl(j).to(hr.proj.weight.dtype))
        h = compressor._fit(h, bgrid).flatten(2).transpose(1, 2)               # (B, n_b, D)
        add(lr_tok[:, j] + h, _positions(model, bgrid, mid_starts[k], offsets, spatial_stride=4.0), ("mid", k), 0.0)
    add(model._patchify(sl(recent)), _positions(model, chunk_grid, recent_start), ("recent", 0), 0.0)
    add(model._patchify(xn), _positions(model, chunk_grid, A), ("noisy", 0), 0.0)
    tsteps[-1] = (sigma.cpu() * 1000.0)[:, None].expand(b, n_c)

    x = torch.cat(parts, dim=1)
    positions = torch.cat(pos)
    ts = torch.cat(tsteps, dim=1).to(dev)
    n = x.shape[1]
    kinds = [g[0] for g in group]
    idx = [g[1] for g in group]
    mask = torch.zeros(n, n, dtype=torch.bool)
    kinds_t = {k: torch.tensor([kk == k for kk in kinds]) for k in ("sink", "midfull", "mid", "recent", "noisy")}
    idx_t = torch.tensor(idx)
    same = idx_t[:, None] == idx_t[None, :]
    S, MF, MC, R, X = (kinds_t[k] for k in ("sink", "midfull", "mid", "recent", "noisy"))
    mask |= S[:, None] & S[None, :] & (idx_t[:, None] >= idx_t[None, :])
    mask |= MF[:, None] & (S[None, :] | (MF[None, :] & same))
    mask |= MC[:, None] & ((MF[None, :] | MC[None, :]) & same)
    mask |= R[:, None] & (S[None, :] | MC[None, :] | R[None, :])
    mask |= X[:, None] & (S[None, :] | MC[None, :] | R[None, :] | X[None, :])
    mask = mask.to(dev)

    prompt = model.embed_text(text)
    temb, proj = model._time(ts, x)
    cos, sin = model.rope.cos_sin(positions, x.device)
    h = model._blocks(x, prompt, proj, AttnPlan(cos=cos, sin=sin, mask=mask))
    v = model._head(h[:, -n_c:], temb[:, -n_c:], chunk_grid)
    return F.mse_loss(v.float(), eps - sl(current))


def train_hr(preset, work: Path, seed: int, steps: int = 300, batch: int = 8, clips: int = 96, lr: float = 1e-3,
             recipe=None, device: str = "cpu") -> dict:
    """`recipe`: the DiT stage's `DiTRecipe`, for its noise levels."""
    from packcache.compress import MidCompressor, block_grid
    from packcache.vae import VideoVAE

    from .common import cosine_lr, progress, save_curve
    from .train import CaptionSampler, build_model, final_dit_file
    from .train_vae import load_vae
    torch.manual_seed(seed + 10)
    chunkwise = work / "data_chunkwise.pt"      # the latents the final DiT trained on last (`recode` stage)
    data = torch.load(chunkwise if chunkwise.exists() else work / "data.pt")
    clips = min(clips, data["latents"].shape[0])
    latents = data["latents"][:clips].float().to(device)
    model = build_model(preset, seed)
    model.load_state_dict(torch.load(final_dit_file(work)))
    model.to(device).eval().requires_grad_(False)
    vae = VideoVAE(load_vae(preset, work, device=device), preset.vae)
    comp = MidCompressor(replace(preset.compressor, mode="hr+lr"), model.dim, model.patch_embedding, vae).to(device)
    chunk_grid = model.token_grid(preset.cache.chunk_frames, preset.latent_height, preset.latent_width)
    bgrid = block_grid(*chunk_grid)
    t0 = time.time()
    lr_tok = lr_tokens_for(preset, model, vae, comp, latents, bgrid)
    logger.info("hr: LR tokens for %d clips in %.0fs", clips, time.time() - t0)
    opt = torch.optim.AdamW(comp.hr.parameters(), lr=lr, weight_decay=0.0)
    captions = CaptionSampler(preset, data["scenes"][:clips], seed + 11)
    gen = torch.Generator().manual_seed(seed + 12)
    rng = np.random.default_rng(seed + 13)
    n_chunks = latents.shape[2] // preset.cache.chunk_frames
    sink = preset.cache.sink_chunks
    hist = []
    for step in progress(range(steps), steps, "hr"):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup=20)
        idx = torch.from_numpy(rng.integers(0, clips, size=batch)).to(device)
        current = int(rng.integers(sink + 2, n_chunks))                       # has >= 1 mid chunk
        mids = list(range(sink, current - 1))[-preset.cache.mid_topk:]
        text, _ = captions(idx.cpu().numpy())
        loss = packed_view_loss(preset, model, comp, latents[idx], lr_tok[idx], text.to(device), gen, current, mids,
                                recipe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(loss.item())
        if step % 50 == 0:
            logger.info("hr step %d loss %.4f", step, loss.item())
        if (work / "STOP_HR").exists():
            break
    state = {f"hr.{k}": v.detach().cpu().clone() for k, v in comp.hr.state_dict().items()}
    torch.save(state, work / "hr.pt")
    save_curve(work / "loss_hr.png", {"packed-view loss (HR trained)": hist}, "HR compressor, end-to-end")
    info = {"wall_s": time.time() - t0, "steps": len(hist), "first_loss": float(np.mean(hist[:20])),
            "final_loss": float(np.mean(hist[-50:])), "history": hist}
    (work / "hr.json").write_text(json.dumps(info))
    return info
