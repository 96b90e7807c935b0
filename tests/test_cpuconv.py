"""The VAE's 3-D convolutions on oneDNN (packcache/cpuconv.py): the same results as PyTorch's own kernel up to float
rounding, bit for bit the same for a row alone and inside a batch, and PyTorch's own path whenever a gradient is
needed; a CPU generator's VAE uses it."""

import torch
import torch.nn.functional as F
from torch import nn

from packcache.cpuconv import use_onednn_conv3d


def convs():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(16, 32, 3), nn.SiLU(), nn.Conv3d(32, 12, 3, stride=(1, 2, 2), padding=1))


def test_routed_convolutions_match_torch_and_are_batch_invariant():
    ref, fast = convs(), convs()
    assert use_onednn_conv3d(fast) == 2 and use_onednn_conv3d(fast) == 0     # idempotent
    x = torch.randn(2, 16, 6, 18, 18)
    with torch.no_grad():
        want, got = ref(x), fast(x)
        alone = torch.cat([fast(x[:1]), fast(x[1:])])
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(alone, got), "a row alone must equal the same row inside a batch"


def test_training_keeps_torchs_own_path():
    ref, fast = convs(), convs()
    use_onednn_conv3d(fast)
    x = torch.randn(1, 16, 5, 10, 10)
    out = fast(x)
    assert out.requires_grad and torch.equal(out, ref(x))
    out.sum().backward()
    assert fast[0].weight.grad is not None


def test_a_cpu_generator_routes_its_vae(tiny_generator):
    vae = tiny_generator.vae.vae
    routed = [m for m in vae.modules() if isinstance(m, nn.Conv3d) and "_conv_forward" in m.__dict__]
    assert routed and len(routed) == sum(isinstance(m, nn.Conv3d) for m in vae.modules())
    m = routed[0]
    x = torch.randn(1, m.in_channels, 3, 8, 8)
    with torch.no_grad():   # the convolution itself (the Wan VAE's causal padding happens in its forward)
        assert torch.allclose(m._conv_forward(x, m.weight, m.bias),
                              F.conv3d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups),
                              atol=1e-4, rtol=1e-4)
