"""The budget tool reproduces the paper's numbers from the real cache allocated on the meta device."""

import subprocess
import sys

import torch

from packcache.budget import compute_budget, main
from packcache.compress import HRBranch, MidCompressor, block_grid
from packcache.presets import CompressorConfig, get_preset


def test_paper_settings_give_27872_tokens_and_4_gb():
    b = compute_budget(get_preset("packforcing-paper"), seconds=120)
    assert b.tokens_per_chunk == 6240 and b.tokens_per_block == 182
    assert b.attended == {"sink": 12480, "mid": 2912, "recent": 6240, "current": 6240, "total": 27872}
    assert b.active_kv_bytes == 21632 * 184320            # 3.99 GB
    assert b.full_history_tokens == 748800
    assert abs(b.full_history_bytes / 1e9 - 138.0) < 0.1


def test_budget_cli_prints_table_and_rejects_bad_input(capsys):
    assert main(["--preset", "wan2.1-t2v-1.3b", "--seconds", "120", "--chunk-frames", "4"]) == 0
    out = capsys.readouterr().out
    assert "27,872" in out and "3.987 GB" in out
    assert main(["--preset", "nope"]) == 2
    assert "known presets" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "packcache.budget", "--seconds", "-1"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_hr_branch_reaches_the_block_grid_at_full_size():
    """16x4x60x104 latent -> 1536 x 2 x 7 x 13 = 182 tokens (the paper's HR stack), built on meta."""
    with torch.device("meta"):
        hr = HRBranch(1536)
        out = hr(torch.empty(1, 16, 4, 60, 104))
    assert tuple(out.shape) == (1, 1536, 2, 7, 13)
    assert block_grid(4, 30, 52) == (2, 7, 13)
    assert block_grid(3, 30, 52) == (2, 7, 13)


def test_untrained_hr_branch_adds_nothing_and_pool_mode_needs_no_vae():
    torch.manual_seed(0)
    pe = torch.nn.Conv3d(16, 48, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    z = torch.randn(1, 16, 3, 8, 8)
    pool = MidCompressor(CompressorConfig(mode="pool"), 48, pe)
    both = MidCompressor(CompressorConfig(mode="hr", hr_channels=(4, 8, 8, 8)), 48, pe)
    tokens = pool(z, (2, 1, 1))
    assert tokens.shape == (1, 2, 48)
    assert torch.count_nonzero(both(z, (2, 1, 1))) == 0     # zero-initialised projection
    # the HR branch is trainable and its gradient reaches the first conv once the projection moves
    torch.nn.init.normal_(both.hr.proj.weight)
    both(z, (2, 1, 1)).square().sum().backward()
    assert both.hr.temporal.weight.grad.abs().sum() > 0


def test_full_size_generator_builds_on_meta_for_sizing():
    from packcache import Generator, PresetError
    from packcache.budget import compute_budget as budget

    gen = Generator.from_preset("packforcing-paper", device="meta", dtype=torch.bfloat16)
    assert sum(p.numel() for p in gen.model.parameters()) == 1_418_996_800
    assert gen.chunk_grid == (4, 30, 52) and gen.block_grid == (2, 7, 13)
    stats = gen.new_cache("packed").stats()
    assert stats.kv_bytes == sum(budget(get_preset("packforcing-paper"), 120).bytes.values())
    try:
        gen.open("x")
    except PresetError as e:
        assert "meta" in str(e)
    else:
        raise AssertionError("opening a session on meta must fail clearly")


def test_budget_accepts_the_ablation_switches(capsys):
    """No sink, fifo selection and every compression mode: the sizes follow the cache actually built."""
    from dataclasses import replace
    base = get_preset("packforcing-paper")
    b = compute_budget(replace(base.with_cache(sink_chunks=0, selection="fifo"),
                               compressor=CompressorConfig(mode="pool")), seconds=120)
    assert b.attended == {"sink": 0, "mid": 2912, "recent": 6240, "current": 6240, "total": 15392}
    assert b.selection == "fifo" and b.compression == "pool"
    for mode in ("hr+lr", "hr", "lr", "pool"):
        assert main(["--sink-chunks", "0", "--selection", "fifo", "--compression", mode]) == 0
        assert f"selection fifo, compression {mode}" in capsys.readouterr().out
    assert main(["--recent-chunks", "0"]) == 2
    r = subprocess.run([sys.executable, "-m", "packcache.budget", "--selection", "lru"], capture_output=True, text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr
