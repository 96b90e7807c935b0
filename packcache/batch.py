"""Many sessions, one forward pass: N sessions' next chunks batched along the batch dimension.

The packed cache gives every session the same shapes at every chunk, so the sessions of one generator can share
each denoising step's model call and the commit pass. Per chunk (`Generator.next_chunks`):

    1. per session: queued reset / prompt, the chunk's prompt (blends), cache.begin_chunk(), its own noise
    2. per denoising step: ONE model call on the stacked chunks (with guidance: conditional rows then empty-prompt
       rows, 2N rows); the sampler's update per session (its own noise generator, its own guidance)
    3. ONE commit pass on the stacked clean latents, its K/V written row by row into each session's cache (first
       waiting for each session's previous finish, if one is still running), then per session cache.end_chunk
    4. `finish_rows`: ONE streaming decode for all sessions whose decoders are alike (same `first`, same
       cached-feature shapes: a new session decodes its first chunk apart); ONE compressor pass and ONE
       `encode_tokens` pass writing each packed cache's compressed backup into its own slot

Steps 1-3 (`commit_rows`) run on the caller. Step 4 runs there too (`step_sessions`, behind `next_chunks`), or on
the generator's side worker (`submit_sessions`, behind `Generator.submit_chunks`), so the next batch's denoising
overlaps it. Invariant (kept in `_run_group`, tested in tests/test_pipeline_batch.py): a session's previous finish
completes before its next commit, which may move that chunk from recent to the mid bank, taking its compressed
backup; denoising reads no buffer a finish writes, so it need not wait.

What batches with what:
  * Every row shares the linear layers, norms, FFN and cross-attention (per-row prompt K/V stacked: text is
    zero-padded to the same length). Self-attention is grouped by context length: one call per group of rows whose
    contexts have the same number of tokens (steady-state packed sessions: one group; a new session whose sink is
    still filling: a group of its own). Grouping instead of padding keeps results exact: masked padding changes
    the CPU attention kernel's rounding (~2e-7).
  * Rows must sit at the same temporal positions (anchor). Bounded caches (packed, window) keep a constant anchor,
    so all their sessions batch whatever their chunk counts; `full` cache sessions batch only with others at the
    same chunk index (one model call per anchor group).
  * Rows guided the same way batch together (`_guidance_mode`): against the empty prompt, unguided (a picture
    with an empty prompt), or with context guidance (denoised row by row, committed batched).
  * Mid-block selection stays per session: each session's reader scores its own bank with its own conditional
    queries at the first step, exactly as alone.

Exactness: a session's frames are bit-identical to running it alone on CPU fp32 (tested). The patch embedding is run
row by row on the CPU because oneDNN's 3-D convolution rounds differently at batch > 1 (~1e-6); the timestep
embedding is computed once and broadcast. The finish keeps it exact with `packcache.exact`: the VAE and compressor
run every convolution on oneDNN, alone and batched alike, and the compressed blocks' few tokens go through each
linear layer per session. On CUDA no bit-identity is claimed (cuBLAS picks kernels by shape).

Errors: a session that fails in its own phases (closed, reset, prompt, decode) gets its exception; if a batched
model call, decode or compression fails, its sessions are retried alone from the same point (noise generator
restored; decoders change only after a whole batched decode; bounded caches' writes go to fixed slots, so a
retried commit or compression overwrites a partial one), so only the session at fault gets the error. A `full` cache whose batched commit failed may hold a partial append and is not retried: it gets the error.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import PackCacheError
from .exact import rowwise_linears
from .model import AttnPlan, PromptContext
from .rope import grid_positions
from .vae import frames_to_uint8

if TYPE_CHECKING:
    from .generator import Generator, GenerationSession

log = logging.getLogger(__name__)


class RowContexts:
    """The per-row self-attention contexts of one batched layer call; attention grouped by context length."""

    def __init__(self, contexts: list[tuple[torch.Tensor, torch.Tensor] | None], rows: list[int]):
        self.contexts = contexts    # one per session
        self.rows = rows            # batch row -> session index (with guidance each session has two rows)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, N, H, D) of the current tokens -> attention output (B, N, H, D)."""
        from .attention import attention

        groups: dict[int, list[int]] = defaultdict(list)
        for row, s in enumerate(self.rows):
            ctx = self.contexts[s]
            groups[0 if ctx is None else ctx[0].shape[1]].append(row)
        out = None
        for length, rows in groups.items():
            idx = rows if len(rows) < q.shape[0] else slice(None)
            qg, kg, vg = q[idx], k[idx], v[idx]
            if length:
                ck = torch.cat([self.contexts[self.rows[r]][0] for r in rows]).to(kg.dtype)
                cv = torch.cat([self.contexts[self.rows[r]][1] for r in rows]).to(vg.dtype)
                kg, vg = torch.cat([ck, kg], dim=1), torch.cat([cv, vg], dim=1)
            res = attention(qg, kg, vg)
            if len(groups) == 1:
                return res
            if out is None:
                out = res.new_empty(q.shape)
            out[rows] = res
        return out


class BatchedAccess:
    """A KV access for a batch of sessions: N per-session accesses (readers or committers) behind one object.

    Each session's context is gathered with its own conditional queries (row i), so its mid-block selection is its
    own; the returned contexts are stacked per row by `RowContexts`. Writes are split per row.
    """

    def __init__(self, accesses: list, rows: list[int]):
        self.accesses = accesses
        self.rows = rows            # batch row -> session index; the first N rows are the sessions in order

    @property
    def writes(self) -> bool:
        return all(a.writes for a in self.accesses)

    def context(self, layer: int, q: torch.Tensor) -> RowContexts:
        return RowContexts([a.context(layer, q[i:i + 1]) for i, a in enumerate(self.accesses)], self.rows)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for i, a in enumerate(self.accesses):
            a.write(layer, k[i:i + 1], v[i:i + 1])


class StackedPrompt(PromptContext):
    """Per-row prompts as one cross-attention context: each prompt's K/V computed once (as alone), then stacked."""

    def __init__(self, prompts: list[PromptContext]):
        self.prompts = prompts
        self.tokens = None
        self._kv = [None] * len(prompts[0]._kv)

    def kv(self, layer: int, attn) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._kv[layer]
        if cached is None:
            kvs = [p.kv(layer, attn) for p in self.prompts]
            cached = self._kv[layer] = (torch.cat([k for k, _ in kvs]), torch.cat([v for _, v in kvs]))
        return cached


def batched_forward(gen: "Generator", latents: list[torch.Tensor], copies: int, timestep: torch.Tensor,
                    prompt: PromptContext, kv: BatchedAccess, t_start: float, head: bool = True):
    """`CausalWanModel.forward_chunk` for stacked sessions: `latents` one (1, C, T, H, W) per session, each repeated
    `copies` times along the batch (guidance: 2); timestep (1,) is shared by every row."""
    model = gen.model
    grid = model.token_grid(*latents[0].shape[2:])
    if gen.device.type == "cpu":   # row by row: oneDNN's conv3d rounds differently at batch > 1
        x = torch.cat([model._patchify(x) for x in latents])
    else:
        x = model._patchify(torch.cat(latents))
    if copies > 1:
        x = torch.cat([x] * copies)
    temb, proj = model._time(timestep.to(x.device), x[:1])        # (1, dim), (1, 6, dim): broadcast over rows
    t_offsets = torch.arange(grid[0], dtype=torch.float64)
    cos, sin = model.rope_for(("chunk", grid, float(t_start)), grid_positions(*grid, t_offsets + t_start), x.device)
    ccos, csin = model.rope_for(("chunk", grid, 0.0), grid_positions(*grid, t_offsets), x.device)
    x = model._blocks(x, prompt, proj, AttnPlan(cos=cos, sin=sin, kv=kv, canon_cos=ccos, canon_sin=csin))
    return model._head(x, temb, grid) if head else None


class _Row:
    """One session's state through a batched step."""

    __slots__ = ("index", "session", "prompt", "anchor", "rng_state", "x0", "slot", "result", "clock", "pixels",
                 "ended")

    def __init__(self, index: int, session: "GenerationSession"):
        self.index, self.session = index, session
        self.prompt = self.anchor = self.rng_state = self.x0 = self.slot = self.pixels = None
        self.result: object = None
        self.clock: dict | None = None      # this chunk's row in the session's StageClock
        self.ended = False                  # `end_rows` has run for it


def _guidance_mode(session: "GenerationSession") -> str:
    """How the session's `_denoise` guides this chunk: against the empty prompt ("guided"), not at all ("plain":
    a picture alone, empty prompt), or against no context ("context"): rows batch only with rows of their mode."""
    unconditional, context_g = session._guidance()
    return "guided" if unconditional is not None else ("context" if context_g != 1.0 else "plain")


def _denoise(gen: "Generator", rows: list[_Row]) -> None:
    """All rows' sampler steps, one model call per step (2N rows with guidance); rows that start at another
    sampler step (`GenerationSession._first_step`: a stream's first chunk from pure noise, later ones from the
    previous chunk) run as their own batch."""
    by_start: dict[int, list[_Row]] = {}
    for r in rows:
        by_start.setdefault(r.session._first_step(), []).append(r)
    for first, group in sorted(by_start.items()):
        _denoise_from(gen, group, first)


def _denoise_from(gen: "Generator", rows: list[_Row], first: int) -> None:
    sampler = gen.sampler
    n = len(rows)
    mode = _guidance_mode(rows[0].session)
    if mode == "context":    # a picture alone with context guidance: its own passes without the cache, row by row
        for r in rows:
            r.x0 = r.session._denoise(r.prompt, r.anchor)
        return
    shape = rows[0].session._chunk_shape()
    xs = [r.session._initial_x(shape, first) for r in rows]
    guided = mode == "guided"
    prompts = [r.prompt for r in rows] + ([gen.null_prompt()] * n if guided else [])
    stacked = StackedPrompt(prompts)
    access = BatchedAccess([r.session.cache.reader() for r in rows], list(range(n)) * (2 if guided else 1))
    x0s = xs
    for k in range(first, sampler.steps):
        sigma = sampler.sigmas[k]
        t = sampler.timestep(sigma, 1, gen.device)
        out = batched_forward(gen, xs, 2 if guided else 1, t, stacked, access, rows[0].anchor)
        x0s, nxt = [], []
        for i, r in enumerate(rows):
            v = out[i:i + 1]
            if guided:
                v = sampler.guide(v, out[n + i:n + i + 1])
            x0 = sampler.x0_from_velocity(xs[i], v, sigma)
            x0s.append(x0)
            if k + 1 < sampler.steps:
                nxt.append(sampler.next_x(xs[i], v, x0, k, lambda s=r.session: s._noise(shape)))
        xs = nxt
    for r, x0 in zip(rows, x0s):
        r.x0 = x0


def _commit(gen: "Generator", rows: list[_Row]) -> None:
    """One t=0 pass writing every row's K/V into its own cache (the partition updates follow per session)."""
    access = BatchedAccess([r.session.cache.committer() for r in rows], list(range(len(rows))))
    batched_forward(gen, [r.x0 for r in rows], 1, gen.sampler.timestep(0.0, 1, gen.device),
                    StackedPrompt([r.prompt for r in rows]), access, rows[0].anchor, head=False)


def _run_group(gen: "Generator", rows: list[_Row]) -> None:
    """Denoise and commit one anchor group; a failed batched call falls back to each row alone."""
    try:
        _timed(gen, rows, "denoise", lambda: _denoise(gen, rows))
    except Exception as exc:  # noqa: BLE001 - find the session at fault: each one again, alone
        if len(rows) == 1:
            rows[0].result = exc
            return
        log.warning("batched denoise of %d sessions failed (%r); retrying them one by one", len(rows), exc)
        for r in rows:
            r.session._rng.set_state(r.rng_state)
            try:
                r.x0 = r.session._denoise(r.prompt, r.anchor)
            except Exception as e:  # noqa: BLE001
                r.result = e
    rows = [r for r in rows if r.result is None]
    for r in rows:
        try:
            r.session._wait_finish()    # the previous chunk's finish (a pipelined step) ends before this commit
        except Exception as exc:  # noqa: BLE001 - it failed: this session is refused until a reset
            r.result = exc
    rows = [r for r in rows if r.result is None]
    if not rows:
        return
    try:
        _timed(gen, rows, "commit", lambda: _commit(gen, rows))
    except Exception as exc:  # noqa: BLE001
        if len(rows) == 1:
            rows[0].result = exc
            return
        log.warning("batched commit of %d sessions failed (%r); retrying them one by one", len(rows), exc)
        for r in rows:
            if r.session.cache.kind == "full":
                r.result = PackCacheError(f"batched commit failed and a full-history cache cannot retry it: {exc}")
                continue
            try:
                gen.model.forward_chunk(r.x0, gen.sampler.timestep(0.0, 1, gen.device), r.prompt,
                                        r.session.cache.committer(), r.anchor, head=False)
            except Exception as e:  # noqa: BLE001
                r.result = e


def _check_batch(gen: "Generator", sessions: list["GenerationSession"]) -> None:
    if len({id(s) for s in sessions}) != len(sessions):
        raise PackCacheError("a session appears twice in one batch")
    for s in sessions:
        if s.gen is not gen:
            raise PackCacheError("every session of a batch must come from this generator")


@torch.no_grad()
def commit_rows(gen: "Generator", sessions: list["GenerationSession"]) -> tuple[list[_Row], list[_Row], float]:
    """The first half of a batched step (steps 1-3): begin, batched denoise, batched commit, partition update; each
    committed session's chunk index advances. Returns (all rows, the committed rows, the step's start time); a row
    that failed holds its exception in `result` and its session is as before the step (noise stream restored)."""
    _check_batch(gen, sessions)
    start = time.perf_counter()
    rows = [_Row(i, s) for i, s in enumerate(sessions)]
    live: list[_Row] = []
    committed: list[_Row] = []
    try:
        for r in rows:
            s = r.session
            try:
                s._begin_step()
            except Exception as exc:  # noqa: BLE001 - closed, bad reset or prompt: this session only
                r.result = exc
                continue
            try:
                r.prompt = s._prompt_for_chunk()
                r.anchor = s.cache.begin_chunk()
                r.rng_state = s._rng.get_state()
                r.clock = s.clock.new_chunk(s.chunk_index)
                live.append(r)
            except Exception as exc:  # noqa: BLE001
                s._abort_step()
                r.result = exc
        groups: dict[tuple[float, str], list[_Row]] = defaultdict(list)
        for r in live:
            groups[(r.anchor, _guidance_mode(r.session))].append(r)
        for group in groups.values():
            _run_group(gen, group)
        end_rows(live)
        for r in live:
            if r.result is None:
                r.session._end_step(r.x0)       # the chunk index advances before the finish (which may run later)
                committed.append(r)
    except BaseException:
        for r in live:
            r.session._abort_step()
        raise
    return rows, committed, start


@torch.no_grad()
def step_sessions(gen: "Generator", sessions: list["GenerationSession"], decode: bool = True) -> list:
    """One chunk for each session, batched, finished before it returns. Returns per session its frames (uint8
    (T, H, W, 3)), or its clean latents with decode=False, or the exception that session raised. A session whose
    finish failed is refused further chunks until a reset, as with `submit_chunk`."""
    rows, committed, start = commit_rows(gen, sessions)
    finish_rows(gen, committed, decode, start)
    for r in committed:
        if isinstance(r.result, BaseException):
            r.session._finish_failed = str(r.result) or type(r.result).__name__
    return [r.result for r in rows]


# ---- the finish: partition update, decode, compressed backup, for all rows at once --------------------------------
def finish_rows(gen: "Generator", rows: list[_Row], decode: bool, start: float) -> None:
    """The second half of a batched step (step 4), for the rows `commit_rows` committed (their chunk index has
    advanced): each row gets its `result`, i.e. its frames (uint8 (T, H, W, 3)), its clean latents with
    decode=False, or the exception its finish raised (that row only), and its session records the chunk's time
    since `start`.

    ONE streaming decode for the rows whose decoders are alike (`StreamingDecoder.decode_batched`); ONE compressor
    pass and ONE `encode_tokens` pass writing each packed cache's compressed backup into its own slot. Each row's
    result equals its `GenerationSession._finish` alone (bit for bit on the CPU). A batched decode or compression
    that fails is retried row by row, so only the session at fault gets the error. Runs on the caller
    (`step_sessions`) or on the side worker (`submit_sessions`)."""
    todo = [r for r in rows if r.result is None]
    _decode_rows(gen, todo, decode)
    _compress_rows(gen, [r for r in todo if r.result is None and _compresses(r)])
    for r in todo:
        if r.result is not None:
            continue                        # the step already ended; the failure travels in the result
        r.session._record_time(start)
        r.result = frames_to_uint8(r.pixels)[0] if decode else r.x0
        r.pixels = None


def end_rows(rows: list[_Row]) -> None:
    """The partition update after the commit (`cache.end_chunk`), per row; a row that failed before it gets its
    noise stream restored and its step aborted. Once per row (later calls skip it). `commit_rows` runs it on the
    critical path, before the finish, since the next chunk's `begin_chunk` needs it."""
    for r in rows:
        if r.ended:
            continue
        r.ended = True
        s = r.session
        if r.result is not None:
            s._rng.set_state(r.rng_state)   # a failed chunk leaves the noise stream where it was
            s._abort_step()
            continue
        try:
            r.slot = s.cache.end_chunk(r.x0)
        except Exception as exc:  # noqa: BLE001
            s._abort_step()
            r.result = exc


def _compresses(r: _Row) -> bool:
    """The row's chunk gets a compressed backup (packed cache, chunk held in the recent ring) — as in `_finish`."""
    return r.session.cache.compresses and r.slot is not None


def _timed(gen: "Generator", rows: list[_Row], stage: str, fn) -> None:
    """Run fn() once for all rows, recording its time as `stage` in each row's StageClock row (the pass they
    shared): wall time on the CPU, a pair of events on CUDA (read only when asked for, as `StageClock` does)."""
    if gen.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            fn()
        finally:
            end.record()
            for r in rows:
                if r.clock is not None:
                    r.clock[stage] = (start, end)
        return
    t = time.perf_counter()
    try:
        fn()
    finally:
        ms = (time.perf_counter() - t) * 1e3
        for r in rows:
            if r.clock is not None:
                r.clock[stage] = r.clock.get(stage, 0.0) + ms


def _decode_rows(gen: "Generator", rows: list[_Row], decode: bool) -> None:
    """The rows' streaming decodes, one pass per group of alike decoders (their `batch_key`)."""
    needed = [r for r in rows if decode or (_compresses(r) and gen.compressor.needs_pixels)]
    groups: dict[object, list[_Row]] = defaultdict(list)
    for r in needed:
        dec = r.session.decoder       # a Wan `StreamingDecoder` or a `TAEHVStream`: both batch (`decode_batched`)
        key = dec.batch_key(r.x0)
        groups[(type(dec), key) if key is not None else ("alone", id(r))].append(r)
    for group in groups.values():
        def run(group=group):
            if len(group) > 1:
                try:
                    pixels = type(group[0].session.decoder).decode_batched([r.session.decoder for r in group],
                                                                           [r.x0 for r in group])
                    for r, p in zip(group, pixels):
                        r.pixels = p
                    return
                except Exception as exc:  # noqa: BLE001 - decoders are untouched: each one again, alone
                    log.warning("batched decode of %d sessions failed (%r); decoding them one by one", len(group),
                                exc)
            for r in group:
                try:
                    r.pixels = r.session.decoder.decode(r.x0)
                except Exception as exc:  # noqa: BLE001
                    r.result = exc
        _timed(gen, group, "decode", run)


def _compress_rows(gen: "Generator", rows: list[_Row]) -> None:
    """The rows' compressed backups: one compressor pass on the stacked chunks, one `encode_tokens` pass writing
    each row's K/V into its own cache slot. Fixed slots: a retry after a failed batched pass overwrites it."""
    if not rows:
        return

    def run():
        if len(rows) > 1:
            try:
                _compress_batched(gen, rows)
                return
            except Exception as exc:  # noqa: BLE001
                log.warning("batched compression of %d sessions failed (%r); compressing them one by one",
                            len(rows), exc)
        for r in rows:
            try:
                tokens = gen.compressor(r.x0, gen.block_grid, r.pixels)
                r.session._encode_compressed(r.slot, tokens, r.prompt)
            except Exception as exc:  # noqa: BLE001
                r.result = exc
    _timed(gen, rows, "compress", run)


def _compress_batched(gen: "Generator", rows: list[_Row]) -> None:
    model = gen.model
    pixels = torch.cat([r.pixels for r in rows]) if gen.compressor.needs_pixels else None
    tokens = gen.compressor(torch.cat([r.x0 for r in rows]), gen.block_grid, pixels)      # (N, Nb, dim)
    writers = [r.session.cache.compressor_writer(r.slot, tokens[i:i + 1].clone()) for i, r in enumerate(rows)]
    offsets = rows[0].session.cache.geo.block_temporal_offsets()
    pos = grid_positions(*gen.block_grid, offsets, spatial_stride=4.0)
    x = tokens.to(model._dtype)
    _, proj = model._time(torch.zeros(1, device=x.device), x[:1])     # (1, 6, dim): broadcast over rows, as alone
    cos, sin = model.rope_for(("tokens", "block", gen.block_grid), pos, x.device)
    exact = rowwise_linears(len(rows), x.device) if not gen.compiled else contextlib.nullcontext()
    with exact:                                      # a block is a few tokens: see packcache/exact.py
        model._blocks(x, StackedPrompt([r.prompt for r in rows]), proj,
                      AttnPlan(cos=cos, sin=sin, kv=BatchedAccess(writers, list(range(len(rows))))))


def submit_sessions(gen: "Generator", sessions: list["GenerationSession"],
                    decode: bool = True) -> list[concurrent.futures.Future]:
    """One chunk for each session, batched, its finish handed to the generator's side worker (`gen.finisher`).
    Returns per session a future of what `step_sessions` returns for it (its error as the future's exception).

    Denoise and commit run here; `finish_rows` for all committed rows is one job on the side worker, so a caller
    that submits the next batch at once denoises it while this one finishes. Each session remembers its future:
    its next commit waits for it (`_run_group`), and so do close, reset, recache and `state_dict`."""
    rows, committed, start = commit_rows(gen, sessions)
    futures = [concurrent.futures.Future() for _ in rows]
    for r, f in zip(rows, futures):
        f.set_running_or_notify_cancel()    # like an executor's: a caller cannot cancel it under `settle`
        if r.result is not None:
            f.set_exception(r.result)
    if not committed:
        return futures
    mine = [futures[r.index] for r in committed]
    for r, f in zip(committed, mine):
        r.session._finishing = f

    def settle(job: concurrent.futures.Future) -> None:     # on the side worker, after its device work is done
        failure = job.exception()
        for r, f in zip(committed, mine):
            result = failure if failure is not None else r.result
            if isinstance(result, BaseException):
                f.set_exception(result)
            else:
                f.set_result(result)

    gen.finisher.submit(finish_rows, gen, committed, decode, start).add_done_callback(settle)
    return futures


# ---- admission: how many sessions fit in the device's memory ----------------------------------------------------
@dataclass
class SessionFootprint:
    """Device memory one more session needs: its cache (allocated when it opens) and its rows' activations and
    decoder state in a batched step. `measured`: activations read off the CUDA allocator (else estimated)."""

    cache_bytes: int
    activation_bytes: int
    measured: bool

    @property
    def total(self) -> int:
        return self.cache_bytes + self.activation_bytes


def free_device_bytes(device: torch.device) -> int:
    """Memory the device can still give: CUDA free + cached-but-unused; CPU MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def session_footprint(gen: "Generator", cache: str = "packed") -> SessionFootprint:
    """One session's device memory. The cache is read off a real cache's buffers; on CUDA the activations are the
    growth of the peak between a batched step of one session and of two (which also counts the second session's
    decoder state); on the CPU they are estimated from the shapes (largest live tensors of one layer, x2 margin)."""
    if cache == "full":
        raise PackCacheError("a full-history cache grows without bound: size admission with a packed or window cache")
    if gen.device.type == "cuda":
        return _measured_footprint(gen, cache)
    with gen.open("footprint", cache=cache) as s:
        cache_bytes = s.cache.stats().kv_bytes
        context = s.cache.max_context if hasattr(s.cache, "max_context") else 0
    cfg = gen.preset.transformer
    n = gen.cache_geometry().chunk_tokens
    item = torch.empty((), dtype=gen.dtype).element_size()
    rows = 2 if gen.sampler.guided else 1
    per_layer = (n * (12 * cfg.dim + 2 * cfg.ffn_dim) + 4 * (context + n) * cfg.dim) * item
    scores = cfg.num_attention_heads * n * (context + n) * 4      # a math-kernel attention's score matrix, fp32
    return SessionFootprint(cache_bytes, 2 * rows * (per_layer + scores), measured=False)


def _measured_footprint(gen: "Generator", cache: str) -> SessionFootprint:
    dev = gen.device
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    a = gen.open("footprint a", cache=cache)
    b = gen.open("footprint b", seed=1, cache=cache)
    try:
        cache_bytes = (torch.cuda.memory_allocated(dev) - before) // 2
        gen.next_chunks([a, b])                       # both decoders hold their state from here on
        peaks = []
        for batch in ([a], [a, b]):
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            for r in gen.next_chunks(batch):
                if isinstance(r, BaseException):
                    raise r
            torch.cuda.synchronize(dev)
            peaks.append(torch.cuda.max_memory_allocated(dev) - base)
    finally:
        a.close()
        b.close()
    return SessionFootprint(int(cache_bytes), int(max(0, peaks[1] - peaks[0])), measured=True)


def max_sessions_for_memory(gen: "Generator", cache: str = "packed", reserve: float = 0.1,
                            limit: int = 256) -> tuple[int, SessionFootprint, int]:
    """How many sessions fit in the free device memory (keeping `reserve` of it free), at least 1, at most
    `limit`. Returns (sessions, one session's footprint, free bytes)."""
    fp = session_footprint(gen, cache)
    free = free_device_bytes(gen.device)
    n = int(free * (1 - reserve) // max(1, fp.total))
    return max(1, min(limit, n)), fp, free
