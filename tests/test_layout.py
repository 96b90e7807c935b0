"""The layout contract: one `ContextLayout` places every token, for the cache at inference and for the HR training.

* every key the cache hands a layer (sink, selected mid, recent) equals RoPE applied directly to the raw key at the
  position the layout gives it, after hundreds of chunks of eviction and re-selection;
* the one-pass training view (`layout.training_view()` through `CausalWanModel.forward_view`, what
  toyworld/train_hr.py trains on) gives the current chunk the same output as the chunk-by-chunk cache.
"""

import torch

from packcache import Generator
from packcache.cache import BoundedKVCache, CacheGeometry
from packcache.layout import build_layout
from packcache.presets import CacheConfig
from packcache.rope import Rope3D, grid_positions

HEAD_DIM = 24
GEO = CacheGeometry(layers=1, heads=2, head_dim=HEAD_DIM, chunk_frames=3, chunk_grid=(3, 2, 2), block_grid=(2, 1, 1))


def _feed(cache: BoundedKVCache, chunks: int, g: torch.Generator):
    """Chunk after chunk as a session does; returns each chunk's raw (unrotated) full-res and compressed keys."""
    rope = cache.rope
    canon_chunk = rope.cos_sin(grid_positions(*GEO.chunk_grid))
    canon_block = rope.cos_sin(grid_positions(*GEO.block_grid, GEO.block_temporal_offsets(), 4.0))
    full, comp = {}, {}
    n, nb = GEO.chunk_tokens, GEO.block_tokens

    def rand(k):
        return torch.randn(1, k, GEO.heads, HEAD_DIM, generator=g)

    for _ in range(chunks):
        cache.begin_chunk()
        cache.reader().context(0, rand(n))
        committer = cache.committer()
        committer.context(0, rand(n))
        cid = cache.chunks_seen
        full[cid] = rand(n)
        committer.write(0, Rope3D.apply(full[cid], *canon_chunk), rand(n))
        slot = cache.end_chunk(torch.zeros(1))
        if slot is not None:
            comp[cid] = rand(nb)
            w = cache.compressor_writer(slot, torch.zeros(1, nb, 4))
            w.context(0, None)
            w.write(0, Rope3D.apply(comp[cid], *canon_block), rand(nb))
    return full, comp


def test_every_cached_key_equals_rope_at_the_layout_position():
    cfg = CacheConfig(chunk_frames=3, sink_chunks=2, recent_chunks=2, mid_topk=3, mid_capacity=5)
    rope = Rope3D(HEAD_DIM)
    cache = BoundedKVCache(GEO, cfg, rope)
    g = torch.Generator().manual_seed(0)
    full, comp = _feed(cache, 300, g)
    cache.begin_chunk()
    keys, _ = cache.reader().context(0, torch.randn(1, GEO.chunk_tokens, GEO.heads, HEAD_DIM, generator=g))
    layout = cache.layout()
    mids = iter(cache.selected_chunks(0))
    assert [s.kind for s in layout.context] == ["sink"] * 2 + ["mid"] * 3 + ["recent"] * 2
    pos = 0
    for seg in layout.context:
        raw = comp[next(mids)] if seg.kind == "mid" else full[seg.chunk]
        direct = Rope3D.apply(raw, *rope.cos_sin(seg.positions()))
        torch.testing.assert_close(keys[:, pos:pos + seg.tokens], direct, rtol=0, atol=1e-5)
        pos += seg.tokens
    assert pos == keys.shape[1] == layout.context_tokens
    assert layout.position_range == (0.0, cache.anchor + GEO.chunk_frames)


def _chunk_four_both_ways(make_observer=None, reader_wrap=None, scores=None):
    """Chunks 0..3 stream through the packed cache (sink 1, mids 1-2, recent 3); chunk 4 runs once through the
    cache's reader and once as the one-pass training view of the same layout, fed the same latents and compressed
    tokens. `make_observer(view, model)` builds the view pass's `observe`; `reader_wrap` wraps the cache's reader;
    `scores(cache)` is taken before the session closes (which frees the cache's tensors).
    Returns (cache output, view output, what `scores` returned, observer)."""
    torch.manual_seed(0)
    gen = Generator.from_preset("tiny", device="cpu")
    model = gen.model
    latents, tokens = [], {}
    with gen.open("a red circle", seed=3, cache="packed") as s:
        for _ in range(4):
            latents.append(s.advance())
            if s.cache.recent_order:
                slot = s.cache.recent_order[-1]
                tokens[s.cache.recent_chunk_ids[slot]] = s.cache.recent_tokens[slot]
        cache = s.cache
        anchor = cache.begin_chunk()
        x = torch.randn(latents[0].shape, generator=torch.Generator().manual_seed(9))
        t = torch.tensor([700.0])
        prompt = s._prompt_ctx
        reader = cache.reader() if reader_wrap is None else reader_wrap(cache.reader())
        with torch.no_grad():
            v_cache = model.forward_chunk(x, t, prompt, reader, anchor)
        inference = cache.layout()
        train = build_layout(gen.chunk_grid, gen.block_grid, anchor, sink=[0], mid=[1, 2], recent=[3], current=4,
                             recent_chunks=cache.recent_cap)
        # the cache's layout is this one (its mid slots are picked per layer, here all of the bank)
        assert [(a.kind, a.start, a.grid, a.t_offsets) for a in inference.segments] == \
               [(b.kind, b.start, b.grid, b.t_offsets) for b in train.segments]
        assert cache.selected_chunks(0) == [1, 2]
        view = train.training_view()
        assert [(seg.kind, seg.chunk) for seg in view.segments] == [
            ("sink", 0), ("source", 1), ("mid", 1), ("source", 2), ("mid", 2), ("recent", 3), ("current", 4)]
        inputs = [tokens[seg.chunk] if seg.kind == "mid" else x if seg.kind == "current" else latents[seg.chunk]
                  for seg in view.segments]
        timesteps = [t if seg.kind == "current" else torch.zeros(1) for seg in view.segments]
        observer = make_observer(view, model) if make_observer else None
        with torch.no_grad():
            v_view = model.forward_view(view, inputs, timesteps, prompt, observe=observer)
        taken = scores(cache) if scores else None
    return v_cache, v_view, taken, observer


def test_training_view_equals_the_inference_view():
    v_cache, v_view, _, _ = _chunk_four_both_ways()
    assert v_view.shape == v_cache.shape
    torch.testing.assert_close(v_view, v_cache, rtol=1e-4, atol=1e-4)
    assert v_cache.abs().mean() > 1e-3      # a real output, not zeros on both sides


def test_training_view_affinity_equals_the_cache_selection_scores():
    """What the memory stage's selection loss trains (`train_hr.MidAffinity` on the training view) is what top-k
    ranks at inference: the cache's per-block scores from the same chunk's queries, layer by layer."""
    from packcache.presets import get_preset
    from toyworld.train_hr import MidAffinity

    cache_config = get_preset("tiny").cache
    queries: dict[int, torch.Tensor] = {}

    class Recording:
        def __init__(self, inner):
            self.inner = inner
            self.writes = inner.writes

        def context(self, layer, q):
            queries[layer] = q.clone()
            return self.inner.context(layer, q)

        def write(self, layer, k, v):
            self.inner.write(layer, k, v)

    def cache_scores(cache):
        slots = [int((cache.mid_chunk_ids == chunk).nonzero()) for chunk in (1, 2)]
        return [cache._scores(layer, queries[layer], cache._plan)[slots] for layer in range(cache.geo.layers)]

    _, _, by_layer, affinity = _chunk_four_both_ways(
        make_observer=lambda view, model: MidAffinity(view, model.rope, cache_config.score_head_fraction),
        reader_wrap=Recording, scores=cache_scores)
    assert len(affinity.layers) == len(by_layer) >= 2
    for view_scores, want in zip(affinity.layers, by_layer):
        torch.testing.assert_close(view_scores[:, 0], want, rtol=1e-4, atol=1e-5)
        assert (want[0] - want[1]).abs() > 1e-4     # the blocks score apart: slots or shifts mixed up would show


def test_training_view_mask_follows_the_commit_time_contexts():
    layout = build_layout((3, 1, 1), (2, 1, 1), 15.0, sink=[0], mid=[1, 2, 3], recent=[4], current=5)
    view = layout.training_view()
    names = [f"{s.kind}{s.chunk}" for s in view.segments]
    reads = {names[i]: sorted(names[j] for j in a) for i, a in enumerate(view.attends)}
    assert reads["source1"] == ["sink0", "source1"]                        # committed when the mid bank was empty
    assert reads["source3"] == ["mid1", "sink0", "source2", "source3"]     # chunk 2 was recent, chunk 1 mid
    assert reads["mid2"] == ["mid2", "source2"]                            # compressed tokens read their chunk
    assert reads["current5"] == ["current5", "mid1", "mid2", "mid3", "recent4", "sink0"]
    assert view.mask().shape == (sum(s.tokens for s in view.segments),) * 2


def test_hr_training_loss_runs_on_the_layout_view_and_reaches_the_hr_convs():
    from dataclasses import replace

    from packcache.compress import MidCompressor
    from toyworld.train import build_model, toy_preset
    from toyworld.train_hr import packed_view_loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    p = toy_preset()
    model = build_model(p, 0).eval().requires_grad_(False)
    comp = MidCompressor(replace(p.compressor, mode="hr"), model.dim, model.patch_embedding)
    torch.nn.init.normal_(comp.hr.proj.weight, std=0.02)      # let the zero-initialised projection pass a gradient
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 16, 21, 8, 8, generator=g)
    lr_tok = torch.randn(2, 7, 2, model.dim, generator=g)
    text = torch.randn(2, 4, p.text.dim, generator=g)
    loss = packed_view_loss(p, model, comp, x0, lr_tok, text, g, current=6, mids=[3, 4])
    loss.backward()
    torch.set_num_threads(threads)
    assert torch.isfinite(loss)
    assert comp.hr.temporal.weight.grad.abs().sum() > 0


def test_training_view_attention_shares_are_what_the_attention_kernel_gives(monkeypatch):
    """What the memory stage's reading loss trains (`train_hr.MidAttention`: the share of the current chunk's
    attention on each mid block) is the attention the model computes: the real kernel, fed values that are 1 on one
    mid block's tokens and 0 elsewhere, returns exactly that share for every current query."""
    import packcache.model as model_module
    from toyworld.train_hr import MidAttention

    kernel = model_module.attention
    measured: list[torch.Tensor] = []
    observers: list[MidAttention] = []

    def recording(q, k, v, mask=None, **kw):
        if mask is not None and observers:
            a, b = observers[0].current
            shares = []
            for s, e in observers[0].mids:
                ones = torch.zeros_like(v)
                ones[:, s:e] = 1.0
                shares.append(kernel(q, k, ones, mask)[:, a:b, :, 0].mean(dim=(1, 2)))   # (B,) per block
            measured.append(torch.stack(shares, dim=1))
        return kernel(q, k, v, mask, **kw)

    def make(view, model):
        observers.append(MidAttention(view))
        return observers[0]

    monkeypatch.setattr(model_module, "attention", recording)
    _, _, _, observer = _chunk_four_both_ways(make_observer=make)
    assert len(observer.layers) == len(measured) >= 2
    for got, want in zip(observer.layers, measured):
        assert got.shape == (1, 2)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        assert (want > 0).all() and (want.sum() < 1)
