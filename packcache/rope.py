"""Wan's 3D rotary embedding, computed from positions instead of a fixed table.

Wan (and diffusers' `WanRotaryPosEmbed`) reads angles from a 1,024-entry table per axis, which ends every run at
~256 s of video. Here angles are `position * inv_freq`, computed in float64 for any real position (fractional
ones too, for compressed tokens), so the cache can place keys wherever the packing needs them.

Layout per head (diffusers' convention): adjacent pairs (2c, 2c+1) form complex channel c; the first `t_dim/2`
channels rotate with time, the next `h_dim/2` with height, the last `w_dim/2` with width (44/42/42 for d=128).
Moving a cached key in time is a rotation of its temporal channels only: rotate_temporal().
"""

from __future__ import annotations

import torch


class Rope3D:
    def __init__(self, head_dim: int, theta: float = 10000.0):
        self.head_dim = head_dim
        self.h_dim = self.w_dim = 2 * (head_dim // 6)
        self.t_dim = head_dim - self.h_dim - self.w_dim

        def inv_freq(dim: int) -> torch.Tensor:
            return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu")[: dim // 2] / dim))

        # always on the CPU in float64, even when the model is built under a meta-device context
        self.inv_freq_t = inv_freq(self.t_dim)  # (t_dim/2,)
        self.inv_freq_h = inv_freq(self.h_dim)
        self.inv_freq_w = inv_freq(self.w_dim)

    def cos_sin(self, positions: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (N, 3) as (t, y, x), any real values -> cos, sin of shape (N, head_dim/2), float32."""
        pos = positions.to(torch.float64).cpu()
        angles = torch.cat(
            [
                pos[:, 0:1] * self.inv_freq_t,
                pos[:, 1:2] * self.inv_freq_h,
                pos[:, 2:3] * self.inv_freq_w,
            ],
            dim=1,
        )  # (N, head_dim/2)
        return angles.cos().float().to(device), angles.sin().float().to(device)

    def temporal_cos_sin(self, delta: torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """delta (M,) temporal shifts -> cos, sin of shape (M, t_dim/2), float32."""
        angles = delta.to(torch.float64).cpu()[:, None] * self.inv_freq_t
        return angles.cos().float().to(device), angles.sin().float().to(device)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, N, H, D) by per-token angles: cos/sin (N, D/2) (or broadcastable to (B, N, 1, D/2))."""
        if cos.dim() == 2:
            cos, sin = cos[None, :, None, :], sin[None, :, None, :]
        xf = x.float()
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.empty_like(xf)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out.to(x.dtype)

    def rotate_temporal(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None):
        """Move keys in time: multiply only the temporal channels by e^{i theta_t delta}; spatial channels untouched.

        x (..., N, H, D); cos/sin broadcastable to (..., N, 1, t_dim/2). Writes into `out` when given (may be x).
        """
        if out is None:
            out = x.clone()
        elif out is not x:
            out[..., self.t_dim:] = x[..., self.t_dim:]
        xt = x[..., : self.t_dim].float()
        x1, x2 = xt[..., 0::2], xt[..., 1::2]
        r1 = x1 * cos - x2 * sin
        r2 = x1 * sin + x2 * cos
        out[..., 0 : self.t_dim : 2] = r1.to(out.dtype)
        out[..., 1 : self.t_dim : 2] = r2.to(out.dtype)
        return out


def grid_positions(
    frames: int, height: int, width: int, t_offsets: torch.Tensor | None = None, spatial_stride: float = 1.0
) -> torch.Tensor:
    """(t, y, x) positions of a token grid flattened frame-major (the patch-embedding order), shape (F*H*W, 3).

    t_offsets: per-frame temporal positions (F,), default 0..F-1. spatial_stride > 1 places a coarse grid on the
    full-resolution grid's coordinates (cell centres), e.g. compressed tokens: y = s*i + (s-1)/2.
    """
    t = torch.arange(frames, dtype=torch.float64) if t_offsets is None else t_offsets.to(torch.float64)
    y = torch.arange(height, dtype=torch.float64) * spatial_stride + (spatial_stride - 1) / 2
    x = torch.arange(width, dtype=torch.float64) * spatial_stride + (spatial_stride - 1) / 2
    tt, yy, xx = torch.meshgrid(t, y, x, indexing="ij")
    return torch.stack([tt.reshape(-1), yy.reshape(-1), xx.reshape(-1)], dim=1)
