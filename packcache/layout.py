"""The per-chunk context layout: one typed value that says where every token of a chunk's attention sits and who
attends to whom. The cache builds its attention plan from it (`cache.BoundedKVCache`), and the HR compressor's
training builds its one-pass view from it (`toyworld/train_hr.py` through `CausalWanModel.forward_view`), so the two
cannot drift apart (tests/test_layout.py holds them equal).

Timeline: context blocks are packed contiguously backwards from the anchor A, in order sink, mid (chronological),
recent; the current chunk occupies [A, A + T). A full-resolution block spans T temporal positions, one per latent
frame; a compressed mid block keeps its chunk's T positions and spreads its Tc slices over them
(`block_offsets`), on the full-resolution grid's spatial coordinates (cell centres, stride 4).

Who attends to whom (what a cached K/V was computed against at inference, written once here):
  * a full-resolution chunk c (sink, a mid block's source, recent, current) attends to the sink chunks before it,
    the compressed mid blocks of chunks older than c - R (R = recent chunks), the full-resolution chunks in
    [c - R, c) after the sink, and itself: its context when it was the current chunk;
  * a compressed block attends to its own chunk's full-resolution tokens and itself (`compressor_writer`).
The one-pass training view reproduces inference exactly when its mid blocks are every chunk between sink and
recent (no selection gap), since each cached chunk then saw, at its commit, the same relative offsets it has here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from .rope import grid_positions

SegmentKind = Literal["sink", "mid", "source", "recent", "current"]


def block_offsets(chunk_frames: int, block_frames: int) -> tuple[float, ...]:
    """Temporal offsets of a compressed block's slices inside its chunk's span: spread over the T positions."""
    return tuple(i * chunk_frames / block_frames for i in range(block_frames))


@dataclass(frozen=True)
class Segment:
    """One block of tokens on the timeline. `source` is a mid block's full-resolution chunk (training view only)."""

    kind: SegmentKind
    start: float                         # packed temporal position of the block's first frame
    grid: tuple[int, int, int]           # tokens (t, h, w)
    t_offsets: tuple[float, ...]         # temporal position of each grid slice, relative to `start`
    spatial_stride: float = 1.0
    chunk: int | None = None             # chronological chunk id; None: a mid slot chosen per layer at run time

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def full_resolution(self) -> bool:
        return self.kind != "mid"

    def positions(self) -> torch.Tensor:
        """(t, y, x) of every token, (tokens, 3) float64, in the patch-embedding order."""
        offsets = torch.tensor(self.t_offsets, dtype=torch.float64) + self.start
        return grid_positions(*self.grid, offsets, spatial_stride=self.spatial_stride)


@dataclass(frozen=True)
class ContextLayout:
    """The current chunk's attention: `segments` = context in attention order (sink, mid, recent), then current."""

    chunk_frames: int
    anchor: float
    recent_chunks: int                   # R of the attention rule (the cache's recent capacity)
    segments: tuple[Segment, ...]

    @property
    def context(self) -> tuple[Segment, ...]:
        return self.segments[:-1]

    @property
    def current(self) -> Segment:
        return self.segments[-1]

    def of_kind(self, kind: SegmentKind) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.kind == kind)

    @property
    def context_tokens(self) -> int:
        return sum(s.tokens for s in self.context)

    def context_starts(self) -> torch.Tensor:
        """Packed start of every context token, (context_tokens,) float64: the temporal shift from canonical."""
        if not self.context:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([torch.full((s.tokens,), s.start, dtype=torch.float64) for s in self.context])

    @property
    def position_range(self) -> tuple[float, float]:
        """[lowest start, anchor + T): every temporal position fed to RoPE lies in it."""
        lo = min((s.start for s in self.context), default=self.anchor)
        return float(lo), float(self.anchor + self.chunk_frames)

    def training_view(self) -> "SequenceView":
        """The one-pass view of this context: every mid block preceded by its full-resolution source chunk.

        Needs every segment's chunk id. Mask rule: the module docstring's "who attends to whom".
        """
        if any(s.chunk is None for s in self.segments):
            raise ValueError("a training view needs the chunk id of every segment (mid blocks included)")
        segs: list[Segment] = []
        for s in self.segments:
            if s.kind == "mid":
                t = self.chunk_frames
                full = self.current.grid
                segs.append(Segment("source", s.start, full, tuple(float(i) for i in range(t)), 1.0, s.chunk))
            segs.append(s)
        sinks = {s.chunk for s in segs if s.kind == "sink"}
        r = self.recent_chunks
        attends = []
        for i, s in enumerate(segs):
            if s.kind == "mid":
                allowed = [j for j, o in enumerate(segs) if o.chunk == s.chunk]   # its source and itself
            elif s.kind == "sink":
                allowed = [j for j, o in enumerate(segs) if o.kind == "sink" and o.chunk <= s.chunk]
            else:
                c = s.chunk
                allowed = [j for j, o in enumerate(segs)
                           if (o.kind == "sink")
                           or (o.kind == "mid" and o.chunk < c - r)
                           or (o.full_resolution and o.kind != "sink" and o.chunk not in sinks and c - r <= o.chunk < c)
                           or j == i]
            attends.append(tuple(allowed))
        return SequenceView(tuple(segs), tuple(attends))


@dataclass(frozen=True)
class SequenceView:
    """Segments run as one sequence with a block mask: `attends[i]` lists the segments segment i reads."""

    segments: tuple[Segment, ...]
    attends: tuple[tuple[int, ...], ...]

    def positions(self) -> torch.Tensor:
        return torch.cat([s.positions() for s in self.segments])

    def mask(self) -> torch.Tensor:
        """bool (N, N): True where a query token may attend to a key token."""
        bounds = [0]
        for s in self.segments:
            bounds.append(bounds[-1] + s.tokens)
        m = torch.zeros(bounds[-1], bounds[-1], dtype=torch.bool)
        for i, allowed in enumerate(self.attends):
            for j in allowed:
                m[bounds[i]:bounds[i + 1], bounds[j]:bounds[j + 1]] = True
        return m


def build_layout(chunk_grid: tuple[int, int, int], block_grid: tuple[int, int, int], anchor: float,
                 sink: Sequence[int | None], mid: Sequence[int | None], recent: Sequence[int | None],
                 current: int | None = None, recent_chunks: int | None = None) -> ContextLayout:
    """The layout of one chunk's attention: context packed backwards from `anchor`, current at [anchor, anchor+T).

    sink / mid / recent: chunk ids, oldest first (None for a mid slot chosen per layer later). recent_chunks: the
    cache's recent capacity (default len(recent)), which sets the attention rule of the training view.
    """
    t = chunk_grid[0]
    full = tuple(float(i) for i in range(t))
    comp = block_offsets(t, block_grid[0])
    order = [("sink", c) for c in sink] + [("mid", c) for c in mid] + [("recent", c) for c in recent]
    cursor = anchor
    segs: list[Segment] = []
    for kind, c in reversed(order):
        cursor -= t
        if kind == "mid":
            segs.append(Segment("mid", cursor, block_grid, comp, 4.0, c))
        else:
            segs.append(Segment(kind, cursor, chunk_grid, full, 1.0, c))
    segs.reverse()
    segs.append(Segment("current", float(anchor), chunk_grid, full, 1.0, current))
    return ContextLayout(t, float(anchor), len(recent) if recent_chunks is None else recent_chunks, tuple(segs))
