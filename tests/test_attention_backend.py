"""The attention backend is chosen once, by device and installed packages, probed, and falls back to SDPA."""

import logging

import pytest
import torch

from packcache import attention as A


def test_candidates_by_device_capability_and_packages():
    both = {"fa3": True, "flash": True}
    assert A.candidates("cpu", torch.bfloat16, both) == ["sdpa"]
    assert A.candidates("cuda", torch.bfloat16, both, capability=(9, 0)) == ["fa3", "cudnn", "flash", "sdpa"]
    assert A.candidates("cuda", torch.bfloat16, {}, capability=(9, 0)) == ["cudnn", "sdpa"]
    assert A.candidates("cuda", torch.bfloat16, both, capability=(8, 0)) == ["flash", "sdpa"]
    assert A.candidates("cuda", torch.float32, both, capability=(9, 0)) == ["cudnn", "sdpa"]   # flash needs fp16/bf16


def test_cpu_chooses_sdpa_and_a_gpu_only_request_falls_back_with_a_warning(caplog):
    assert A.choose_backend("cpu", torch.float32) == "sdpa"
    with caplog.at_level(logging.WARNING, logger="packcache.attention"):
        assert A.choose_backend("cpu", torch.float32, prefer="cudnn") == "sdpa"
    assert "cudnn is not available on cpu" in caplog.text
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.choose_backend("cpu", torch.float32, prefer="xformers")


def test_a_backend_that_fails_its_probe_is_skipped(monkeypatch, caplog):
    monkeypatch.setattr(A, "candidates", lambda device, dtype: ["cudnn", "sdpa"])
    real = A._run

    def broken(backend, q, k, v):
        if backend == "cudnn":
            raise RuntimeError("no kernel for these shapes")
        return real(backend, q, k, v)

    monkeypatch.setattr(A, "_run", broken)
    with caplog.at_level(logging.WARNING, logger="packcache.attention"):
        assert A.choose_backend("cpu", torch.float32) == "sdpa"
    assert "cudnn unusable" in caplog.text and "no kernel" in caplog.text
    # a backend that runs but returns wrong numbers is rejected too
    monkeypatch.setattr(A, "_run", lambda b, q, k, v: real(b, q, k, v) + (1.0 if b == "cudnn" else 0.0))
    assert A.probe("cudnn", "cpu", torch.float32).startswith("result differs")
    assert A.probe("sdpa", "cpu", torch.float32) is None


def test_configure_sets_the_process_wide_choice_and_the_generator_reports_it(tiny_generator):
    assert A.configure("cpu", torch.float32) == "sdpa" == A.current_backend()
    info = tiny_generator.runtime_info()
    assert info["attention"] == "sdpa" and info["decoder"] == "wan" and info["compiled"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_usable_gpu_backend_matches_sdpa_in_bf16():
    torch.manual_seed(0)
    q = torch.randn(1, 4680, 12, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 4680 + 21632, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ref = A.attention(q, k, v, backend="sdpa").float()
    for backend in A.candidates("cuda", torch.bfloat16):
        if A.probe(backend, "cuda", torch.bfloat16) is None:
            torch.testing.assert_close(A.attention(q, k, v, backend=backend).float(), ref, rtol=2e-2, atol=2e-2)
