import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one intra-op thread, and much faster when other processes share the 2 cores
    (a tiny chunk: ~0.4 s on one thread vs 4-6 s on two under load)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



@pytest.fixture(scope="session")
def tiny_generator():
    """The real engine on the `tiny` preset (random weights, 64x64, CPU), loaded and warmed up once per run."""
    import torch

    from packcache import Generator

    gen = Generator.from_preset("tiny", device="cpu", dtype=torch.float32)
    gen.warmup()
    return gen
