import pytest


@pytest.fixture(scope="session")
def tiny_generator():
    """The real engine on the `tiny` preset (random weights, 64x64, CPU), loaded and warmed up once per run."""
    import torch

    from packcache import Generator

    gen = Generator.from_preset("tiny", device="cpu", dtype=torch.float32)
    gen.warmup()
    return gen
