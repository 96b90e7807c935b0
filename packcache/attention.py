"""Attention kernels: flash-attn on CUDA when installed, PyTorch's scaled_dot_product_attention otherwise.

All tensors are (B, N, H, D), the layout Wan's processors and flash-attn use.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:  # optional extra: pip install 'packforcing-live[flash]'
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None


def flash_available() -> bool:
    return _flash_attn_func is not None and torch.cuda.is_available()


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, N, H, D) tensors; mask: bool (Nq, Nk), True = may attend."""
    use_flash = (
        backend in ("auto", "flash")
        and mask is None
        and _flash_attn_func is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    )
    if backend == "flash" and not use_flash:
        raise RuntimeError("flash-attn backend requested but not usable (needs CUDA, fp16/bf16, flash_attn, no mask)")
    if use_flash:
        return _flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )
    return out.transpose(1, 2)
