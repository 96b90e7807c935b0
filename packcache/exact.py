"""How a batched pass stays bit-identical to each session alone on the CPU: kernels that do not depend on the batch.

Two CPU kernels round differently with the batch size, by ~1e-6:

* Convolutions. ATen picks the kernel by shape: a small input with a batch of one goes to its native kernel
  (slow_conv3d / thnn), a larger batch to oneDNN (`use_mkldnn` in aten/src/ATen/native/Convolution.cpp). oneDNN
  itself gives each sample the same result whatever the batch (tested), and at our sizes it is also the faster
  kernel at batch one (a 16->32 3x3x3 conv on a 4x32x32 input: 4 ms vs 36 ms). Inside `batch_invariant_convs`
  every float32 CPU convolution goes to oneDNN; the VAE's decode and encode and the compressor run inside it,
  alone and batched alike, so a session's frames do not depend on how many sessions it was batched with.
* Matrix products with very few rows. The BLAS takes another path for a product of 1-3 rows than for 4 or more
  (a compressed block of the toy and tiny presets is 2 tokens: 2 rows alone, 2N batched). Inside
  `rowwise_linears` each linear layer runs once per session on that session's rows, exactly the call it makes
  alone; everything between the linear layers still runs batched.

Both are torch function modes, which are thread-local: they never change what another thread computes. On other
devices they do nothing (no bit-identity is claimed on CUDA, where one batched kernel is what saves time).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


def _expand(value, dims: int) -> list[int] | None:
    if isinstance(value, int):
        return [value] * dims
    if isinstance(value, (tuple, list)) and len(value) == dims and all(isinstance(v, int) for v in value):
        return list(value)
    return None      # e.g. padding="same": leave the call to ATen


class OneDnnConvs(TorchFunctionMode):
    """Inside: float32 CPU convolutions (no autograd) run on oneDNN whatever their batch size."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dims = _CONVS.get(func)
        if dims is not None:
            out = self._onednn(dims, *args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)

    @staticmethod
    def _onednn(dims, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if not (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype == torch.float32
                and weight.dtype == torch.float32 and x.dim() == dims + 2 and not torch.is_grad_enabled()):
            return None
        stride, padding, dilation = _expand(stride, dims), _expand(padding, dims), _expand(dilation, dims)
        if stride is None or padding is None or dilation is None:
            return None
        return torch.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, padding, stride, dilation, groups)


def batch_invariant_convs(device: torch.device | str):
    """A context giving every float32 CPU convolution the same kernel at any batch size (no-op elsewhere, and
    where this torch has no oneDNN)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return contextlib.nullcontext()
    return OneDnnConvs()


class RowwiseLinears(TorchFunctionMode):
    """Inside: a linear layer whose input holds `rows` sessions along dim 0 runs once per session. Inputs with
    another batch (e.g. one shared timestep embedding) run as they are."""

    def __init__(self, rows: int):
        super().__init__()
        self.rows = rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args and isinstance(args[0], torch.Tensor):
            x = args[0]
            if x.dim() >= 2 and x.shape[0] == self.rows:
                return torch.cat([func(x[i:i + 1], *args[1:], **kwargs) for i in range(self.rows)])
        return func(*args, **kwargs)


def rowwise_linears(rows: int, device: torch.device | str):
    """A context running linear layers per session (CPU, several sessions); a no-op context otherwise."""
    if torch.device(device).type != "cpu" or rows < 2:
        return contextlib.nullcontext()
    return RowwiseLinears(rows)
