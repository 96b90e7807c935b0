"""The optional spatial embedding (TransformerConfig.spatial_embedding): a learned table of absolute token
positions, carried by every path that turns latents into tokens."""

from dataclasses import replace

import torch

from packcache.compress import MidCompressor, block_grid
from packcache.model import CausalWanModel
from packcache.presets import get_preset

TINY = get_preset("tiny")
WITH_TABLE = replace(TINY.transformer, spatial_embedding=(4, 4))


def test_the_table_is_a_transformer_weight_not_a_diffusers_argument():
    model = CausalWanModel(WITH_TABLE)
    assert "spatial_embedding" not in WITH_TABLE.diffusers_kwargs()
    assert tuple(model.state_dict()["transformer.spatial_embedding"].shape) == (1, WITH_TABLE.dim, 1, 4, 4)
    assert "transformer.spatial_embedding" not in CausalWanModel(TINY.transformer).state_dict()
    assert model.transformer.spatial_embedding.requires_grad


def model_with_random_table() -> CausalWanModel:
    """A table far from its smooth start, so that a path which drops or misplaces it shows."""
    torch.manual_seed(0)
    model = CausalWanModel(WITH_TABLE)
    with torch.no_grad():
        model.transformer.spatial_embedding.normal_()
    return model


@torch.no_grad()
def test_chunk_tokens_carry_the_table_at_their_grid():
    model = model_with_random_table()
    x = torch.randn(2, 16, 3, 8, 8)
    plain = model.transformer.patch_embedding(x)
    got = model.patch_embedding(x)
    torch.testing.assert_close(got - plain, model.transformer.spatial_embedding.expand_as(got))


@torch.no_grad()
def test_a_uniform_chunk_comes_out_uniform_without_the_table_and_placed_with_it():
    """RoPE alone is relative: from a spatially constant input (what pure noise looks like on average) the DiT
    gives the same output at every position, so it cannot draw a background pattern in place from the prompt.
    The table breaks that symmetry."""
    torch.manual_seed(0)
    x = torch.randn(1, 16, 1, 1, 1).expand(1, 16, 3, 8, 8).contiguous()
    text = torch.randn(1, 16, TINY.transformer.text_dim)
    spread = {}
    for name, config in (("rope only", TINY.transformer), ("table", WITH_TABLE)):
        torch.manual_seed(1)
        model = CausalWanModel(config).eval()
        for p in model.transformer.proj_out.parameters():   # diffusers starts some outputs at zero
            p.normal_(std=0.1)
        out = model.forward_chunk(x, torch.tensor([1000.0]), model.embed_text(text))
        tokens = out.unflatten(4, (4, 2)).unflatten(3, (4, 2))          # (B, C, T, row, 2, col, 2)
        spread[name] = tokens.std(dim=(3, 5)).max().item()               # across token positions, per sub-pixel
    assert spread["rope only"] < 1e-5
    assert spread["table"] > 1e-3


@torch.no_grad()
def test_pooled_mid_blocks_carry_the_table_averaged_over_what_they_cover():
    model = model_with_random_table()
    latents = torch.randn(1, 16, 3, 8, 8)
    grid = block_grid(3, 4, 4)
    with_table = MidCompressor(replace(TINY.compressor, mode="pool"), model.dim, model.patch_embedding)(latents, grid)
    plain = MidCompressor(replace(TINY.compressor, mode="pool"), model.dim,
                          model.transformer.patch_embedding)(latents, grid)
    mean = model.transformer.spatial_embedding.mean(dim=(3, 4)).flatten()
    torch.testing.assert_close(with_table - plain, mean.expand_as(plain))


def test_a_bundle_decides_whether_the_dit_has_a_table(tmp_path):
    from safetensors.torch import save_file

    from packcache.generator import bundle_transformer
    state = {f"transformer.{k}": v.contiguous() for k, v in CausalWanModel(WITH_TABLE).transformer.state_dict().items()}
    save_file(state, str(tmp_path / "with.safetensors"))
    state.pop("transformer.spatial_embedding")
    save_file(state, str(tmp_path / "without.safetensors"))
    assert bundle_transformer(tmp_path / "with.safetensors", TINY.transformer).spatial_embedding == (4, 4)
    assert bundle_transformer(tmp_path / "without.safetensors", WITH_TABLE).spatial_embedding is None


def test_a_training_folder_keeps_its_world_and_table_across_runs(tmp_path):
    from toyworld.train import Setup, main, toy_preset, world_for
    from toyworld.world import WORLD_STYLES

    assert Setup.of(tmp_path) == Setup(world="placed", spatial_embedding=True)    # the shipped model's
    main(["--work", str(tmp_path), "--stages", "", "--world", "varied"])
    main(["--work", str(tmp_path), "--stages", "", "--no-spatial-embedding"])     # a later run keeps the world
    assert Setup.of(tmp_path) == Setup(world="varied", spatial_embedding=False)
    assert world_for(tmp_path, 0).style == WORLD_STYLES["varied"]
    assert toy_preset(Setup.of(tmp_path)).transformer.spatial_embedding is None
    assert toy_preset(Setup()).transformer.spatial_embedding == (4, 4)
    assert toy_preset().transformer.spatial_embedding is None                    # the preset as registered


def test_the_first_stage_takes_settings_and_refuses_bad_ones_before_any_work(tmp_path, capsys):
    import pytest

    from toyworld.train import main
    with pytest.raises(SystemExit):
        main(["--work", str(tmp_path), "--stages", "", "--first-set", "nope=1"])
    assert "--first-set 'nope=1'" in capsys.readouterr().err
    assert not (tmp_path / "setup.json").exists()
    main(["--work", str(tmp_path), "--stages", "", "--first-set", "first_share=1", "--first-set", "lr=0.001"])
