"""Compile at startup, never at session start: torch.compile of the transformer blocks (and a TAEHV decoder), then
a warm-up stream long enough to reach the cache's steady state, so every shape a session will meet is compiled
before the server says ready.

Why per block: the 30 blocks share one code object and (with inlined nn modules) one graph; the cache's side of
attention (`model._kv_exchange`) runs outside the graph, so the graphs guard on nothing the cache decides per
chunk. The context length grows while the cache fills (sink, recent, mid bank), which makes that dimension dynamic
after the first change: one more compile, not one per length. Compile can take minutes on a GPU; progress is
logged per warm-up chunk.

CUDA graphs: `mode="reduce-overhead"` lets torch capture the compiled regions as CUDA graphs where they hold
(static inputs, no host syncs inside a region). The cache's selection and plan stay in Python between regions, so
whole-chunk capture does not hold yet; the default mode leaves graphs off.

On the CPU compile is off by default: inductor's C++ build costs minutes on a small machine and gains little for
the toy and tiny models, whose time is dominated by many small ops rather than fusable elementwise chains.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileConfig:
    """What `compile_generator` does. backend: a torch.compile backend ("inductor"; "eager"/"aot_eager" trace
    without generating code, for tests). warmup_chunks None: enough chunks to fill the cache (sink + recent + 2)."""

    backend: str = "inductor"
    mode: str = "default"
    decoder: bool = True
    warmup_chunks: int | None = None
    cache: str = "packed"
    recompile_limit: int = 64

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown compile mode {self.mode!r}; choose one of {', '.join(MODES)}")


def default_enabled(device: torch.device | str) -> bool:
    """Compile by default on CUDA only (see the module docstring for why not on the CPU)."""
    return torch.device(device).type == "cuda"


def steady_state_chunks(gen) -> int:
    c = gen.preset.cache
    return c.sink_chunks + max(c.recent_chunks, c.window_chunks) + 2


def compile_generator(gen, config: CompileConfig = CompileConfig()) -> dict:
    """Compile `gen`'s transformer blocks (and its TAEHV decoder, if any), then run a throwaway stream through the
    warm-up chunks. Idempotent. Returns {"seconds", "chunks", "first_chunk_s", "steady_chunk_s"}."""
    import torch._dynamo

    start = time.perf_counter()
    for name in ("recompile_limit", "cache_size_limit"):     # renamed across torch versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), config.recompile_limit))
    kw = {"backend": config.backend}
    if config.backend == "inductor" and config.mode != "default":
        kw["mode"] = config.mode
    if not gen.compiled:
        for block in gen.model.transformer.blocks:
            block.compile(**kw)
        dec = gen.frame_decoder
        if config.decoder and hasattr(dec, "run") and hasattr(dec, "model"):   # TAEHV: pure tensor code
            dec.run = torch.compile(dec.model.run, **kw)
        gen.compiled = True
    chunks = config.warmup_chunks or steady_state_chunks(gen)
    log.info("compiling (%s, %s) and warming up over %d chunks…", config.backend, config.mode, chunks)
    times = []
    session = gen.open("warm-up", cache=config.cache)
    try:
        for i in range(chunks):
            t = time.perf_counter()
            session.next_chunk()
            times.append(time.perf_counter() - t)
            log.info("compile warm-up chunk %d/%d: %.1f s", i + 1, chunks, times[-1])
    finally:
        session.close()
    seconds = time.perf_counter() - start
    log.info("compiled and warm in %.1f s (steady chunk %.3f s)", seconds, times[-1])
    return {"seconds": seconds, "chunks": chunks, "first_chunk_s": times[0], "steady_chunk_s": times[-1]}


def uncompile_generator(gen) -> None:
    """Back to eager code (after a compile failure)."""
    for block in gen.model.transformer.blocks:
        block._compiled_call_impl = None
    dec = gen.frame_decoder
    if hasattr(dec, "run") and hasattr(dec, "model"):
        dec.run = dec.model.run
    gen.compiled = False
