"""Dual-branch compression of a chunk into a mid block (~32x fewer tokens at 832x480).

HR branch (trainable): strided 3D convs on the chunk's latent 16xTxHxW: temporal 2x (16->c0), three spatial 2x
stages (c0->c1->c2->c3), SiLU between, then a 1x1x1 projection to the model width -> D x ceil(T/2) x H/8 x W/8.
The projection is zero-initialised, so an untrained HR branch adds nothing and the module starts as LR alone.

LR branch (no trainable weights of its own): the chunk's decoded pixels, average-pooled 2x in time and 4x in space,
re-encoded by the VAE and embedded by the model's own patch embedding: same token space as ordinary input tokens.
`pool` mode (zero-shot, no VAE pass): average-pool the latents 2x/4x/4x and patch-embed them.

Both branches land on the block grid (ceil(T/2), h_tok//4, w_tok//4): 2 x 7 x 13 = 182 tokens for a 4-frame chunk
at 832x480 (6,240 tokens -> 182, 34x). The tokens then run through the transformer at t=0 (`encode_tokens`) to
produce each layer's K/V.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .exact import batch_invariant_convs
from .presets import CompressorConfig


def block_grid(chunk_frames: int, h_tokens: int, w_tokens: int) -> tuple[int, int, int]:
    return (chunk_frames + 1) // 2, max(1, h_tokens // 4), max(1, w_tokens // 4)


def _pad_time_even(x: torch.Tensor) -> torch.Tensor:
    """Replicate the last frame when T is odd, so a 2x temporal stride covers every frame (3 -> 4 -> 2)."""
    if x.shape[2] % 2:
        x = torch.cat([x, x[:, :, -1:]], dim=2)
    return x


class HRBranch(nn.Module):
    def __init__(self, dim: int, channels: tuple[int, int, int, int] = (32, 128, 512, 2048), in_channels: int = 16):
        super().__init__()
        c0, c1, c2, c3 = channels
        self.temporal = nn.Conv3d(in_channels, c0, kernel_size=(2, 1, 1), stride=(2, 1, 1))
        self.spatial = nn.ModuleList(
            [nn.Conv3d(a, b, kernel_size=(1, 2, 2), stride=(1, 2, 2)) for a, b in ((c0, c1), (c1, c2), (c2, c3))]
        )
        self.proj = nn.Conv3d(c3, dim, kernel_size=1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.temporal(_pad_time_even(latents)))     # (B, c0, T/2, H, W)
        for conv in self.spatial:
            x = F.silu(conv(x))                                  # (B, c3, T/2, H/8, W/8) after three stages
        return self.proj(x)                                      # (B, D, T/2, H/8, W/8)


class MidCompressor(nn.Module):
    """latents (B,16,T,H,W) [+ decoded pixels (B,3,F,Hp,Wp)] -> compressed tokens (B, Tc*hc*wc, D)."""

    def __init__(self, config: CompressorConfig, dim: int, patch_embedding: nn.Conv3d, vae=None):
        super().__init__()
        self.mode = config.mode
        self.hr = HRBranch(dim, config.hr_channels) if "hr" in config.mode else None
        # shared with the transformer, not owned: keep it out of this module's state dict
        object.__setattr__(self, "_patch_embedding", patch_embedding)
        object.__setattr__(self, "_vae", vae)
        if "lr" in config.mode and vae is None:
            raise ValueError("compression mode with an LR branch needs the VAE")

    @property
    def needs_pixels(self) -> bool:
        return "lr" in self.mode

    def _fit(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        return x if tuple(x.shape[2:]) == grid else F.adaptive_avg_pool3d(x, grid)

    def lr_branch(self, pixels: torch.Tensor, grid) -> torch.Tensor:
        pooled = F.avg_pool3d(_pad_time_even(pixels.float()), kernel_size=(2, 4, 4))   # (B,3,F/2,H/4,W/4)
        usable = 1 + 4 * ((pooled.shape[2] - 1) // 4)     # Wan's causal encoder takes 1 + 4k frames (8 -> 5: 2 latents)
        pooled = pooled[:, :, :usable]
        latents = self._vae.encode(pooled.to(self._patch_embedding.weight.dtype))       # (B,16,T',H/32,W/32)
        return self._fit(self._patch_embedding(latents.to(self._patch_embedding.weight.dtype)), grid)

    def pool_branch(self, latents: torch.Tensor, grid) -> torch.Tensor:
        pooled = F.avg_pool3d(_pad_time_even(latents.float()), kernel_size=(2, 4, 4), ceil_mode=True)
        w = self._patch_embedding.weight
        # pooled latents are T/2 x H/4 x W/4; the (1,2,2) patch embedding takes them to the block grid
        return self._fit(self._patch_embedding(pooled.to(w.dtype)), grid)

    def forward(self, latents: torch.Tensor, grid: tuple[int, int, int], pixels: torch.Tensor | None = None):
        # a batch of sessions' chunks compresses each exactly as alone on the CPU (packcache/exact.py)
        with batch_invariant_convs(latents.device):
            return self._forward(latents, grid, pixels)

    def _forward(self, latents: torch.Tensor, grid: tuple[int, int, int], pixels: torch.Tensor | None):
        if self.mode == "pool":
            x = self.pool_branch(latents, grid)
        elif "lr" in self.mode:
            if pixels is None:
                raise ValueError("the LR branch needs the chunk's decoded pixels")
            x = self.lr_branch(pixels, grid)
        else:
            x = None
        if self.hr is not None:
            h = self._fit(self.hr(latents.to(self.hr.proj.weight.dtype)), grid).to(self._patch_embedding.weight.dtype)
            x = h if x is None else x + h
        return x.flatten(2).transpose(1, 2)   # (B, Tc*hc*wc, D)

    def hr_tokens(self, latents: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """The HR branch alone as tokens (B, Tc*hc*wc, D), with autograd (its training adds them to LR tokens)."""
        h = self._fit(self.hr(latents.to(self.hr.proj.weight.dtype)), grid)
        return h.flatten(2).transpose(1, 2)
