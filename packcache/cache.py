"""KV caches behind one narrow interface: the packed cache (PackForcing) and its baselines.

Callers (the session) never touch partitions. Per chunk they call:

    anchor = cache.begin_chunk()              # where the current chunk sits on the timeline
    ... denoising steps with cache.reader()   # read-only: context K/V for each layer
    ... commit pass with cache.committer()    # writes the chunk's K/V (reads the same context first)
    slot = cache.end_chunk(latents)           # partition update (recent -> mid, eviction)
    ... compress pass with cache.compressor_writer(slot)   # packed only: the chunk's compressed K/V backup

Keys are stored at *canonical* temporal positions (a chunk's first frame at 0). The attention view rotates each
block's temporal RoPE channels to its packed position, always from the stored canonical key, so no rounding drift
accumulates however long the stream runs (`Rope3D.rotate_temporal`).

Timeline (bounded caches): context blocks are packed contiguously backwards from a constant anchor
A = (sink_chunks + mid_topk + recent_chunks) * T, in order sink, selected mid (chronological), recent; the current
chunk occupies [A, A+T). Every position fed to RoPE is in [0, A+T): bounded for any stream length. The positions
come from one `ContextLayout` per chunk (`packcache.layout`), the same value the HR training view is built from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import ContextLayout, block_offsets, build_layout
from .presets import CacheConfig
from .rope import Rope3D
from .selection import BlockImportance, block_scores, newest, oldest


@dataclass(frozen=True)
class CacheGeometry:
    layers: int
    heads: int
    head_dim: int
    chunk_frames: int                    # T, latent frames per chunk
    chunk_grid: tuple[int, int, int]     # (T, h, w) tokens of a full-resolution chunk
    block_grid: tuple[int, int, int]     # (Tc, hc, wc) tokens of a compressed mid block
    batch: int = 1

    @property
    def chunk_tokens(self) -> int:
        t, h, w = self.chunk_grid
        return t * h * w

    @property
    def block_tokens(self) -> int:
        t, h, w = self.block_grid
        return t * h * w

    def block_temporal_offsets(self) -> torch.Tensor:
        """Canonical temporal positions of a compressed block's slices: spread over the chunk's T positions."""
        return torch.tensor(block_offsets(self.chunk_frames, self.block_grid[0]), dtype=torch.float64)


@dataclass
class CacheStats:
    kind: str
    chunks_seen: int
    partitions: dict[str, dict[str, int]] = field(default_factory=dict)   # name -> {"tokens", "bytes", ...}
    context_tokens: int = 0      # cached tokens each layer attends to (excluding the current chunk)
    attended_tokens: int = 0     # context + current chunk, per layer
    kv_bytes: int = 0            # bytes held by the cache's K/V buffers (all layers)
    anchor: float = 0.0
    position_range: tuple[float, float] = (0.0, 0.0)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Access:
    """A pass's view of the cache: `context` and `write` delegate to the cache with the pass's parameters."""

    def __init__(self, context_fn, write_fn=None):
        self._context_fn = context_fn
        self._write_fn = write_fn

    @property
    def writes(self) -> bool:
        return self._write_fn is not None

    def context(self, layer: int, q: torch.Tensor):
        return self._context_fn(layer, q)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._write_fn(layer, k, v)


class KVCache:
    """Interface shared by the packed cache and the baselines."""

    kind = "base"
    compresses = False

    def __init__(self, geometry: CacheGeometry, config: CacheConfig, rope: Rope3D):
        self.geo = geometry
        self.config = config
        self.rope = rope
        self.chunks_seen = 0
        self.anchor = 0.0

    def begin_chunk(self) -> float:
        raise NotImplementedError

    def reader(self) -> _Access:
        raise NotImplementedError

    def committer(self) -> _Access:
        raise NotImplementedError

    def end_chunk(self, latents: torch.Tensor) -> int | None:
        raise NotImplementedError

    def stats(self) -> CacheStats:
        raise NotImplementedError

    def recent_chunks(self) -> list[tuple[int, torch.Tensor, float, torch.Tensor | None]]:
        """(slot, clean latents, packed start, compressed tokens) of the chunks a `recache` recomputes, oldest first."""
        return []

    def recacher(self, index: int) -> _Access:
        raise NotImplementedError

    def compressor_writer(self, slot: int, tokens: torch.Tensor) -> _Access:
        raise NotImplementedError

    def close(self) -> None:
        """Drop every buffer; the cache is unusable afterwards."""
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, None)

    # ---- snapshots (packcache/snapshot.py) ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the next chunks depend on (subclasses add their partitions), between chunks."""
        return {"kind": self.kind, "chunks_seen": self.chunks_seen, "anchor": self.anchor}

    def load_state_dict(self, state: dict) -> None:
        from .errors import SnapshotError
        if state["kind"] != self.kind:
            raise SnapshotError(f"snapshot holds a {state['kind']!r} cache, not {self.kind!r}")
        self.chunks_seen, self.anchor = int(state["chunks_seen"]), float(state["anchor"])


class BoundedKVCache(KVCache):
    """Sink + (compressed mid bank with top-k selection) + recent ring; buffers preallocated, bytes constant.

    kind="packed": the PackForcing cache. kind="window": no mid bank, `window_chunks` recent chunks (sink + sliding
    window baseline). Invariants kept here and asserted in tests:
      * buffers never grow: kv_bytes is fixed at construction, whatever the number of chunks;
      * the mid bank holds at most `mid_capacity` blocks (one extra spare slot receives the incoming block);
      * attended tokens per layer <= sink + topk * block + recent + current, constant once warm;
      * every RoPE position is in [0, anchor + T).
    """

    def __init__(self, geometry, config, rope, device="cpu", dtype=torch.float32, kind="packed"):
        super().__init__(geometry, config, rope)
        self.kind = kind
        self.compresses = kind == "packed"
        g, c = geometry, config
        self.sink_chunks = c.sink_chunks
        self.recent_cap = c.recent_chunks if kind == "packed" else c.window_chunks
        self.topk = c.mid_topk if self.compresses else 0
        self.mid_cap = c.mid_capacity if self.compresses else 0
        n, b, h, d, layers = g.chunk_tokens, g.batch, g.heads, g.head_dim, g.layers
        kw = dict(device=device, dtype=dtype)
        self.sink_k = torch.zeros(layers, b, self.sink_chunks * n, h, d, **kw)
        self.sink_v = torch.zeros_like(self.sink_k)
        self.recent_k = torch.zeros(layers, b, self.recent_cap, n, h, d, **kw)
        self.recent_v = torch.zeros_like(self.recent_k)
        slots = self.mid_cap + 1 if self.compresses else 0
        nb = g.block_tokens
        self.backup_k = torch.zeros(layers, b, self.recent_cap if self.compresses else 0, nb, h, d, **kw)
        self.backup_v = torch.zeros_like(self.backup_k)
        self.mid_k = torch.zeros(layers, b, slots, nb, h, d, **kw)
        self.mid_v = torch.zeros_like(self.mid_k)
        self.max_context = self.sink_chunks * n + self.topk * nb + self.recent_cap * n
        self.work_k = torch.zeros(b, self.max_context, h, d, **kw)
        self.work_v = torch.zeros_like(self.work_k)
        # the anchor is constant: the current chunk always sits at the same temporal position
        self.anchor = float((self.sink_chunks + self.topk + self.recent_cap) * g.chunk_frames)

        self.sink_filled = 0
        self.recent_order: list[int] = []                 # ring slots, oldest first
        self.recent_chunk_ids = [-1] * self.recent_cap
        self.recent_latents: list[torch.Tensor | None] = [None] * self.recent_cap
        self.recent_tokens: list[torch.Tensor | None] = [None] * self.recent_cap   # compressed inputs, for recache
        self.mid_valid = torch.zeros(slots, dtype=torch.bool)
        self.mid_chunk_ids = torch.full((slots,), -1, dtype=torch.long)
        self.spare = 0
        # selection state: smoothed affinities per layer and slot, and each recent chunk's query sum (rotated at
        # canonical positions) from its commit pass, so the recent chunks' queries score the mid bank too
        self.importance = BlockImportance(layers, slots, c.importance_decay)
        self.recent_qsum = torch.zeros(layers, b, self.recent_cap if self.compresses else 0, h, d, device=device)
        self._selection: list[torch.Tensor | None] = [None] * layers
        self._selected_ids: list[list[int] | None] = [None] * layers   # chunk ids at selection time (a slot may
                                                                         # be evicted and refilled by the commit)
        self._plan: dict | None = None
        self._incoming_slot: int | None = None
        self._displaced_slot: int | None = None

    # ---- the per-chunk plan ---------------------------------------------------------------------------------
    def _n_selected(self) -> int:
        return min(self.topk, int(self.mid_valid.sum()))

    def layout(self, recent_upto: int | None = None, anchor: float | None = None) -> ContextLayout:
        """The current chunk's context layout (mid slots are chosen per layer at the first denoising step)."""
        recent = self.recent_order if recent_upto is None else self.recent_order[:recent_upto]
        return build_layout(self.geo.chunk_grid, self.geo.block_grid, self.anchor if anchor is None else anchor,
                            sink=list(range(self.sink_filled)), mid=[None] * self._n_selected(),
                            recent=[self.recent_chunk_ids[s] for s in recent], current=self.chunks_seen,
                            recent_chunks=self.recent_cap)

    def _make_plan(self, recent_upto: int | None = None, anchor: float | None = None) -> dict:
        """The attention plan of one pass, built from the layout: context rotations and what to gather."""
        layout = self.layout(recent_upto, anchor)
        recent = self.recent_order if recent_upto is None else self.recent_order[:recent_upto]
        cos, sin = self.rope.temporal_cos_sin(layout.context_starts(), self.work_k.device)
        mids = layout.of_kind("mid")
        return {
            "layout": layout, "recent": list(recent), "n_sel": len(mids), "sink_chunks": self.sink_filled,
            "tokens": layout.context_tokens, "cos": cos[None, :, None, :], "sin": sin[None, :, None, :],
            "mid_start": mids[-1].start if mids else None,
            "recent_starts": [seg.start for seg in layout.of_kind("recent")], "range": layout.position_range,
        }

    def begin_chunk(self) -> float:
        self._plan = self._make_plan()
        self._selection = [None] * self.geo.layers
        lo, hi = self._plan["range"]
        assert 0.0 <= lo and hi <= self.anchor + self.geo.chunk_frames, "RoPE positions left the bounded range"
        return self.anchor

    # ---- selection ------------------------------------------------------------------------------------------
    def _select(self, layer: int, q: torch.Tensor | None, plan: dict) -> torch.Tensor:
        """Chronologically ordered mid slots this layer attends to; scored once per chunk (first denoising step)."""
        sel = self._selection[layer]
        if sel is not None:
            return sel
        valid = self.mid_valid
        n_sel = plan["n_sel"]
        if n_sel == 0:
            sel = torch.zeros(0, dtype=torch.long)
        else:
            if self.config.selection == "fifo":
                sel = newest(self.mid_chunk_ids, valid, n_sel)
            else:
                if q is not None and int(valid.sum()) > n_sel:
                    self.importance.update(layer, self._scores(layer, q, plan).cpu(), valid)
                sel = self.importance.top_k(layer, n_sel, valid)
            sel = sel[torch.argsort(self.mid_chunk_ids[sel])]                          # chronological
        self._selected_ids[layer] = self.mid_chunk_ids[sel].tolist()
        sel = sel.to(self.mid_k.device)          # reused by every pass of this chunk: copy to the device once
        self._selection[layer] = sel
        return sel

    def selected_chunks(self, layer: int) -> list[int] | None:
        """Chunk ids of the mid blocks `layer` attended to for the latest chunk, oldest first (None before its first
        step); still right after the chunk's commit has evicted one of them from the bank."""
        return None if self._selection[layer] is None else list(self._selected_ids[layer])

    def _scores(self, layer: int, q: torch.Tensor, plan: dict) -> torch.Tensor:
        """Mean per-token affinity of every mid slot to the current chunk's and the recent chunks' queries."""
        q_sum = q.float().sum(dim=1)                                                   # (B, H, D) at the anchor
        count = q.shape[1]
        for slot, start in zip(plan["recent"], plan["recent_starts"]):
            cos, sin = self.rope.temporal_cos_sin(torch.tensor([start]), q_sum.device)
            q_sum = q_sum + self.rope.rotate_temporal(self.recent_qsum[layer, :, slot][:, None], cos, sin)[:, 0]
            count += self.geo.chunk_tokens
        ks = self.mid_k[layer].sum(dim=2).transpose(0, 1)                              # (slots, B, H, D)
        cos, sin = self.rope.temporal_cos_sin(torch.tensor([plan["mid_start"]]), ks.device)
        ks = self.rope.rotate_temporal(ks, cos, sin)
        return block_scores(q_sum, count, ks, self.geo.block_tokens, self.config.score_head_fraction)

    def _keep_query_sum(self, layer: int, q: torch.Tensor | None, slot: int, start: float) -> None:
        """Store a recent chunk's query sum at canonical positions (its queries sat at `start` .. start + T)."""
        if q is None:
            return
        cos, sin = self.rope.temporal_cos_sin(torch.tensor([-start]), q.device)
        self.recent_qsum[layer, :, slot] = self.rope.rotate_temporal(q.float().sum(dim=1)[:, None], cos, sin)[:, 0]

    # ---- gathering the attention view -----------------------------------------------------------------------
    def _gather(self, layer: int, q: torch.Tensor | None, plan: dict):
        n = self.geo.chunk_tokens
        out_k, out_v = self.work_k, self.work_v
        pos = 0
        s = plan["sink_chunks"] * n
        out_k[:, pos:pos + s] = self.sink_k[layer, :, :s]
        out_v[:, pos:pos + s] = self.sink_v[layer, :, :s]
        pos += s
        if plan["n_sel"]:
            sel = self._select(layer, q, plan)
            m = plan["n_sel"] * self.geo.block_tokens
            out_k[:, pos:pos + m] = self.mid_k[layer].index_select(1, sel).flatten(1, 2)
            out_v[:, pos:pos + m] = self.mid_v[layer].index_select(1, sel).flatten(1, 2)
            pos += m
        for slot in plan["recent"]:
            out_k[:, pos:pos + n] = self.recent_k[layer, :, slot]
            out_v[:, pos:pos + n] = self.recent_v[layer, :, slot]
            pos += n
        assert pos == plan["tokens"]
        if pos == 0:
            return None
        view = out_k[:, :pos]
        self.rope.rotate_temporal(view, plan["cos"], plan["sin"], out=view)
        return view, out_v[:, :pos]

    def reader(self) -> _Access:
        plan = self._plan
        return _Access(lambda layer, q: self._gather(layer, q, plan))

    # ---- commit ---------------------------------------------------------------------------------------------
    def committer(self) -> _Access:
        plan = self._plan
        n = self.geo.chunk_tokens
        if self.sink_filled < self.sink_chunks:
            off = self.sink_filled * n

            def write(layer, k, v):
                self.sink_k[layer, :, off:off + n] = k
                self.sink_v[layer, :, off:off + n] = v
            self._incoming_slot, self._displaced_slot = None, None
        else:
            if len(self.recent_order) < self.recent_cap:
                slot = next(i for i in range(self.recent_cap) if i not in self.recent_order)
                displaced = None
            else:
                slot = displaced = self.recent_order[0]
            self._incoming_slot, self._displaced_slot = slot, displaced
            spare = self.spare

            def write(layer, k, v):
                if displaced is not None and self.compresses:   # its compressed backup joins the mid bank
                    self.mid_k[layer, :, spare] = self.backup_k[layer, :, displaced]
                    self.mid_v[layer, :, spare] = self.backup_v[layer, :, displaced]
                self.recent_k[layer, :, slot] = k
                self.recent_v[layer, :, slot] = v

            if self.compresses:
                def context(layer, q):
                    view = self._gather(layer, q, plan)       # before the slot's query sum is replaced
                    self._keep_query_sum(layer, q, slot, self.anchor)
                    return view
                return _Access(context, write)

        return _Access(lambda layer, q: self._gather(layer, q, plan), write)

    def end_chunk(self, latents: torch.Tensor) -> int | None:
        """Partition update after the commit pass. Returns the recent slot that now holds the chunk (or None)."""
        chunk_id = self.chunks_seen
        self.chunks_seen += 1
        slot = self._incoming_slot
        if slot is None and self.sink_filled < self.sink_chunks:
            self.sink_filled += 1
            return None
        displaced = self._displaced_slot
        if displaced is not None:
            self.recent_order.remove(displaced)
            if self.compresses:
                self._admit_mid(self.recent_chunk_ids[displaced])
        self.recent_order.append(slot)
        self.recent_chunk_ids[slot] = chunk_id
        self.recent_latents[slot] = latents.detach()
        self.recent_tokens[slot] = None
        self._incoming_slot = self._displaced_slot = None
        return slot

    def _admit_mid(self, chunk_id: int) -> None:
        new = self.spare
        self.mid_valid[new] = True
        self.mid_chunk_ids[new] = chunk_id
        self.importance.add_block(new, self.mid_valid)
        if int(self.mid_valid.sum()) > self.mid_cap:
            if self.config.selection == "fifo":
                victim = oldest(self.mid_chunk_ids, self.mid_valid, protect=new)
            else:
                victim = self.importance.least_important(self.mid_valid, protect=new)
            self.mid_valid[victim] = False
            self.mid_chunk_ids[victim] = -1
            self.spare = victim
        else:
            self.spare = int(torch.nonzero(~self.mid_valid)[0])

    # ---- compression backup ---------------------------------------------------------------------------------
    def compressor_writer(self, slot: int, tokens: torch.Tensor) -> _Access:
        """Compressed tokens attend to their own chunk's full-res K/V (both at canonical positions)."""
        self.recent_tokens[slot] = tokens.detach()

        def context(layer, q):
            return self.recent_k[layer, :, slot], self.recent_v[layer, :, slot]

        def write(layer, k, v):
            self.backup_k[layer, :, slot] = k
            self.backup_v[layer, :, slot] = v
        return _Access(context, write)

    # ---- recache (prompt switch) ----------------------------------------------------------------------------
    def recent_chunks(self):
        plan = self._make_plan()
        starts = [self.anchor - self.geo.chunk_frames * (len(plan["recent"]) - i) for i in range(len(plan["recent"]))]
        return [(slot, self.recent_latents[slot], s, self.recent_tokens[slot]) for slot, s in zip(plan["recent"], starts)]

    def recacher(self, index: int) -> _Access:
        """Recompute recent chunk `index` (oldest first) in place: context = sink + mid + older recent chunks."""
        slot, _, start, _ = self.recent_chunks()[index]
        plan = self._make_plan(recent_upto=index, anchor=start)
        self._selection = [None] * self.geo.layers     # selection by importance only (no queries yet)

        def context(layer, q):
            view = self._gather(layer, None, plan)
            if self.compresses:
                self._keep_query_sum(layer, q, slot, start)
            return view

        def write(layer, k, v):
            self.recent_k[layer, :, slot] = k
            self.recent_v[layer, :, slot] = v
        return _Access(context, write)

    # ---- stats ----------------------------------------------------------------------------------------------
    def stats(self) -> CacheStats:
        plan = self._plan or self._make_plan()
        n, nb = self.geo.chunk_tokens, self.geo.block_tokens
        parts = {
            "sink": {"tokens": self.sink_filled * n, "bytes": _nbytes(self.sink_k, self.sink_v)},
            "recent": {"tokens": len(self.recent_order) * n,
                       "bytes": _nbytes(self.recent_k, self.recent_v, self.backup_k, self.backup_v)},
        }
        if self.compresses:
            parts["mid"] = {"tokens": plan["n_sel"] * nb, "archived_blocks": int(self.mid_valid.sum()),
                            "capacity_blocks": self.mid_cap, "bytes": _nbytes(self.mid_k, self.mid_v)}
        parts["workspace"] = {"tokens": self.max_context, "bytes": _nbytes(self.work_k, self.work_v)}
        kv = sum(p["bytes"] for p in parts.values())
        return CacheStats(self.kind, self.chunks_seen, parts, plan["tokens"], plan["tokens"] + n, kv,
                          self.anchor, plan["range"])

    # ---- snapshots ------------------------------------------------------------------------------------------
    # Buffers restored in place; work_k/work_v are scratch rebuilt by every gather, and the per-chunk plan and
    # selection are rebuilt by begin_chunk, so neither is state.
    _STATE_BUFFERS = ("sink_k", "sink_v", "recent_k", "recent_v", "backup_k", "backup_v", "mid_k", "mid_v",
                      "mid_valid", "mid_chunk_ids", "recent_qsum")
    _STATE_VALUES = ("sink_filled", "recent_order", "recent_chunk_ids", "spare")
    _STATE_LISTS = ("recent_latents", "recent_tokens")     # per recent slot: a tensor or None

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update({name: getattr(self, name) for name in self._STATE_BUFFERS + self._STATE_VALUES})
        state.update({name: list(getattr(self, name)) for name in self._STATE_LISTS})
        state["importance"] = self.importance.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        from .errors import SnapshotError
        from .snapshot import assign
        super().load_state_dict(state)
        for name in self._STATE_BUFFERS:
            assign(getattr(self, name), state[name], f"cache.{name}")
        self.sink_filled, self.spare = int(state["sink_filled"]), int(state["spare"])
        self.recent_order = [int(i) for i in state["recent_order"]]
        self.recent_chunk_ids = [int(i) for i in state["recent_chunk_ids"]]
        device = self.recent_k.device
        for name in self._STATE_LISTS:
            values = [None if t is None else t.to(device) for t in state[name]]
            if len(values) != len(getattr(self, name)):
                raise SnapshotError(f"snapshot cache.{name} has {len(values)} slots; this cache has "
                                    f"{len(getattr(self, name))}")
            setattr(self, name, values)
        self.importance.load_state_dict(state["importance"])
        self._plan, self._selection = None, [None] * self.geo.layers


class FullKVCache(KVCache):
    """Unbounded history at full resolution (the reference). Keys are stored rotated at absolute positions."""

    kind = "full"

    def __init__(self, geometry, config, rope, device="cpu", dtype=torch.float32):
        super().__init__(geometry, config, rope)
        self.k: list[list[torch.Tensor]] = [[] for _ in range(geometry.layers)]
        self.v: list[list[torch.Tensor]] = [[] for _ in range(geometry.layers)]
        self.device, self.dtype = device, dtype

    def begin_chunk(self) -> float:
        self.anchor = float(self.chunks_seen * self.geo.chunk_frames)
        return self.anchor

    def _context(self, layer, q):
        if not self.k[layer]:
            return None
        return torch.cat(self.k[layer], dim=1), torch.cat(self.v[layer], dim=1)

    def reader(self):
        return _Access(self._context)

    def committer(self):
        cos, sin = self.rope.temporal_cos_sin(torch.tensor([self.anchor]), self.device)

        def write(layer, k, v):
            self.k[layer].append(self.rope.rotate_temporal(k, cos, sin).to(self.dtype))
            self.v[layer].append(v.to(self.dtype))
        return _Access(self._context, write)

    def end_chunk(self, latents):
        self.chunks_seen += 1
        return None

    def stats(self) -> CacheStats:
        n = self.geo.chunk_tokens
        tokens = self.chunks_seen * n
        kv = sum(_nbytes(*ks) + _nbytes(*vs) for ks, vs in zip(self.k, self.v))
        return CacheStats("full", self.chunks_seen, {"history": {"tokens": tokens, "bytes": kv}}, tokens,
                          tokens + n, kv, self.anchor, (0.0, self.anchor + self.geo.chunk_frames))

    def close(self) -> None:
        self.k = [[] for _ in self.k]
        self.v = [[] for _ in self.v]

    # ---- snapshots ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update({"k": [list(ks) for ks in self.k], "v": [list(vs) for vs in self.v]})
        return state

    def load_state_dict(self, state: dict) -> None:
        from .errors import SnapshotError
        super().load_state_dict(state)
        if len(state["k"]) != len(self.k) or len(state["v"]) != len(self.v):
            raise SnapshotError(f"snapshot has {len(state['k'])} layers; this model has {len(self.k)}")
        self.k = [[t.to(self.device, self.dtype) for t in ks] for ks in state["k"]]
        self.v = [[t.to(self.device, self.dtype) for t in vs] for vs in state["v"]]


def build_cache(kind: str, geometry: CacheGeometry, config: CacheConfig, rope: Rope3D, device="cpu",
                dtype=torch.float32) -> KVCache:
    if kind in ("packed", "window"):
        return BoundedKVCache(geometry, config, rope, device, dtype, kind=kind)
    if kind == "full":
        return FullKVCache(geometry, config, rope, device, dtype)
    raise ValueError(f"unknown cache kind {kind!r}; choose packed, window or full")
