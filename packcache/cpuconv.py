"""oneDNN for the VAE's 3-D convolutions on the CPU.

PyTorch picks a CPU convolution kernel with a heuristic written for 2-D images: a float32 convolution with batch 1,
one group, a kernel of at most 3x3 and an input with fewer than 20,480 elements over (N, C, T, H) goes to its native
im2col kernel (`slow_conv3d`). For a 3-D convolution that is every causal 3x3x3 convolution of the Wan VAE at the
toy and tiny sizes, and it is 2-5x slower than oneDNN's kernel on the same shapes (one thread: 7.0 vs 1.4 ms for
(1, 16, 6, 34, 34) * (16, 16, 3, 3, 3), 14.7 vs 3.1 ms for 32 -> 16 channels): most of the toy model's decode.
`use_onednn_conv3d` routes those modules' convolutions to oneDNN when no gradient is needed. Its results are the
same for a row alone and inside a batch (bit for bit, tested), which the native kernel, used only at batch 1,
cannot give; they differ from the native kernel's by float rounding (~1e-4 on activations of ~1).
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _onednn_conv_forward(self: nn.Conv3d, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if (input.device.type == "cpu" and input.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_grad_enabled() and torch.backends.mkldnn.enabled):
        return torch.ops.aten.mkldnn_convolution(input.contiguous(), weight, bias, list(self.padding),
                                                 list(self.stride), list(self.dilation), self.groups)
    return nn.Conv3d._conv_forward(self, input, weight, bias)


def use_onednn_conv3d(module: nn.Module) -> int:
    """Route every plain zero-padded `nn.Conv3d` under `module` to oneDNN on the CPU (inference only; other
    devices, dtypes and training keep PyTorch's own choice). Returns how many convolutions were routed."""
    if not torch.backends.mkldnn.is_available():
        return 0
    n = 0
    for m in module.modules():
        if (isinstance(m, nn.Conv3d) and type(m)._conv_forward is nn.Conv3d._conv_forward
                and m.padding_mode == "zeros" and not isinstance(m.padding, str)
                and "_conv_forward" not in m.__dict__):
            m._conv_forward = types.MethodType(_onednn_conv_forward, m)
            n += 1
    return n
