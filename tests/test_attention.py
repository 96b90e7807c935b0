"""Attention backends agree: flash-attn (CUDA, when installed) vs PyTorch SDPA, within bf16 tolerance."""

import pytest
import torch

from packcache.attention import attention, flash_available


def _naive(q, k, v, mask=None):
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / q.shape[-1] ** 0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v.float())


def test_sdpa_matches_naive_softmax_attention_with_and_without_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 7, 3, 8), torch.randn(2, 7, 3, 8)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), _naive(q, k, v), rtol=1e-5, atol=1e-5)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(attention(q, k, v, mask), _naive(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_flash_requested_without_cuda_is_a_clear_error():
    if flash_available():
        pytest.skip("flash-attn is usable here")
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="flash-attn"):
        attention(q, q, q, backend="flash")


@pytest.mark.gpu
@pytest.mark.skipif(not flash_available(), reason="needs CUDA and flash-attn")
def test_flash_matches_sdpa_in_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1560, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, backend="flash").float(),
                               attention(q, k, v, backend="sdpa").float(), rtol=2e-2, atol=2e-2)
