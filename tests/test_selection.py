"""Mid-block selection: the recent chunks' queries count, the calibration does not depend on tokens per block, the
smoothing (on by default) keeps a stable set through a one-chunk dip, and the fifo / no-sink ablations work."""

import torch

from packcache.cache import BoundedKVCache, CacheGeometry
from packcache.presets import CacheConfig
from packcache.rope import Rope3D, grid_positions
from packcache.selection import BlockImportance, block_scores

HEAD_DIM = 24
GEO = CacheGeometry(layers=1, heads=2, head_dim=HEAD_DIM, chunk_frames=3, chunk_grid=(3, 2, 2), block_grid=(2, 1, 1))


def test_affinity_is_a_per_token_logit_whatever_the_tokens_per_block():
    """The same per-token keys give the same score in a block of 2 tokens (toy) and of 182 (real size)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 48, 2, HEAD_DIM, generator=g)
    keys = torch.randn(5, 1, 2, HEAD_DIM, generator=g)                 # one key per block, repeated n times
    scores = [block_scores(q.sum(1), q.shape[1], keys * n, n) for n in (2, 182)]
    torch.testing.assert_close(scores[0], scores[1])
    direct = (q[:, :, :1].mean(1)[None] * keys[:, :, :1]).sum(-1).mean(dim=(1, 2)) / HEAD_DIM ** 0.5
    torch.testing.assert_close(scores[0], direct)                      # first half of the heads, mean logit


def test_smoothing_keeps_the_set_through_a_one_chunk_dip():
    valid = torch.ones(3, dtype=torch.bool)
    steady = torch.tensor([1.0, 0.9, -1.0])
    dip = torch.tensor([0.9, 0.95, -1.0])                              # block 1 briefly beats block 0
    picks = {}
    for decay in (0.0, 0.5):
        imp = BlockImportance(1, 3, decay)
        for _ in range(4):
            imp.update(0, steady, valid)
        imp.update(0, dip, valid)
        picks[decay] = imp.top_k(0, 1, valid).tolist()
    assert picks[0.0] == [1]          # the paper's per-chunk top k follows the dip
    assert picks[0.5] == [0]          # smoothed: the block that led for four chunks stays


class _Driver:
    def __init__(self, cache, seed=0):
        self.cache, self.g = cache, torch.Generator().manual_seed(seed)
        self.canon_chunk = cache.rope.cos_sin(grid_positions(*GEO.chunk_grid))
        self.canon_block = cache.rope.cos_sin(grid_positions(*GEO.block_grid, GEO.block_temporal_offsets(), 4.0))

    def rand(self, n):
        return torch.randn(1, n, GEO.heads, HEAD_DIM, generator=self.g)

    def step(self, q=None, commit_q=None, block_key=None):
        c, n, nb = self.cache, GEO.chunk_tokens, GEO.block_tokens
        c.begin_chunk()
        c.reader().context(0, q if q is not None else self.rand(n))
        committer = c.committer()
        committer.context(0, commit_q if commit_q is not None else self.rand(n))
        committer.write(0, Rope3D.apply(self.rand(n), *self.canon_chunk), self.rand(n))
        slot = c.end_chunk(torch.zeros(1))
        if slot is not None:
            w = c.compressor_writer(slot, torch.zeros(1, nb, 4))
            k = self.rand(nb) if block_key is None else block_key.expand(1, nb, GEO.heads, HEAD_DIM)
            w.write(0, Rope3D.apply(k, *self.canon_block), self.rand(nb))


def test_recent_queries_choose_the_blocks_when_the_current_ones_are_noise():
    """Current queries carry nothing (zero); the recent chunk's clean queries, kept from its commit pass, point at
    the blocks built along their direction, and those are selected."""
    cfg = CacheConfig(chunk_frames=3, sink_chunks=1, recent_chunks=1, mid_topk=2, mid_capacity=6,
                      importance_decay=0.0)     # this chunk's scores alone decide
    cache = BoundedKVCache(GEO, cfg, Rope3D(HEAD_DIM))
    d = _Driver(cache)
    target = torch.randn(GEO.heads, HEAD_DIM, generator=d.g)
    n = GEO.chunk_tokens
    along = [2, 5]                                  # chunk ids whose compressed keys point along the target
    for cid in range(8):
        key = target if cid in along else -target
        d.step(commit_q=target.expand(1, n, GEO.heads, HEAD_DIM).clone() if cid == 7 else None, block_key=key)
    assert int(cache.mid_valid.sum()) == 6
    d.step(q=torch.zeros(1, n, GEO.heads, HEAD_DIM))
    # that step scored with the recent chunk 7's queries; its selection is still readable
    assert cache.selected_chunks(0) == along


def test_recent_query_sum_is_kept_at_canonical_positions():
    cfg = CacheConfig(chunk_frames=3, sink_chunks=1, recent_chunks=1, mid_topk=1, mid_capacity=2)
    rope = Rope3D(HEAD_DIM)
    cache = BoundedKVCache(GEO, cfg, rope)
    d = _Driver(cache)
    d.step()
    raw = d.rand(GEO.chunk_tokens)
    cache.begin_chunk()
    at_anchor = Rope3D.apply(raw, *rope.cos_sin(grid_positions(*GEO.chunk_grid) + torch.tensor([cache.anchor, 0, 0])))
    cache.committer().context(0, at_anchor)
    canonical = Rope3D.apply(raw, *rope.cos_sin(grid_positions(*GEO.chunk_grid))).sum(1)
    slot = cache._incoming_slot
    torch.testing.assert_close(cache.recent_qsum[0, :, slot], canonical, rtol=0, atol=1e-5)


def test_fifo_attends_to_the_newest_blocks_and_evicts_the_oldest():
    cfg = CacheConfig(chunk_frames=3, sink_chunks=1, recent_chunks=1, mid_topk=2, mid_capacity=3, selection="fifo")
    cache = BoundedKVCache(GEO, cfg, Rope3D(HEAD_DIM))
    d = _Driver(cache)
    for _ in range(9):                  # sink 0, mids 1..7 passed through a bank of 3, recent 8
        d.step()
    assert sorted(cache.mid_chunk_ids[cache.mid_valid].tolist()) == [5, 6, 7]
    d.step()
    assert cache.selected_chunks(0) == [6, 7]


def test_no_sink_cache_stays_bounded():
    cfg = CacheConfig(chunk_frames=3, sink_chunks=0, recent_chunks=1, mid_topk=2, mid_capacity=3)
    cache = BoundedKVCache(GEO, cfg, Rope3D(HEAD_DIM))
    d = _Driver(cache)
    attended = []
    for _ in range(12):
        d.step()
        s = cache.stats()
        attended.append(s.attended_tokens)
        assert s.partitions["sink"]["tokens"] == 0
        assert 0 <= s.position_range[0] and s.position_range[1] <= cache.anchor + GEO.chunk_frames
    assert attended[-1] == attended[-4] == 2 * GEO.block_tokens + 2 * GEO.chunk_tokens
