"""Weight loading: Self-Forcing checkpoints with original Wan names, loud key errors, diffusers folders, 1.3B shapes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from safetensors.torch import save_file

from packcache import weights
from packcache.errors import WeightsError
from packcache.presets import get_preset
from packcache.weights import (
    check_state_dict,
    extract_generator_state,
    is_original_wan_keys,
    load_checkpoint_into,
    load_diffusers_folder,
    load_diffusers_transformer,
    load_module_weights,
    load_transformer_weights,
    read_state_dict,
    to_diffusers_transformer_keys,
    transformer_config_from_folder,
    vae_config_from_folder,
)

TINY = get_preset("tiny")
WAN_1_3B_PARAMS = 1_418_996_800

# diffusers -> original Wan names: the inverse of the rename table in diffusers'
# `convert_wan_transformer_to_diffusers` (T2V entries), applied in this order.
_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
)


def to_original_key(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    for a, b in _TO_ORIGINAL:
        key = key.replace(a, b)
    return key.replace("scale_shift_table", "modulation")


def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_original_key(k): v for k, v in sd.items()}


def tiny_model(seed: int) -> WanTransformer3DModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**TINY.transformer.diffusers_kwargs())
        # diffusers zero-inits nothing here, but make every tensor seed-dependent so equality is meaningful
        for p in model.parameters():
            p.data.normal_(0, 0.02)
    return model


def test_original_names_are_the_real_wan_names() -> None:
    """Anchor the test helper to Wan's own naming (wan/modules/model.py), not only to its own inverse."""
    orig = to_original(tiny_model(0).state_dict())
    for k in (
        "patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias", "time_embedding.0.weight",
        "time_projection.1.weight", "head.head.weight", "head.modulation", "blocks.0.modulation",
        "blocks.0.self_attn.q.weight", "blocks.0.self_attn.o.bias", "blocks.0.self_attn.norm_q.weight",
        "blocks.1.cross_attn.k.weight", "blocks.1.cross_attn.norm_k.weight", "blocks.0.norm3.weight",
        "blocks.0.ffn.0.weight", "blocks.0.ffn.2.bias",
    ):
        assert k in orig, k
    assert not any(".norm2." in k for k in orig)  # original Wan's norm2 has no weights
    assert is_original_wan_keys(orig) and not is_original_wan_keys(tiny_model(0).state_dict())


def test_self_forcing_checkpoint_roundtrip(tmp_path: Path) -> None:
    src, other = tiny_model(1), tiny_model(2)
    orig = to_original(src.state_dict())
    ema = {}
    for i, (k, v) in enumerate(orig.items()):
        key = "model." + k
        if i % 3 == 0:  # FSDP wrapper fragments in some keys, e.g. model._fsdp_wrapped_module.blocks.0...
            key = key.replace("model.", "model._fsdp_wrapped_module.", 1)
        if i % 3 == 1 and ".self_attn." in key:  # ... and deeper, inside a block
            key = key.replace(".self_attn.", "._fsdp_wrapped_module.self_attn.")
        ema[key] = v.clone()
    # a non-EMA generator with other weights: the EMA must win
    generator = {"model." + k: v for k, v in to_original(other.state_dict()).items()}
    ckpt = tmp_path / "self_forcing.pt"
    torch.save({"generator": generator, "generator_ema": ema, "critic": {"x": torch.zeros(1)}, "step": 7}, ckpt)

    fresh = tiny_model(3)
    assert not torch.equal(fresh.proj_out.weight, src.proj_out.weight)
    load_checkpoint_into(fresh, ckpt)
    want, got = src.state_dict(), fresh.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_plain_and_safetensors_state_dicts_pass_through(tmp_path: Path) -> None:
    src = tiny_model(4)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / "plain.safetensors"
    save_file(sd, str(path))
    read = read_state_dict(path)
    assert extract_generator_state(read).keys() == sd.keys()
    assert to_diffusers_transformer_keys(read).keys() == sd.keys()  # diffusers names are left alone
    fresh = tiny_model(5)
    load_checkpoint_into(fresh, path)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())


def test_bad_keys_are_named() -> None:
    model = tiny_model(6)
    sd = dict(model.state_dict())
    del sd["blocks.1.attn2.to_k.weight"]
    sd["proj_out.weight"] = torch.zeros(3, 48)
    sd["blocks.0.lora_A.weight"] = torch.zeros(2)
    sd["rope.freqs_cos"] = torch.zeros(1)  # harmless extra: ignored
    with pytest.raises(WeightsError) as err:
        load_transformer_weights(model, sd)
    msg = str(err.value)
    assert "1 missing: blocks.1.attn2.to_k.weight" in msg
    assert "1 unexpected: blocks.0.lora_A.weight" in msg
    assert "1 mis-shaped: proj_out.weight (checkpoint (3, 48) vs model (64, 48))" in msg
    assert msg.startswith("checkpoint does not fit the transformer")
    assert "\n" not in msg and "rope" not in msg


def test_any_module_loads_strictly_with_its_name() -> None:
    vae = AutoencoderKLWan(**TINY.vae.diffusers_kwargs())
    sd = {k: torch.full_like(v, 0.5) for k, v in vae.state_dict().items()}
    load_module_weights(vae, sd, "vae")
    assert torch.all(vae.decoder.conv_out.weight == 0.5)
    sd.pop("decoder.conv_out.bias")
    with pytest.raises(WeightsError, match=r"does not fit the vae .*1 missing: decoder.conv_out.bias"):
        load_module_weights(vae, sd, "vae")


def test_many_missing_keys_are_counted_and_truncated() -> None:
    model = tiny_model(7)
    with pytest.raises(WeightsError, match=r"missing: .*\(\d+ more\)"):
        check_state_dict(model, {})


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> tuple[Path, WanTransformer3DModel, AutoencoderKLWan]:
    """A diffusers-format folder (transformer/ + vae/) written by diffusers' own save_pretrained."""
    root = tmp_path_factory.mktemp("wan")
    src = tiny_model(8)
    src.save_pretrained(root / "transformer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        vae = AutoencoderKLWan(**TINY.vae.diffusers_kwargs())
    vae.save_pretrained(root / "vae")
    return root, src, vae


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sb)


@pytest.mark.parametrize("use_accelerate", [True, False])
def test_diffusers_folder_loads_back(wan_folder, use_accelerate: bool, monkeypatch) -> None:
    root, src, vae = wan_folder
    if use_accelerate:
        pytest.importorskip("accelerate")
    else:  # the fallback path: config + our strict loader
        monkeypatch.setattr(weights, "_accelerate_available", lambda: False)
    assert transformer_config_from_folder(root) == TINY.transformer
    assert vae_config_from_folder(root) == TINY.vae
    folder = load_diffusers_folder(root)
    assert _same_weights(folder.transformer, src) and _same_weights(folder.vae, vae)
    assert folder.transformer_config == TINY.transformer and folder.vae_config == TINY.vae
    assert {p.dtype for p in folder.transformer.parameters()} == {torch.float32}
    # bf16: diffusers' keep-in-fp32 modules stay float32, the rest is bf16
    bf16 = load_diffusers_transformer(root, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in bf16.named_parameters()}
    assert dtypes["scale_shift_table"] == dtypes["blocks.0.norm2.weight"] == torch.float32
    assert dtypes["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes["blocks.0.attn1.to_q.weight"] == dtypes["proj_out.weight"] == torch.bfloat16
    assert bf16.rope.freqs_cos.dtype == torch.float32
    torch.testing.assert_close(bf16.rope.freqs_cos, src.rope.freqs_cos, atol=0, rtol=0)


def test_diffusers_folder_into_existing_model(wan_folder) -> None:
    root, src, _ = wan_folder
    fresh = tiny_model(10)
    load_checkpoint_into(fresh, root)
    assert _same_weights(fresh, src)


def test_fallback_leaves_global_rng_alone(wan_folder, monkeypatch) -> None:
    monkeypatch.setattr(weights, "_accelerate_available", lambda: False)
    torch.manual_seed(0)
    load_diffusers_transformer(wan_folder[0])
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), after)


def test_wan_1_3b_shapes_line_up_on_meta() -> None:
    cfg = get_preset("wan2.1-t2v-1.3b").transformer
    with torch.device("meta"):
        model = WanTransformer3DModel(**cfg.diffusers_kwargs())
    assert sum(p.numel() for p in model.parameters()) == WAN_1_3B_PARAMS
    # an original-format (Self-Forcing) checkpoint of that model, on meta: no memory allocated
    ckpt = {"generator_ema": {"model." + k: v for k, v in to_original(model.state_dict()).items()}}
    sd = to_diffusers_transformer_keys(extract_generator_state(ckpt))
    load_transformer_weights(model, sd)
    assert next(model.parameters()).is_meta
    # the 1.3B head is 1536 -> 64 (16 channels x 1x2x2 patch)
    bad = dict(sd, **{"proj_out.weight": torch.empty(32, 1536, device="meta")})
    with pytest.raises(WeightsError, match=r"proj_out.weight \(checkpoint \(32, 1536\) vs model \(64, 1536\)\)"):
        check_state_dict(model, bad)


def test_missing_paths_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match="nope.safetensors"):
        read_state_dict(missing)
    with pytest.raises(WeightsError, match="nope.pt"):
        load_checkpoint_into(tiny_model(0), tmp_path / "nope.pt")
    with pytest.raises(WeightsError, match=str(tmp_path / "transformer")):
        load_diffusers_folder(tmp_path)
    with pytest.raises(WeightsError, match="config.json"):
        transformer_config_from_folder(tmp_path / "absent")


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"generator": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(WeightsError, match="weights_only"):
        read_state_dict(path)


def test_checkpoint_without_generator_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no generator weights"):
        extract_generator_state({"step": 3, "optimizer": {}})
