"""Attention kernels, one backend chosen once at startup and reported.

On Hopper, PyTorch's default SDPA dispatch picks a kernel at about half the throughput of cuDNN's or
FlashAttention-3's for diffusion-sized shapes (DESIGN §9), so the backend is chosen explicitly:

    fa3     FlashAttention-3 (`flash_attn_interface`, Hopper builds of flash-attn) when installed, sm90+
    cudnn   PyTorch SDPA forced to cuDNN attention first (flash / efficient / math after it), sm90+
    flash   flash-attn 2 (`flash_attn`) when installed, CUDA
    sdpa    PyTorch's default SDPA dispatch (every device)

`choose_backend` picks in that order and probes the pick on a small input against the math kernel; a pick that
fails or disagrees falls back to the next one, with a log line saying why. `configure` makes the choice
process-wide; `attention` then uses it for every unmasked call (masked calls, used only for training and the
equivalence reference, always go through SDPA). All tensors are (B, N, H, D), the layout Wan's processors and
flash-attn use.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

BACKENDS = ("fa3", "cudnn", "flash", "sdpa")

try:  # optional extra: pip install 'packforcing-live[flash]'
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None

try:  # FlashAttention-3 (Hopper): the flash-attn repository's hopper/ build installs this module
    from flash_attn_interface import flash_attn_func as _fa3_func  # type: ignore
except Exception:  # noqa: BLE001
    _fa3_func = None

_backend = "sdpa"   # process-wide choice; see configure()


def flash_available() -> bool:
    return _flash_attn_func is not None and torch.cuda.is_available()


def current_backend() -> str:
    return _backend


def _sdpa(q, k, v, mask=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
             SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return _sdpa(q, k, v)


def _fa3(q, k, v):
    out = _fa3_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out   # some FA3 builds return (out, softmax_lse)


def _run(backend: str, q, k, v):
    if backend == "fa3":
        return _fa3(q, k, v)
    if backend == "cudnn":
        return _cudnn(q, k, v)
    if backend == "flash":
        return _flash_attn_func(q, k, v)
    return _sdpa(q, k, v)


def candidates(device: torch.device | str, dtype: torch.dtype, available: dict[str, bool] | None = None,
               capability: tuple[int, int] | None = None) -> list[str]:
    """Backends worth trying on this device, best first; always ends with `sdpa`.

    `available` and `capability` default to what is installed and what the device reports (tests pass them in)."""
    device = torch.device(device)
    if available is None:
        available = {"fa3": _fa3_func is not None, "flash": _flash_attn_func is not None}
    if device.type != "cuda":
        return ["sdpa"]
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    half = dtype in (torch.float16, torch.bfloat16)
    out = []
    if capability[0] >= 9 and half and available.get("fa3"):
        out.append("fa3")
    if capability[0] >= 9:
        out.append("cudnn")
    if half and available.get("flash"):
        out.append("flash")
    return out + ["sdpa"]


def probe(backend: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Run `backend` on a small (B, N, H, D) input and compare with the math kernel; None if it is usable, else
    why not."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, s, 2, 64, generator=gen).to(device=device, dtype=dtype) for s in (96, 160, 160))
    try:
        out = _run(backend, q, k, v)
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable here"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()
    ref = _sdpa(q.float(), k.float(), v.float())
    tol = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    err = (out.float() - ref).abs().max().item()
    if tuple(out.shape) != tuple(q.shape) or not err <= tol:
        return f"result differs from the math kernel (max error {err:.3g} > {tol})"
    return None


def choose_backend(device: torch.device | str, dtype: torch.dtype, prefer: str = "auto") -> str:
    """The first candidate (or `prefer`, then the candidates) that passes its probe; `sdpa` always does."""
    if prefer != "auto" and prefer not in BACKENDS:
        raise ValueError(f"unknown attention backend {prefer!r}; choose auto or one of {', '.join(BACKENDS)}")
    order = candidates(device, dtype)
    if prefer != "auto":
        if prefer in order:
            order = [prefer] + [b for b in order if b != prefer]
        else:
            log.warning("attention backend %s is not available on %s (%s); choosing among %s", prefer,
                        torch.device(device), "package not installed" if prefer in ("fa3", "flash") else
                        "needs a Hopper-class GPU", ", ".join(order))
    for backend in order:
        why = probe(backend, device, dtype)
        if why is None:
            return backend
        log.warning("attention backend %s unusable on %s (%s); trying the next", backend, device, why)
    return "sdpa"


def configure(device: torch.device | str, dtype: torch.dtype, prefer: str = "auto") -> str:
    """Choose the process-wide backend for this device and dtype; logs and returns it."""
    global _backend
    _backend = choose_backend(device, dtype, prefer)
    log.info("attention backend: %s (%s, %s)", _backend, torch.device(device), str(dtype).replace("torch.", ""))
    return _backend


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, N, H, D) tensors; mask: bool (Nq, Nk), True = may attend.

    backend "auto" uses the configured one where it applies (CUDA tensors, half precision for the flash kernels),
    else SDPA."""
    if mask is not None:
        if backend not in ("auto", "sdpa"):
            raise RuntimeError(f"attention backend {backend!r} takes no mask; masked calls use sdpa")
        return _sdpa(q, k, v, mask)
    if backend == "auto":
        backend = _backend
        if not q.is_cuda or (backend in ("fa3", "flash") and q.dtype not in (torch.float16, torch.bfloat16)):
            backend = "sdpa"
    elif backend == "flash" and not (_flash_attn_func is not None and q.is_cuda
                                     and q.dtype in (torch.float16, torch.bfloat16)):
        raise RuntimeError("flash-attn backend requested but not usable (needs CUDA, fp16/bf16, flash_attn, no mask)")
    elif backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}")
    return _run(backend, q, k, v)
