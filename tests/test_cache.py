"""Bounds, positions and selection of the KV caches, exercised directly (no model): fast enough for 5,000 chunks."""

import torch

from packcache.cache import BoundedKVCache, CacheGeometry, build_cache
from packcache.presets import CacheConfig
from packcache.rope import Rope3D, grid_positions

HEAD_DIM = 24
GEO = CacheGeometry(layers=1, heads=2, head_dim=HEAD_DIM, chunk_frames=3, chunk_grid=(3, 2, 2), block_grid=(2, 1, 1))
CFG = CacheConfig(chunk_frames=3, sink_chunks=1, recent_chunks=1, mid_topk=2, mid_capacity=4, window_chunks=2)


class Driver:
    """Feeds a cache chunk after chunk the way a session does, remembering each chunk's raw (unrotated) keys."""

    def __init__(self, cache, seed=0):
        self.cache = cache
        self.rope = cache.rope
        self.g = torch.Generator().manual_seed(seed)
        self.raw_keys: dict[int, torch.Tensor] = {}
        self.canon_chunk = self.rope.cos_sin(grid_positions(*GEO.chunk_grid))
        self.canon_block = self.rope.cos_sin(grid_positions(*GEO.block_grid, GEO.block_temporal_offsets(), 4.0))

    def rand(self, n):
        return torch.randn(1, n, GEO.heads, HEAD_DIM, generator=self.g)

    def step(self, q=None):
        c = self.cache
        c.begin_chunk()
        view = c.reader().context(0, q if q is not None else self.rand(GEO.chunk_tokens))
        committer = c.committer()
        committer.context(0, None)
        raw = self.rand(GEO.chunk_tokens)
        self.raw_keys[c.chunks_seen] = raw
        committer.write(0, Rope3D.apply(raw, *self.canon_chunk), self.rand(GEO.chunk_tokens))
        slot = c.end_chunk(torch.zeros(1))
        if c.compresses and slot is not None:
            w = c.compressor_writer(slot, torch.zeros(1, GEO.block_tokens, 4))
            w.context(0, None)
            w.write(0, Rope3D.apply(self.rand(GEO.block_tokens), *self.canon_block), self.rand(GEO.block_tokens))
        return view


def test_packed_bytes_and_attended_tokens_constant_and_positions_bounded():
    cache = build_cache("packed", GEO, CFG, Rope3D(HEAD_DIM))
    d = Driver(cache)
    warm = CFG.sink_chunks + CFG.recent_chunks + CFG.mid_topk + 1
    seen = []
    for i in range(60):
        d.step()
        s = cache.stats()
        if i >= warm:
            seen.append((s.kv_bytes, s.attended_tokens))
        lo, hi = s.position_range
        assert 0 <= lo and hi <= cache.anchor + GEO.chunk_frames
        assert int(cache.mid_valid.sum()) <= CFG.mid_capacity
    assert len(set(seen)) == 1
    expected = CFG.sink_chunks * 12 + CFG.mid_topk * 2 + CFG.recent_chunks * 12 + 12
    assert seen[0][1] == expected


def test_window_cache_is_bounded_and_full_cache_grows():
    window = build_cache("window", GEO, CFG, Rope3D(HEAD_DIM))
    full = build_cache("full", GEO, CFG, Rope3D(HEAD_DIM))
    dw, df = Driver(window), Driver(full)
    sizes_w, sizes_f = [], []
    for _ in range(12):
        dw.step()
        df.step()
        sizes_w.append(window.stats().attended_tokens)
        sizes_f.append(full.stats().kv_bytes)
    assert sizes_w[-1] == sizes_w[-5] == (CFG.sink_chunks + CFG.window_chunks + 1) * 12
    assert sizes_f == sorted(sizes_f) and sizes_f[-1] == 12 * sizes_f[0]


def test_rotated_keys_match_direct_rope_after_5000_chunks():
    """No accumulated drift: the view's keys equal RoPE applied directly at the packed positions."""
    rope = Rope3D(HEAD_DIM)
    cache = BoundedKVCache(GEO, CFG, rope)
    d = Driver(cache)
    for _ in range(5000):
        d.step()
    cache.begin_chunk()
    k, _ = cache.reader().context(0, d.rand(GEO.chunk_tokens))
    n, t = GEO.chunk_tokens, GEO.chunk_frames
    anchor = cache.anchor
    assert anchor == (CFG.sink_chunks + CFG.mid_topk + CFG.recent_chunks) * t   # the timeline never moved
    # sink: chunk 0, packed first
    sink_start = anchor - t * (CFG.sink_chunks + CFG.mid_topk + CFG.recent_chunks)
    direct = Rope3D.apply(d.raw_keys[0], *rope.cos_sin(grid_positions(*GEO.chunk_grid) + torch.tensor([sink_start, 0, 0])))
    torch.testing.assert_close(k[:, :n], direct, rtol=0, atol=1e-5)
    # recent: the newest chunk, right before the anchor
    newest = cache.chunks_seen - 1
    direct = Rope3D.apply(d.raw_keys[newest], *rope.cos_sin(grid_positions(*GEO.chunk_grid) + torch.tensor([anchor - t, 0, 0])))
    torch.testing.assert_close(k[:, -n:], direct, rtol=0, atol=1e-5)
    assert cache.stats().position_range == (0.0, anchor + t)


def test_topk_selects_by_affinity_and_orders_chronologically():
    cfg = CacheConfig(chunk_frames=3, sink_chunks=1, recent_chunks=1, mid_topk=2, mid_capacity=6, importance_decay=0.0)
    cache = BoundedKVCache(GEO, cfg, Rope3D(HEAD_DIM))
    d = Driver(cache)
    for _ in range(8):   # sink 1 + recent 1 + 6 mid blocks
        d.step()
    assert int(cache.mid_valid.sum()) == 6
    target = torch.randn(GEO.heads, HEAD_DIM)
    # make two blocks' keys point along the query direction, the others away from it
    chosen = [int(s) for s in torch.nonzero(cache.mid_valid).flatten()[[1, 4]]]
    for slot in torch.nonzero(cache.mid_valid).flatten().tolist():
        sign = 1.0 if slot in chosen else -1.0
        cache.mid_k[0, 0, slot] = sign * target
    cache.begin_chunk()
    q = target.expand(1, GEO.chunk_tokens, GEO.heads, HEAD_DIM).clone()
    cache.reader().context(0, q)
    sel = cache._selection[0].tolist()
    assert sorted(sel) == sorted(chosen)
    ids = cache.mid_chunk_ids[torch.tensor(sel)].tolist()
    assert ids == sorted(ids)


def test_full_bank_evicts_least_important_not_oldest():
    cfg = CacheConfig(chunk_frames=3, sink_chunks=1, recent_chunks=1, mid_topk=1, mid_capacity=3, importance_decay=0.0)
    cache = BoundedKVCache(GEO, cfg, Rope3D(HEAD_DIM))
    d = Driver(cache)
    for _ in range(5):          # bank holds 3 blocks (chunks 1, 2, 3)
        d.step()
    slots = torch.nonzero(cache.mid_valid).flatten().tolist()
    oldest = min(slots, key=lambda s: int(cache.mid_chunk_ids[s]))
    cache.importance.value[0, slots] = torch.tensor([0.5, 0.1, 0.4])
    cache.importance.value[0, oldest] = 0.9                      # the oldest is the most important
    least = min(slots, key=lambda s: float(cache.importance.value[0, s]))
    least_id = int(cache.mid_chunk_ids[least])
    # next chunk: reading with a neutral query, then a new block enters the full bank
    cache.begin_chunk()
    cache.importance.decay = 1.0                                 # freeze importance for the check
    d.step(q=torch.zeros(1, GEO.chunk_tokens, GEO.heads, HEAD_DIM))
    ids = set(cache.mid_chunk_ids[cache.mid_valid].tolist())
    assert least_id not in ids
    assert int(cache.mid_chunk_ids[oldest]) in ids
    assert int(cache.mid_valid.sum()) == 3


def test_close_frees_buffers():
    cache = build_cache("packed", GEO, CFG, Rope3D(HEAD_DIM))
    Driver(cache).step()
    cache.close()
    assert cache.sink_k is None and cache.mid_k is None and cache.work_k is None
