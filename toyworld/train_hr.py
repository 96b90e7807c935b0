"""Stage 4 of `toyworld.train`: the HR compressor branch, trained end-to-end through the frozen DiT.

One forward pass reproduces the attention view the packed cache builds at inference. Both come from the same
`packcache.layout.ContextLayout` (positions on the relative timeline, who attends to whom): this stage builds the
layout of a chunk whose context is [sink ; compressed mids ; recent], takes its `training_view()` (each mid block
preceded by its full-resolution source chunk, every chunk attending to what it attended when it was committed at
inference) and runs it through `CausalWanModel.forward_view`. tests/test_layout.py holds this view equal to the
cache's.

Only the current (noisy) chunk's flow-matching loss is used; gradients reach the HR convs through the compressed
tokens' keys and values in every layer. The LR branch's tokens do not depend on trainable weights, so they are
computed once per clip (decode-pool-encode through the frozen VAE) before training.
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
        for c in range(n_chunks):
            pix = px[:, :, slice(*preset.chunk_video_frames(c))]
            tok = MidCompressor.lr_branch(compressor, pix, block_grid)         # (1, D, Tc, hc, wc)
            per.append(tok.flatten(2).transpose(1, 2)[0])
        out.append(torch.stack(per))
    return torch.stack(out)


def _token_spans(view) -> list[tuple]:
    """(segment, first token, end token) of every segment of a training view, in sequence order."""
    spans, pos = [], 0
    for seg in view.segments:
        spans.append((seg, pos, pos + seg.tokens))
        pos += seg.tokens
    return spans


class MidAffinity:
    """`forward_view`'s observer: per layer, the affinity the packed cache's top-k selection gives each mid block of
    a training view, (M, B) (`packcache.selection.block_affinity`, kept differentiable).

    As the cache scores its bank (`BoundedKVCache._scores`): the summed queries of the recent chunks and the current
    chunk at their packed positions, and every mid block's summed keys moved in time to the newest mid block's
    start (the cache rotates its whole bank to that one position, so a block's score does not depend on its slot).
    tests/test_layout.py holds the two equal."""

    def __init__(self, view, rope, head_fraction: float):
        self.rope, self.head_fraction = rope, head_fraction
        spans = _token_spans(view)
        self.queries = [(a, b) for seg, a, b in spans if seg.kind in ("recent", "current")]
        self.mids = [(a, b) for seg, a, b in spans if seg.kind == "mid"]
        mids = [seg for seg, _, _ in spans if seg.kind == "mid"]
        self.key_count = mids[0].tokens if mids else 0
        self.shift = torch.tensor([mids[-1].start - m.start for m in mids], dtype=torch.float64)
        self.layers: list[torch.Tensor] = []

    def __call__(self, layer: int, q_rot: torch.Tensor, k_rot: torch.Tensor) -> None:
        from packcache.selection import block_affinity
        if not self.mids:
            return
        q_sum = sum(q_rot[:, a:b].float().sum(dim=1) for a, b in self.queries)                 # (B, H, D)
        count = sum(b - a for a, b in self.queries)
        ks = torch.stack([k_rot[:, a:b].float().sum(dim=1) for a, b in self.mids])             # (M, B, H, D)
        cos, sin = self.rope.temporal_cos_sin(self.shift, ks.device)
        ks = self.rope.rotate_temporal(ks, cos[:, None, None], sin[:, None, None])
        self.layers.append(block_affinity(q_sum, count, ks, self.key_count, self.head_fraction))


class MidAttention:
    """`forward_view`'s observer: per layer, the share of the current chunk's attention that lands on each mid block,
    (B, M), averaged over heads and query tokens (kept differentiable).

    What the DiT reads from a mid block goes through this share. Session 23 measured it on the training view of the
    memory clips: 1.5% on the subject's block in layer 0, 0.04-0.1% in layers 1-3 (uniform over the 196 keys would be
    1% per two-token block), so the flow loss's gradient towards reading the block (proportional to the share) was
    too weak to teach it."""

    def __init__(self, view):
        spans = _token_spans(view)
        self.current = next((a, b) for seg, a, b in spans if seg.kind == "current")
        self.mids = [(a, b) for seg, a, b in spans if seg.kind == "mid"]
        a, b = self.current
        self.mask = view.mask()[a:b]                                                        # (Nq, N)
        self.layers: list[torch.Tensor] = []

    def __call__(self, layer: int, q_rot: torch.Tensor, k_rot: torch.Tensor) -> None:
        if not self.mids:
            return
        a, b = self.current
        q = q_rot[:, a:b].float().transpose(1, 2)                                          # (B, H, Nq, D)
        k = k_rot.float().transpose(1, 2)                                                   # (B, H, N, D)
        logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        p = logits.masked_fill(~self.mask.to(q.device), float("-inf")).softmax(dim=-1)    # as `attention` does
        self.layers.append(torch.stack([p[..., s:e].sum(-1).mean(dim=(1, 2)) for s, e in self.mids], dim=1))


def packed_view_loss(preset, model, compressor, x0: torch.Tensor, lr_tok: torch.Tensor, text, gen: torch.Generator,
                     current: int, mids: list[int], recipe=None, fg: torch.Tensor | None = None,
                     affinity_out: list | None = None, attention_out: list | None = None,
                     teacher: torch.nn.Module | None = None) -> torch.Tensor:
    """Flow-matching loss of chunk `current` denoised against [sink ; compressed `mids` ; recent] (see module doc).
    `fg` (B, T, h, w): the current chunk's foreground share per latent position, weighed up by the recipe's
    `fg_weight` as the DiT stage does (the memory stage: the subject is what the mid blocks are for).
    `affinity_out`: when given, receives the (layers, M, B) selection affinities of the `mids` (`MidAffinity`);
    `attention_out` the (layers, B, M) shares of the current chunk's attention on them (`MidAttention`).
    `teacher`: a frozen DiT whose velocity on the same view is the target instead of the clip's (`train.anchored`)."""
    from packcache.compress import block_grid
    from packcache.layout import build_layout

    from .train import DiTRecipe, anchored, draw_sigmas, foreground_weight
    c = preset.cache
    T = c.chunk_frames
    b = x0.shape[0]
    chunk_grid = model.token_grid(T, preset.latent_height, preset.latent_width)
    bgrid = block_grid(*chunk_grid)
    anchor = float((c.sink_chunks + c.mid_topk + c.recent_chunks) * T)
    layout = build_layout(chunk_grid, bgrid, anchor, sink=list(range(c.sink_chunks)), mid=mids,
                          recent=list(range(current - c.recent_chunks, current)), current=current,
                          recent_chunks=c.recent_chunks)
    view = layout.training_view()
    sl = lambda j: x0[:, :, j * T:(j + 1) * T]   # noqa: E731

    dev = x0.device   # random draws come from `gen` on the CPU, so every device draws the same
    sigma = draw_sigmas((b,), preset, recipe or DiTRecipe(), gen).to(dev)   # as the DiT stage trains
    eps = noise_like(sl(current), gen)
    xn = (1 - sigma)[:, None, None, None, None] * sl(current) + sigma[:, None, None, None, None] * eps
    inputs, timesteps = [], []
    for seg in view.segments:
        if seg.kind == "mid":
            inputs.append(lr_tok[:, seg.chunk] + compressor.hr_tokens(sl(seg.chunk), bgrid).to(lr_tok.dtype))
        else:
            inputs.append(xn if seg.kind == "current" else sl(seg.chunk))
        timesteps.append(sigma * 1000.0 if seg.kind == "current" else torch.zeros(b, device=dev))
    affinity = MidAffinity(view, model.rope, c.score_head_fraction) if affinity_out is not None else None
    shares = MidAttention(view) if attention_out is not None else None
    observers = [o for o in (affinity, shares) if o is not None]

    def observe(layer: int, q_rot: torch.Tensor, k_rot: torch.Tensor) -> None:
        for o in observers:
            o(layer, q_rot, k_rot)
    v = model.forward_view(view, inputs, timesteps, model.embed_text(text), observe=observe if observers else None)
    if affinity is not None:
        affinity_out.append(torch.stack(affinity.layers))
    if shares is not None:
        attention_out.append(torch.stack(shares.layers))
    target = anchored(teacher, lambda m: m.forward_view(view, inputs, timesteps, m.embed_text(text)))
    if target is None:
        target = eps - sl(current)
    if fg is None:
        return F.mse_loss(v.float(), target)
    w = 1.0 + foreground_weight(fg.float().to(dev), (recipe or DiTRecipe()).fg_weight)          # (B, T, h, w)
    err = (v.float() - target).pow(2).mean(dim=1)
    return (err * w).sum() / w.sum()


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
        recent = preset.cache.recent_chunks
        current = int(rng.integers(sink + recent + 1, n_chunks))              # has >= 1 mid chunk
        mids = list(range(sink, current - recent))[-preset.cache.mid_topk:]
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
