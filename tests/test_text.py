"""Text encoders: shapes, zero padding past the prompt, determinism, loading a umT5 folder, MiniLM semantics."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import T5Tokenizer

from packcache.errors import PresetError, WeightsError
from packcache.presets import TextConfig, get_preset
from packcache.text import _tiny_umt5, build_text_encoder

TINY = get_preset("tiny").text
MINILM = TextConfig(kind="minilm", max_tokens=16, dim=384)


@pytest.fixture(scope="module")
def tiny():
    return build_text_encoder(TINY)


def test_tiny_shape_and_zero_padding(tiny) -> None:
    out = tiny.encode(["a red circle", "héllo 日本"])
    assert out.shape == (2, TINY.max_tokens, TINY.dim) and out.dtype == torch.float32
    # byte tokens + EOS: "a red circle" = 12 bytes -> 13 tokens; "héllo 日本" = 13 utf-8 bytes -> 14 tokens
    lengths = (out.abs().sum(-1) > 0).sum(1).tolist()
    assert lengths == [13, 14]
    assert torch.all(out[0, 13:] == 0) and torch.all(out[1, 14:] == 0)
    # a long prompt is truncated to max_tokens, every position filled
    long = tiny.encode(["x" * 100])
    assert (long[0].abs().sum(-1) > 0).all()


def test_tiny_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    a = build_text_encoder(TINY).encode(["a red circle"])
    after_build = torch.rand(1)
    torch.manual_seed(123)
    torch.rand(7)  # a different global RNG state must not change the weights
    b = build_text_encoder(TINY).encode(["a red circle"])
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after_build)
    assert torch.equal(a, b)


def test_different_prompts_differ(tiny) -> None:
    out = tiny.encode(["a red circle", "a blue square"])
    assert (out[0] - out[1]).abs().max() > 1e-2


def test_tiny_encode_from_threads(tiny) -> None:
    prompts = ["a red circle", "a blue square", "ünïcode ✓"]
    want = {p: tiny.encode([p]) for p in prompts}
    got: dict[str, torch.Tensor] = {}

    def run(p: str) -> None:
        for _ in range(3):
            got[p] = tiny.encode([p])

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in prompts:
        torch.testing.assert_close(got[p], want[p], atol=1e-6, rtol=0)


def _save_umt5_folder(root: Path) -> None:
    """A diffusers-format folder in miniature: text_encoder/ (a tiny UMT5) and tokenizer/ (a T5 Unigram)."""
    words = ["a", "red", "blue", "green", "circle", "square", "moves", "left", "right", "the"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(root / "tokenizer")
    cfg = TextConfig(kind="tiny", max_tokens=16, dim=32, tiny_vocab=len(vocab))
    _tiny_umt5(cfg).save_pretrained(root / "text_encoder")


def test_umt5_folder_matches_wan_pipeline(tmp_path: Path) -> None:
    _save_umt5_folder(tmp_path)
    cfg = TextConfig(kind="umt5", max_tokens=16, dim=32)
    enc = build_text_encoder(cfg, model_dir=tmp_path)
    prompts = ["a red circle moves left", "the  blue\n square"]
    out = enc.encode(prompts)
    assert out.shape == (2, 16, 32)
    assert (out.abs().sum(-1) > 0).sum(1).tolist() == [6, 4]  # words + EOS

    # diffusers' own WanPipeline prompt encoding on the same tokenizer and model is the reference
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline

    fake = SimpleNamespace(tokenizer=enc.tokenizer, text_encoder=enc.model, _execution_device=torch.device("cpu"))
    ref = WanPipeline._get_t5_prompt_embeds(fake, prompt=prompts, max_sequence_length=16, dtype=torch.float32)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_umt5_missing_folder_and_width(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="text_encoder"):
        build_text_encoder(TextConfig(kind="umt5", dim=32), model_dir=tmp_path)
    _save_umt5_folder(tmp_path)
    with pytest.raises(WeightsError, match="width 32"):
        build_text_encoder(TextConfig(kind="umt5", dim=4096), model_dir=tmp_path)


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder(MINILM)


def test_minilm_shape_padding_and_normalized_sentence(minilm) -> None:
    out = minilm.encode(["a red circle", "a crimson circle moving slowly to the left"])
    assert out.shape == (2, 16, 384)
    torch.testing.assert_close(out[:, 0].norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    # [CLS] a red circle [SEP] -> 5 token positions after the sentence slot
    lengths = (out.abs().sum(-1) > 0).sum(1).tolist()
    assert lengths[0] == 1 + 5 and lengths[1] > lengths[0]
    assert torch.all(out[0, 6:] == 0)


def test_minilm_semantics(minilm) -> None:
    out = minilm.encode(["a crimson circle", "a red circle", "a blue circle"])
    s = out[:, 0]
    cos_red, cos_blue = float(s[0] @ s[1]), float(s[0] @ s[2])
    assert cos_red > cos_blue + 0.05


def test_minilm_wrong_dim() -> None:
    with pytest.raises(PresetError, match="384"):
        build_text_encoder(TextConfig(kind="minilm", dim=32))


def test_cached_encoder_matches_its_encoder_and_encodes_each_prompt_once(minilm) -> None:
    from packcache.text import CachedTextEncoder
    cached = CachedTextEncoder(minilm, capacity=3)
    batch = ["a red circle", "", "a blue square on a striped background", "a red circle"]
    out = cached.encode(batch)
    torch.testing.assert_close(out, minilm.encode(batch), atol=1e-5, rtol=0)
    assert (cached.hits, cached.misses) == (1, 3)          # the repeat within the batch is encoded once
    again = cached.encode(["a red circle", "a green triangle"])     # one kept, one new: the oldest kept goes
    torch.testing.assert_close(again[0], out[0], atol=0, rtol=0)
    assert (cached.hits, cached.misses) == (2, 4) and len(cached) == 3
    assert "" not in cached._rows and torch.all(again[1, 8:] == 0)   # trimmed rows come back zero-padded
    torch.testing.assert_close(again, minilm.encode(["a red circle", "a green triangle"]), atol=1e-5, rtol=0)
    assert cached.encode([]).shape == (0, MINILM.max_tokens, MINILM.dim)
    with pytest.raises(ValueError):
        CachedTextEncoder(minilm, capacity=0)
