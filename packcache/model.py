"""The causal, chunk-wise Wan2.1 DiT.

Weights and blocks are diffusers' own `WanTransformer3DModel` (so a diffusers-format Wan2.1-T2V-1.3B folder loads
as is, and the reference model shares every parameter). What is ours is the attention *processor* swapped into each
block: it takes its keys and values from a KV cache instead of from the current tokens alone, and places every
token on a relative timeline with `Rope3D`. Three kinds of forward pass run through the same blocks:

- `forward_chunk`     one chunk (e.g. 3 latent frames) against the cache: a denoising step or the t=0 commit pass.
- `encode_tokens`     arbitrary tokens (the compressed mid block) through all layers at t=0, writing their K/V.
- `forward_sequence`  a whole clip with an attention mask (block-causal training, the equivalence reference).
- `forward_view`      a cache layout's one-pass training view (`packcache.layout`): the HR compressor's training.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn as nn
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from .attention import attention
from .layout import SequenceView
from .presets import TransformerConfig
from .rope import Rope3D, grid_positions


class KVAccess(Protocol):
    """What one forward pass may do with the cache (the cache hands out one per pass kind)."""

    def context(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys (already rotated to their packed positions) and values of the context, (B, Nctx, H, D); or, for a
        batch of sessions whose contexts differ, an object whose `attend(q, k, v)` does the attention per row."""

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store this pass's keys (rotated at canonical positions) and values; no-op for read-only passes."""

    @property
    def writes(self) -> bool: ...


@dataclass
class AttnPlan:
    """Per-forward attention inputs shared by all layers (passed through diffusers' `rotary_emb` argument)."""

    cos: torch.Tensor                 # (N, D/2): rotation of the current tokens at their packed positions
    sin: torch.Tensor
    kv: KVAccess | None = None
    canon_cos: torch.Tensor | None = None  # rotation at canonical positions, used for what gets written
    canon_sin: torch.Tensor | None = None
    mask: torch.Tensor | None = None       # bool (N, N + Nctx) for sequence passes
    observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None   # (layer, q_rot, k_rot), training views


class PromptContext:
    """A prompt's projected text tokens and their per-layer cross-attention K/V, computed once per prompt."""

    def __init__(self, text_tokens: torch.Tensor, num_layers: int):
        self.tokens = text_tokens  # (B, L, dim)
        self._kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self._lock = threading.Lock()

    def kv(self, layer: int, attn) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._kv[layer]
        if cached is None:
            with self._lock:
                k = attn.norm_k(attn.to_k(self.tokens)).unflatten(2, (attn.heads, -1))
                v = attn.to_v(self.tokens).unflatten(2, (attn.heads, -1))
                cached = self._kv[layer] = (k, v)
        return cached


@torch.compiler.disable
def _kv_exchange(kv: KVAccess, layer: int, q_rot, k, k_rot, v, canon_cos, canon_sin):
    """The cache's side of a self-attention call: read the context, then write this pass's K/V. Kept out of
    torch.compile's graphs (Python-side selection, plans and host syncs), so the compiled block code around it
    guards on nothing the cache does and stays valid chunk after chunk."""
    ctx = kv.context(layer, q_rot)   # copied out of the cache before any write below
    if kv.writes:
        k_canon = k_rot if canon_cos is None else Rope3D.apply(k, canon_cos, canon_sin)
        kv.write(layer, k_canon, v)
    return ctx


@torch.compiler.disable
def _prompt_kv(prompt: "PromptContext", layer: int, attn):
    return prompt.kv(layer, attn)


class CausalSelfAttnProcessor:
    """Self-attention over [cached context ; current tokens]. Falls back to diffusers' processor for plain calls."""

    def __init__(self, layer: int, rope: Rope3D):
        self.layer = layer
        self.rope = rope
        self._plain = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if not isinstance(rotary_emb, AttnPlan):
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        plan = rotary_emb
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))   # (B, N, H, D)
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        q_rot = Rope3D.apply(q, plan.cos, plan.sin)
        k_rot = Rope3D.apply(k, plan.cos, plan.sin)
        if plan.observe is not None:
            plan.observe(self.layer, q_rot, k_rot)
        if plan.kv is not None:
            ctx = _kv_exchange(plan.kv, self.layer, q_rot, k, k_rot, v, plan.canon_cos, plan.canon_sin)
            if hasattr(ctx, "attend"):   # several sessions in one batch (packcache.batch): contexts per row
                return attn.to_out[1](attn.to_out[0](ctx.attend(q_rot, k_rot, v).flatten(2, 3).type_as(q)))
            if ctx is not None:
                k_rot = torch.cat([ctx[0].to(k_rot.dtype), k_rot], dim=1)
                v = torch.cat([ctx[1].to(v.dtype), v], dim=1)
        out = attention(q_rot, k_rot, v, plan.mask)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class CachedCrossAttnProcessor:
    """Cross-attention to the prompt, reading K/V computed once per prompt from a `PromptContext`."""

    def __init__(self, layer: int):
        self.layer = layer
        self._plain = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if not isinstance(encoder_hidden_states, PromptContext):
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k, v = _prompt_kv(encoder_hidden_states, self.layer, attn)
        out = attention(q, k.to(q.dtype), v.to(q.dtype)).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def block_causal_mask(num_frames: int, tokens_per_frame: int, chunk_frames: int) -> torch.Tensor:
    """bool (N, N): a token attends to every token of its own chunk and of all earlier chunks."""
    chunk_of_token = torch.arange(num_frames).repeat_interleave(tokens_per_frame) // chunk_frames
    return chunk_of_token[:, None] >= chunk_of_token[None, :]


def sincos_table(dim: int, rows: int, cols: int, scale: float = 0.3) -> torch.Tensor:
    """(1, dim, 1, rows, cols): sines and cosines of the row and column index, the spatial embedding's start (a
    learned table from distinct, smooth values, so the blocks can tell tokens apart from the first step)."""
    quarter = dim // 4
    freq = 1.0 / (10.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32),
                            indexing="ij")
    table = torch.cat([torch.sin(ys[..., None] * freq), torch.cos(ys[..., None] * freq),
                       torch.sin(xs[..., None] * freq), torch.cos(xs[..., None] * freq)], dim=-1)
    table = torch.nn.functional.pad(table, (0, dim - table.shape[-1]))
    return (scale * table).permute(2, 0, 1)[None, :, None].contiguous()


class PositionedPatchEmbedding:
    """The patch embedding plus the spatial embedding table, as one callable: what turns latents into tokens,
    for the DiT's chunks and for the compressor's pooled mid blocks alike (a coarser grid gets the table averaged
    over the cells each of its tokens covers). Not a module: both parts are owned by the transformer."""

    def __init__(self, conv: nn.Conv3d, table: torch.Tensor):
        self.conv = conv
        self.table = table

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.conv(latents)                                           # (B, dim, F, h, w)
        table = self.table
        if tuple(table.shape[3:]) != tuple(x.shape[3:]):
            table = torch.nn.functional.adaptive_avg_pool3d(table, (1, *x.shape[3:]))
        return x + table.to(x.dtype)


class CausalWanModel(nn.Module):
    def __init__(self, config: TransformerConfig, transformer: WanTransformer3DModel | None = None):
        super().__init__()
        self.config = config
        self.transformer = transformer if transformer is not None else WanTransformer3DModel(**config.diffusers_kwargs())
        if config.spatial_embedding is not None and not hasattr(self.transformer, "spatial_embedding"):
            # registered on the transformer so its state dict, and the toy bundle's `transformer.` keys, carry it
            self.transformer.register_parameter(
                "spatial_embedding", nn.Parameter(sincos_table(config.dim, *config.spatial_embedding)))
        self.rope = Rope3D(config.attention_head_dim)
        for i, block in enumerate(self.transformer.blocks):
            block.attn1.set_processor(CausalSelfAttnProcessor(i, self.rope))
            block.attn2.set_processor(CachedCrossAttnProcessor(i))
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- geometry -------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.config.attention_head_dim

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def patch_embedding(self) -> nn.Conv3d | PositionedPatchEmbedding:
        """Latents -> tokens (B, dim, F, h, w): the patch embedding, with the spatial embedding where there is one."""
        table = getattr(self.transformer, "spatial_embedding", None)
        conv = self.transformer.patch_embedding
        return conv if table is None else PositionedPatchEmbedding(conv, table)

    def token_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        pt, ph, pw = self.config.patch_size
        return frames // pt, height // ph, width // pw

    def rope_for(self, positions_key: tuple, positions: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for a positions tensor, memoised by a small hashable key (the same grids recur every chunk)."""
        key = positions_key + (str(device),)
        hit = self._rope_cache.get(key)
        if hit is None:
            if len(self._rope_cache) > 256:
                self._rope_cache.clear()
            hit = self._rope_cache[key] = self.rope.cos_sin(positions, device)
        return hit

    # ---- conditioning ---------------------------------------------------------------------------------------
    def embed_text(self, text_emb: torch.Tensor) -> PromptContext:
        """Project encoder output (B, L, text_dim) once; the result serves every step of every chunk."""
        tokens = self.transformer.condition_embedder.text_embedder(text_emb.to(self._dtype))
        return PromptContext(tokens, self.num_layers)

    @property
    def _dtype(self) -> torch.dtype:
        return self.transformer.patch_embedding.weight.dtype

    def _time(self, timestep: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep (B,) or (B, N) -> temb (B[, N], dim) and its 6-way modulation (B[, N], 6, dim)."""
        ce = self.transformer.condition_embedder
        shape = timestep.shape
        t = ce.timesteps_proj(timestep.reshape(-1))
        t = t.to(next(ce.time_embedder.parameters()).dtype)
        temb = ce.time_embedder(t).type_as(like)
        proj = ce.time_proj(ce.act_fn(temb))
        temb = temb.reshape(*shape, -1)
        proj = proj.reshape(*shape, 6, -1)
        return temb, proj

    # ---- passes ---------------------------------------------------------------------------------------------
    def _patchify(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(latents.to(self._dtype))               # (B, dim, F, h, w)
        return x.flatten(2).transpose(1, 2).contiguous()                  # (B, N, dim)

    def _blocks(self, x: torch.Tensor, prompt, proj: torch.Tensor, plan: AttnPlan) -> torch.Tensor:
        for block in self.transformer.blocks:
            x = block(x, prompt, proj, plan)
        return x

    def _head(self, x: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        tr = self.transformer
        if temb.dim() == 3:   # per-token
            shift, scale = (tr.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (tr.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (tr.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = tr.proj_out(x)
        b = x.shape[0]
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        x = x.reshape(b, f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def forward_chunk(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt: PromptContext,
        kv: KVAccess | None = None,
        t_start: float = 0.0,
        head: bool = True,
    ) -> torch.Tensor | None:
        """One chunk (B, C, T, H, W) at one noise level (B,), placed at temporal positions t_start..t_start+T-1.

        head=False runs the cache-only commit pass (K/V written, no output projection).
        """
        grid = self.token_grid(*latents.shape[2:])
        x = self._patchify(latents)
        temb, proj = self._time(timestep.to(latents.device), x)
        t_offsets = torch.arange(grid[0], dtype=torch.float64)
        cos, sin = self.rope_for(("chunk", grid, float(t_start)), grid_positions(*grid, t_offsets + t_start), x.device)
        ccos, csin = self.rope_for(("chunk", grid, 0.0), grid_positions(*grid, t_offsets), x.device)
        plan = AttnPlan(cos=cos, sin=sin, kv=kv, canon_cos=ccos, canon_sin=csin)
        x = self._blocks(x, prompt, proj, plan)
        return self._head(x, temb, grid) if head else None

    def encode_tokens(
        self, tokens: torch.Tensor, positions: torch.Tensor, positions_key: tuple, prompt: PromptContext, kv: KVAccess
    ) -> None:
        """Run given input tokens (B, N, dim) at t=0 through all layers, writing their K/V (compressed blocks)."""
        x = tokens.to(self._dtype)
        timestep = torch.zeros(x.shape[0], device=x.device)
        _, proj = self._time(timestep, x)
        cos, sin = self.rope_for(("tokens",) + positions_key, positions, x.device)
        self._blocks(x, prompt, proj, AttnPlan(cos=cos, sin=sin, kv=kv))

    def forward_sequence(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text_emb: torch.Tensor | PromptContext,
        temporal_positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A whole clip (B, C, F, H, W) with per-frame timesteps (B, F), for training and as the reference.

        temporal_positions (F,) default 0..F-1; attn_mask bool (N, N), e.g. `block_causal_mask`.
        """
        grid = self.token_grid(*latents.shape[2:])
        prompt = text_emb if isinstance(text_emb, PromptContext) else self.embed_text(text_emb)
        x = self._patchify(latents)
        per_token_t = timestep.to(x.device).float().repeat_interleave(grid[1] * grid[2], dim=1)   # (B, N)
        temb, proj = self._time(per_token_t, x)
        pos = grid_positions(*grid, temporal_positions)
        cos, sin = self.rope.cos_sin(pos, x.device)
        mask = attn_mask.to(x.device) if attn_mask is not None else None
        x = self._blocks(x, prompt, proj, AttnPlan(cos=cos, sin=sin, mask=mask))
        return self._head(x, temb, grid)

    def forward_view(
        self,
        view: SequenceView,
        inputs: Sequence[torch.Tensor],
        timesteps: Sequence[torch.Tensor],
        prompt: PromptContext,
        observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """One pass over a layout's training view; returns the output of its last segment (the current chunk).

        inputs, one per segment: latents (B, C, T, H, W) for a full-resolution segment, tokens (B, N, dim) for a
        compressed one; timesteps, one (B,) per segment (0 for clean context). Positions and the attention mask come
        from the view, so this pass sees what the cache shows the current chunk at inference (tests/test_layout.py).
        `observe(layer, q_rot, k_rot)`, when given, sees every layer's rotated queries and keys (B, N, H, D) of the
        whole view: what a training loss on the selection's affinities reads (toyworld/train_hr.py `MidAffinity`).
        """
        parts, per_token_t = [], []
        for seg, x, t in zip(view.segments, inputs, timesteps, strict=True):
            tokens = self._patchify(x) if x.dim() == 5 else x.to(self._dtype)
            if tokens.shape[1] != seg.tokens:
                raise ValueError(f"{seg.kind} segment of chunk {seg.chunk}: {tokens.shape[1]} tokens, layout says "
                                 f"{seg.tokens}")
            parts.append(tokens)
            per_token_t.append(t.to(tokens.device).float().reshape(-1, 1).expand(tokens.shape[0], seg.tokens))
        x = torch.cat(parts, dim=1)
        temb, proj = self._time(torch.cat(per_token_t, dim=1), x)
        cos, sin = self.rope.cos_sin(view.positions(), x.device)
        x = self._blocks(x, prompt, proj, AttnPlan(cos=cos, sin=sin, mask=view.mask().to(x.device), observe=observe))
        last = view.segments[-1]
        return self._head(x[:, -last.tokens:], temb[:, -last.tokens:], last.grid)
