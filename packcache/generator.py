"""The engine's public face: a `Generator` owns the model; each `GenerationSession` is one endless stream.

A session yields chunks of RGB frames and accepts a new prompt between chunks. Per chunk (Self-Forcing's loop with
the PackForcing cache):

    1. apply a pending prompt / reset (recache recomputes the recent chunks' K/V under the new prompt); a start
       picture or an image cue is encoded by the VAE and committed as context chunks (packcache/start.py)
    2. anchor = cache.begin_chunk()                        # constant for bounded caches
    3. 4 denoising steps (flow matching), each a forward against the cache (mid selection on step 0)
    4. commit pass at t=0 writes the chunk's K/V; cache.end_chunk() moves recent -> mid (importance eviction)
    5. streaming VAE decode -> frames
    6. packed cache: compress the chunk (HR/LR/pool) and run its tokens at t=0 -> its compressed K/V backup

No asyncio here; `next_chunk` blocks, and `set_prompt`, `reset` and `stats` are safe to call from another thread.
`submit_chunk` is the pipelined form: steps 1-4 on the calling thread, 5-6 (the chunk's "finish") on the
generator's side worker (its own CUDA stream on a GPU), returning a future of the frames, so the caller can start
the next chunk's denoising at once; `Generator.submit_chunks` does the same for a batch of sessions. Invariant (kept in `submit_chunk`): chunk k's finish completes before chunk
k+1's commit, because that commit may move chunk k from recent to the mid bank, taking its compressed backup.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .cache import CacheGeometry, KVCache, build_cache
from .compress import MidCompressor, block_grid
from .errors import PackCacheError, PresetError, PromptError, StartFramesError, WeightsError
from .model import CausalWanModel, PromptContext
from .pipeline import FinishWorker
from .presets import Preset, TransformerConfig, get_preset
from .prompts import MAX_BLEND_CHUNKS, MAX_PROMPT_CHARS, validate_blend_chunks, validate_prompt  # noqa: F401
from .rope import grid_positions
from .sampler import FlowSampler
from .timing import StageClock
from .start import encode_context, fit_frames
from .vae import VideoVAE, frames_to_uint8

log = logging.getLogger(__name__)

TRANSITIONS = ("cut", "recache", "blend")
CACHE_KINDS = ("packed", "window", "full")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


class Generator:
    """Holds the model, VAE, text encoder and compressor; opens sessions that share them."""

    def __init__(self, preset: Preset, model: CausalWanModel, vae: VideoVAE, text_encoder, compressor: MidCompressor,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.preset = preset
        self.model = model.eval().requires_grad_(False)
        self.vae = vae
        self.text_encoder = text_encoder
        self.compressor = compressor.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        self.sampler = FlowSampler(preset.sampler)
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prompt_lock = threading.Lock()
        self._null_prompt: PromptContext | None = None
        lt, lh, lw = preset.cache.chunk_frames, preset.latent_height, preset.latent_width
        self.chunk_grid = model.token_grid(lt, lh, lw)
        self.block_grid = block_grid(*self.chunk_grid)
        # how sessions turn latents into frames: the Wan VAE (default) or a TAEHV decoder (use_decoder)
        self.frame_decoder = vae
        self.decoder_kind = "wan"
        self._taehv: dict[str, object] = {}
        self.compiled = False            # set by packcache.compile.compile_generator
        self.compile_config = None       # a packcache.compile.CompileConfig: warmup() compiles first
        self.finisher = FinishWorker(self.device)
        self.attention_backend = "sdpa"
        if self.device.type != "meta":
            from .attention import configure
            self.attention_backend = configure(self.device, dtype)

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, device: str | None = None, dtype: torch.dtype | None = None, seed: int = 0,
                    compression: str | None = None) -> "Generator":
        """Build a preset: its shipped weights when it has some, else seeded random weights (tiny, benchmarks)."""
        from .text import build_text_encoder, text_dtype

        preset = get_preset(name)
        if compression is not None:
            from dataclasses import replace
            preset = replace(preset, compressor=replace(preset.compressor, mode=compression))
        device = device or default_device()
        dtype = dtype or _default_dtype(device)
        meta = str(device) == "meta"   # sizing only: shapes and cache bytes, nothing allocated
        if preset.weights and not meta:
            from dataclasses import replace
            preset = replace(preset, transformer=bundle_transformer(shipped_weights_path(preset.weights),
                                                                    preset.transformer))
        with torch.random.fork_rng(devices=[]), (torch.device("meta") if meta else contextlib.nullcontext()):
            torch.manual_seed(seed)
            model = CausalWanModel(preset.transformer)
            vae = VideoVAE.build(preset.vae, device=device if meta else "cpu", dtype=torch.float32, seed=seed)
            compressor = MidCompressor(preset.compressor, model.dim, model.patch_embedding, vae)
        if preset.weights and not meta:
            load_bundle(shipped_weights_path(preset.weights), model, vae, compressor)
        text = None if meta else build_text_encoder(preset.text, device=device, dtype=text_dtype(preset.text, device))
        return cls._assemble(preset, model, vae, text, compressor, device, dtype)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, checkpoint: str | Path | None = None,
                        preset: str = "wan2.1-t2v-1.3b", device: str | None = None, dtype: torch.dtype | None = None,
                        compression: str | None = None, height: int | None = None,
                        width: int | None = None) -> "Generator":
        """A diffusers-format Wan2.1-T2V folder (transformer/, vae/, text_encoder/, tokenizer/), optionally with a
        Self-Forcing generator checkpoint (original Wan keys under generator_ema/generator) replacing the
        transformer weights. Shapes come from the folder's own configs; cache and sampler from the preset."""
        from dataclasses import replace

        from .text import build_text_encoder, text_dtype
        from .weights import load_checkpoint_into, load_diffusers_folder

        base = get_preset(preset)
        mode = compression or base.compressor.mode
        if "hr" in mode:
            raise WeightsError(f"compression {mode!r} needs trained HR-branch weights, which no public Wan "
                               "checkpoint has; use --compression lr or pool")
        folder = load_diffusers_folder(model_dir)
        model = CausalWanModel(folder.transformer_config, folder.transformer)
        if checkpoint is not None:
            load_checkpoint_into(model.transformer, checkpoint)
        vae = VideoVAE(folder.vae, folder.vae_config)
        p = replace(base, transformer=folder.transformer_config, vae=folder.vae_config,
                    text=replace(base.text, dim=folder.transformer_config.text_dim),
                    compressor=replace(base.compressor, mode=mode),
                    height=height or base.height, width=width or base.width)
        unit = p.vae.spatial_stride * p.transformer.patch_size[1] * 4   # the compressor's 4x token pooling
        if p.height % unit or p.width % unit:
            raise PresetError(f"height and width must be multiples of {unit}, got {p.width}x{p.height}")
        compressor = MidCompressor(p.compressor, model.dim, model.patch_embedding, vae)
        device = device or default_device()
        dtype = dtype or _default_dtype(device)
        text = build_text_encoder(p.text, model_dir=model_dir, device=device, dtype=text_dtype(p.text, device))
        return cls._assemble(p, model, vae, text, compressor, device, dtype)

    @classmethod
    def _assemble(cls, preset, model, vae, text, compressor, device, dtype) -> "Generator":
        from .weights import to_dtype_keeping_fp32

        model.to(device=device)
        to_dtype_keeping_fp32(model.transformer, dtype)   # diffusers keeps norms/modulation tables in fp32
        vae.vae.to(device=device)
        if next(vae.vae.parameters()).dtype != dtype:
            from diffusers.utils import logging as dlog
            level = dlog.get_verbosity()
            dlog.set_verbosity_error()   # its "keep in float32" notice lists no module for the Wan VAE
            vae.vae.to(dtype=dtype)
            dlog.set_verbosity(level)
        compressor.to(device=device, dtype=dtype)
        return cls(preset, model, vae, text, compressor, device, dtype)

    # ---- decoding and runtime ----------------------------------------------------------------------------------
    def use_decoder(self, kind: str = "wan", weights: str | Path | None = None) -> None:
        """Decode frames with the Wan VAE (`wan`) or a TAEHV decoder loaded from `weights` (`taehv`; a checkpoint in
        the taew2_1 layout, which users download). Sessions opened afterwards use it."""
        if kind == "wan":
            self.frame_decoder, self.decoder_kind = self.vae, "wan"
            return
        if kind != "taehv":
            raise PresetError(f"unknown decoder {kind!r}; choose wan or taehv")
        if weights is None:
            raise WeightsError("the taehv decoder needs its weights file (--decoder-weights taew2_1.pth)")
        from .taehv import load_taehv

        key = str(Path(weights).resolve())
        decoder = self._taehv.get(key)        # switching back keeps the loaded (and maybe compiled) decoder
        if decoder is None:
            v = self.preset.vae
            decoder = self._taehv[key] = load_taehv(weights, v.z_dim, v.temporal_stride, v.spatial_stride,
                                                    self.device, self.dtype)
        self.frame_decoder, self.decoder_kind = decoder, "taehv"

    def use_attention(self, prefer: str = "auto") -> str:
        """Choose the attention backend again (auto, fa3, cudnn, flash, sdpa); an unusable one falls back."""
        from .attention import configure

        self.attention_backend = configure(self.device, self.dtype, prefer)
        return self.attention_backend

    def runtime_info(self) -> dict:
        """What this generator runs with (for logs, /healthz and benchmarks)."""
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "attention": self.attention_backend, "compiled": self.compiled, "decoder": self.decoder_kind}

    def close(self) -> None:
        """Stop the side worker (sessions must be closed first)."""
        self.finisher.close()

    # ---- prompts --------------------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> torch.Tensor:
        """Text encoder output (1, L, text_dim), memoised per prompt string (small LRU)."""
        with self._prompt_lock:
            hit = self._prompt_cache.get(text)
            if hit is not None:
                self._prompt_cache.move_to_end(text)
                return hit
        with torch.no_grad():
            emb = self.text_encoder.encode([text]).to(self.device)
        with self._prompt_lock:
            self._prompt_cache[text] = emb
            while len(self._prompt_cache) > 64:
                self._prompt_cache.popitem(last=False)
        return emb

    def null_prompt(self) -> PromptContext:
        """The empty prompt's cross-attention context (classifier-free guidance), built once."""
        if self._null_prompt is None:
            self._null_prompt = self.model.embed_text(self.encode_prompt(""))
        return self._null_prompt

    # ---- sessions -------------------------------------------------------------------------------------------
    def cache_geometry(self, batch: int = 1) -> CacheGeometry:
        m = self.model
        return CacheGeometry(m.num_layers, m.heads, m.head_dim, self.preset.cache.chunk_frames,
                             self.chunk_grid, self.block_grid, batch)

    def new_cache(self, kind: str) -> KVCache:
        if kind not in CACHE_KINDS:
            raise PresetError(f"unknown cache {kind!r}; choose one of {', '.join(CACHE_KINDS)}")
        return build_cache(kind, self.cache_geometry(), self.preset.cache, self.model.rope, self.device, self.dtype)

    def open(self, prompt: str, seed: int = 0, cache: str = "packed",
             start: np.ndarray | None = None) -> "GenerationSession":
        """`start`: a picture (H, W, 3) or clip (T, H, W, 3), uint8 RGB, fitted to the preset's size (scale to
        cover, centre crop) and committed as the stream's first context chunks; the prompt may then be empty.
        The start frames are not shown: the first chunk `next_chunk` returns continues from them."""
        if self.device.type == "meta":
            raise PresetError("a generator on the meta device is for sizing only (new_cache, parameters)")
        prompt = validate_prompt(prompt, allow_empty=start is not None)
        frames = None if start is None else self.fit(start)
        return GenerationSession(self, prompt, int(seed), cache, start=frames)

    def fit(self, frames: np.ndarray) -> np.ndarray:
        """A picture or clip fitted to the preset's size: uint8 (T, H, W, 3); raises StartFramesError."""
        return fit_frames(frames, self.preset.height, self.preset.width)

    def next_chunks(self, sessions: list["GenerationSession"], decode: bool = True) -> list:
        """Advance several sessions by one chunk each, batched: one model call per denoising step and one commit
        pass for all of them (`packcache.batch`). Returns, per session, what its `next_chunk()` (or `advance()`
        with decode=False) returns, or the exception it raised; one session's error never stops the others."""
        from .batch import step_sessions

        return step_sessions(self, sessions, decode)

    def submit_chunks(self, sessions: list["GenerationSession"],
                      decode: bool = True) -> list[concurrent.futures.Future]:
        """`next_chunks` pipelined: denoise and commit here, batched; the finish (decode, compressed backup) of all
        of them as one job on the side worker. Returns per session a future of what `next_chunks` returns for it
        (its exception as the future's). Call again at once: the next batch denoises while this one finishes, and
        each session's next commit waits for its finish (the invariant above, kept in `packcache.batch`)."""
        from .batch import submit_sessions

        return submit_sessions(self, sessions, decode)

    def warmup(self, prompt: str = "warm-up") -> float:
        """Generate one throwaway chunk so the first viewer never waits for allocation or kernel selection; with
        `compile_config` set, compile first and warm up to the cache's steady state (packcache.compile)."""
        start = time.perf_counter()
        if self.compile_config is not None and not self.compiled:
            from .compile import compile_generator
            try:
                compile_generator(self, self.compile_config)
                return time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001 - a compiler failure must not stop the server: run eager
                log.warning("compile failed (%s: %s); running uncompiled", type(exc).__name__, exc)
                from .compile import uncompile_generator
                uncompile_generator(self)
        session = self.open(prompt)
        try:
            session.next_chunk()
        finally:
            session.close()
        return time.perf_counter() - start

    @property
    def fps(self) -> int:
        return self.preset.fps

    # ---- snapshots (packcache/snapshot.py) ---------------------------------------------------------------------
    def restore(self, path: str | Path) -> "GenerationSession":
        """A session continuing the snapshot at `path` exactly where it stopped (bit for bit on the same device).

        Raises SnapshotError (a PackCacheError) for a missing, truncated, corrupted or newer file, or one taken with
        another preset, configuration, weights or dtype."""
        from .snapshot import restore_session
        return restore_session(self, path)


class GenerationSession:
    """One endless stream: its cache, its streaming decoder, its prompt and its noise generator."""

    def __init__(self, gen: Generator, prompt: str, seed: int, cache_kind: str, start: np.ndarray | None = None):
        self.gen = gen
        self._start = start              # fitted start frames: committed before chunk 0, again after every reset
        self._cue: np.ndarray | None = None   # frames to commit as context before the next chunk
        self._first_chunk = True         # the chunk in progress is the video's first (9 frames, not 12)
        self.cache_kind = cache_kind
        self.seed = seed
        self.prompt = prompt
        self._lock = threading.Lock()
        self._pending: dict | None = None
        self._pending_reset: int | None = None
        self._in_progress = False
        self._closed = False
        self._last_seconds = 0.0
        self._total_seconds = 0.0
        self._frames = 0
        self._finishing: concurrent.futures.Future | None = None    # the previous chunk's finish
        self._finish_failed: str | None = None                       # set when one failed: only a reset goes on
        self.clock = StageClock(gen.device)
        self._start_stream(seed)
        self._text = gen.encode_prompt(prompt)
        self._prompt_ctx = gen.model.embed_text(self._text)
        self._blend: dict | None = None

    def _start_stream(self, seed: int) -> None:
        self.seed = seed
        self.chunk_index = 0
        self._last_x0: torch.Tensor | None = None     # the latest chunk's latents, where the next one starts from
        self.cache = self.gen.new_cache(self.cache_kind)
        self.decoder = self.gen.frame_decoder.stream_decoder()
        self._rng = torch.Generator(device="cpu").manual_seed(seed)
        self._cue = self._start

    # ---- thread-safe controls -------------------------------------------------------------------------------
    def set_prompt(self, text: str, transition: str = "cut", blend_chunks: int = 4,
                   image: np.ndarray | None = None, restart: bool = False) -> int:
        """Queue a new prompt; returns the chunk index at which it takes effect (the next chunk to start).

        `image`: a picture (H, W, 3) or clip, uint8, committed as context right before that chunk (after the
        transition's own work: `recache` first recomputes the recent chunks under the new prompt), so the stream
        cuts to the picture and continues from it; the picture itself is not shown. Before the first chunk it
        becomes the start (a reset replays it). With an image the prompt may be empty: the picture steers alone.
        `restart`: a reset (same seed) queued together with the prompt, atomically: the stream starts over from
        `image` as its new start (returns 0).
        """
        text = validate_prompt(text, allow_empty=image is not None)
        frames = None if image is None else self.gen.fit(image)
        if transition not in TRANSITIONS:
            raise PromptError(f"unknown transition {transition!r}; choose one of {', '.join(TRANSITIONS)}")
        if transition == "blend":
            validate_blend_chunks(blend_chunks)
        with self._lock:
            self._pending = {"text": text, "transition": transition, "blend_chunks": blend_chunks, "image": frames}
            if restart:
                self._pending_reset = self.seed
                return 0
            return self.chunk_index + (1 if self._in_progress else 0)

    def reset(self, seed: int | None = None) -> None:
        """Restart the stream from chunk 0 (same prompt; a new seed if given) before the next chunk."""
        with self._lock:
            self._pending_reset = self.seed if seed is None else int(seed)

    # ---- generation -----------------------------------------------------------------------------------------
    def next_chunk(self) -> np.ndarray:
        """Generate, decode and return the next chunk's frames: uint8 (T, H, W, 3)."""
        return self.submit_chunk().result()

    def advance(self) -> torch.Tensor:
        """Generate the next chunk and update the cache without producing frames (benchmarks, latent export).

        Returns the clean latents (1, 16, T, h, w). The VAE still runs when the compressor's LR branch needs pixels.
        """
        return self.submit_chunk(decode=False).result()

    @torch.no_grad()
    def submit_chunk(self, decode: bool = True) -> concurrent.futures.Future:
        """Denoise and commit the next chunk on the calling thread; hand its finish (decode, compressed backup) to
        the side worker. Returns a future of what `next_chunk` (decode=True) or `advance` (decode=False) returns.

        Call it again as soon as it returns: the next chunk's denoising overlaps this chunk's finish, and its
        commit waits for that finish (the invariant above). Calls must come from one thread at a time."""
        start = time.perf_counter()
        self._begin_step()
        try:
            row = self.clock.new_chunk(self.chunk_index)
            prompt = self._prompt_for_chunk()
            anchor = self.cache.begin_chunk()
            with self.clock.stage(row, "denoise"):
                x0 = self._denoise(prompt, anchor)
            self._wait_finish()
            with self.clock.stage(row, "commit"):
                slot = self._commit(x0, prompt, anchor)
        except BaseException:
            self._abort_step()
            raise
        self._end_step(x0)
        if not decode and not (self.cache.compresses and slot is not None):
            future: concurrent.futures.Future = concurrent.futures.Future()
            self._record_time(start)
            future.set_result(x0)
            return future
        future = self.gen.finisher.submit(self._finish_job, x0, slot, prompt, decode, row, start)
        self._finishing = future
        return future

    def _begin_step(self) -> None:
        """Mark a chunk in progress and apply a queued reset and prompt (shared with `packcache.batch`)."""
        with self._lock:
            if self._closed:
                raise PackCacheError("session is closed")
            self._in_progress = True
            reset, self._pending_reset = self._pending_reset, None
            pending, self._pending = self._pending, None
        try:
            if self._finish_failed is not None and reset is None:
                raise PackCacheError(f"the previous chunk failed to finish ({self._finish_failed}); reset the stream")
            if reset is not None or pending is not None:
                self._wait_finish(failed_ok=reset is not None)   # a reset drops, a recache rewrites, its buffers
            if reset is not None:
                self._finish_failed = None
                self._drop_stream()
                self._start_stream(reset)
            if pending is not None:
                self._apply_prompt(pending)
            if self._cue is not None:                # a start picture or an image cue: context before the chunk
                cue, self._cue = self._cue, None
                self._wait_finish()
                self._commit_context(cue)
            self._first_chunk = self.cache.chunks_seen == 0   # the video's first chunk: 1 + 4(T-1) frames, not 4T
        except BaseException:
            self._abort_step()
            raise

    def _abort_step(self) -> None:
        with self._lock:
            self._in_progress = False

    def _end_step(self, latents: torch.Tensor, start: float | None = None) -> None:
        """The chunk is committed: advance the index (and, for a synchronous finish, record its time)."""
        with self._lock:   # one step, so set_prompt never sees the new index while still "in progress"
            self.chunk_index += 1
            self._in_progress = False
        if start is not None:
            self._record_time(start)
        t, stride = latents.shape[2], self.gen.preset.vae.temporal_stride
        self._frames += stride * t - (stride - 1 if self._first_chunk else 0)   # 9 then 12 frames for T=3
        self._last_x0 = latents

    def _finish_job(self, x0, slot, prompt, decode, row, start):
        pixels = self._finish(x0, slot, prompt, decode, row)
        out = frames_to_uint8(pixels)[0] if decode else x0
        self._record_time(start)
        return out

    def _record_time(self, start: float) -> None:
        self._last_seconds = time.perf_counter() - start
        self._total_seconds += self._last_seconds

    def _wait_finish(self, failed_ok: bool = False) -> None:
        """Block until the previous chunk's finish is complete (host and device)."""
        future, self._finishing = self._finishing, None
        if future is None:
            return
        try:
            future.result()
        except Exception as exc:
            self._finish_failed = str(exc) or type(exc).__name__
            if not failed_ok:
                raise PackCacheError(f"the previous chunk failed to finish ({exc}); reset the stream") from exc

    def _apply_prompt(self, pending: dict) -> None:
        gen = self.gen
        new_text = gen.encode_prompt(pending["text"])
        self.prompt = pending["text"]
        if pending["transition"] == "blend":
            self._blend = {"from": self._current_text(), "to": new_text, "start": self.chunk_index,
                           "n": pending["blend_chunks"]}
        else:
            self._blend = None
        self._text = new_text
        self._prompt_ctx = gen.model.embed_text(new_text)
        if pending["transition"] == "recache":
            self._recache()
        if pending["transition"] != "blend":
            self._last_x0 = None            # a cut or a recache: the new scene's first chunk from pure noise
        if pending.get("image") is not None:
            if self.cache.chunks_seen == 0:      # no context yet: the picture is the stream's start
                self._start = pending["image"]
            self._cue = pending["image"]

    def _commit_context(self, frames: np.ndarray) -> None:
        """Fitted frames -> VAE latents -> committed chunk by chunk like generated ones (sink first, then recent,
        then the mid bank), under the current prompt. Each is also run through `_finish`: the streaming decoder is
        primed (its pixels are dropped), so the next generated chunk decodes as their continuation, and the packed
        cache gets its compressed backup."""
        gen = self.gen
        first = self.cache.chunks_seen == 0
        for x0 in encode_context(gen.vae, frames, gen.preset.cache.chunk_frames, first):
            x0 = x0.to(gen.device, gen.dtype)
            anchor = self.cache.begin_chunk()
            slot = self._commit(x0, self._prompt_ctx, anchor)
            self._finish(x0, slot, self._prompt_ctx, decode=True)
            self._last_x0 = x0              # the next generated chunk continues the picture
        log.debug("committed %d context frame(s) as %s", len(frames), "the start" if first else "an image cue")

    def _current_text(self) -> torch.Tensor:
        b = self._blend
        if b is None:
            return self._text
        w = min(1.0, (self.chunk_index - b["start"] + 1) / b["n"])
        return torch.lerp(b["from"].float(), b["to"].float(), w).to(b["to"].dtype)

    def _prompt_for_chunk(self) -> PromptContext:
        b = self._blend
        if b is None:
            return self._prompt_ctx
        if self.chunk_index - b["start"] + 1 >= b["n"]:
            self._blend = None
            return self._prompt_ctx
        return self.gen.model.embed_text(self._current_text())

    def _recache(self) -> None:
        """Recompute the recent (full-resolution) chunks' K/V under the new prompt, oldest first (LongLive-style)."""
        model, cache = self.gen.model, self.cache
        zero = torch.zeros(1, device=self.gen.device)
        for i, (slot, latents, start, tokens) in enumerate(cache.recent_chunks()):
            model.forward_chunk(latents, zero, self._prompt_ctx, cache.recacher(i), start, head=False)
            if cache.compresses and tokens is not None:
                self._encode_compressed(slot, tokens)

    def _noise(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self._rng).to(self.gen.device, self.gen.dtype)

    def _generate(self, decode: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One chunk in its three phases: denoise against the cache, commit its K/V, finish (decode, compress)."""
        prompt = self._prompt_for_chunk()
        anchor = self.cache.begin_chunk()
        x0 = self._denoise(prompt, anchor)
        slot = self._commit(x0, prompt, anchor)
        pixels = self._finish(x0, slot, prompt, decode)
        return x0, pixels

    def _chunk_shape(self) -> tuple[int, ...]:
        p = self.gen.preset
        return (1, p.transformer.in_channels, p.cache.chunk_frames, p.latent_height, p.latent_width)

    def _guidance(self) -> tuple[PromptContext | None, float]:
        """This chunk's guidance: the empty prompt's context (classifier-free guidance) or None, and the context
        guidance scale. A picture alone (empty prompt) gets no text guidance: it would change nothing."""
        gen, sampler = self.gen, self.gen.sampler
        empty = self.prompt == "" and self._blend is None
        unconditional = gen.null_prompt() if sampler.guided and not empty else None
        return unconditional, (sampler.config.context_guidance if empty else 1.0)

    def _first_step(self) -> int:
        """The sampler step this chunk starts at: `SamplerConfig.continue_from_step` once there is a previous chunk
        (generated, or a start picture or image cue committed as context), 0 (pure noise) for a stream's first chunk
        and the first after a reset, a cut or a recache."""
        if self._last_x0 is None:
            return 0
        return min(self.gen.sampler.config.continue_from_step, self.gen.sampler.steps - 1)

    def _initial_x(self, shape, first_step: int) -> torch.Tensor:
        """Pure noise, or the previous chunk's latents renoised to the first step's level (the same noise draw
        either way, so the session's noise stream does not depend on the setting)."""
        noise = self._noise(shape)
        if first_step == 0:
            return noise
        return self.gen.sampler.renoise(self._last_x0, noise, self.gen.sampler.sigmas[first_step])

    def _denoise(self, prompt: PromptContext, anchor: float) -> torch.Tensor:
        """The sampler's steps against the cache (read-only); mid selection is fixed at the first step."""
        gen, model, sampler = self.gen, self.gen.model, self.gen.sampler
        shape = self._chunk_shape()
        reader = self.cache.reader()
        first = self._first_step()
        x = self._initial_x(shape, first)
        x0 = x
        unconditional, context_g = self._guidance()
        for k in range(first, sampler.steps):
            sigma = sampler.sigmas[k]
            t = sampler.timestep(sigma, 1, gen.device)
            v = model.forward_chunk(x, t, prompt, reader, anchor)
            if unconditional is not None:   # the reader's mid-block selection was fixed by the conditional pass
                v = sampler.guide(v, model.forward_chunk(x, t, unconditional, reader, anchor))
            elif context_g != 1.0:          # see SamplerConfig.context_guidance
                v_none = model.forward_chunk(x, t, prompt, None, anchor).float()
                v = (v_none + context_g * (v.float() - v_none)).to(v.dtype)
            x0 = sampler.x0_from_velocity(x, v, sigma)
            if k + 1 < sampler.steps:
                x = sampler.next_x(x, v, x0, k, lambda: self._noise(shape))
        return x0

    def _commit(self, x0: torch.Tensor, prompt: PromptContext, anchor: float) -> int | None:
        """The t=0 pass that writes the chunk's K/V, then the partition update; returns the chunk's recent slot."""
        gen = self.gen
        gen.model.forward_chunk(x0, gen.sampler.timestep(0.0, 1, gen.device), prompt, self.cache.committer(), anchor,
                                head=False)
        return self.cache.end_chunk(x0)

    def _finish(self, x0: torch.Tensor, slot: int | None, prompt: PromptContext, decode: bool,
                row: dict | None = None) -> torch.Tensor | None:
        """Streaming VAE decode and, for the packed cache, the chunk's compressed K/V backup (needed before the
        next chunk's commit, which may move this chunk from recent to the mid bank)."""
        gen, cache = self.gen, self.cache
        needs_pixels = cache.compresses and slot is not None and gen.compressor.needs_pixels
        with self.clock.stage(row, "decode"):
            pixels = self.decoder.decode(x0) if decode or needs_pixels else None
        if cache.compresses and slot is not None:
            with self.clock.stage(row, "compress"):
                tokens = gen.compressor(x0, gen.block_grid, pixels)
                self._encode_compressed(slot, tokens, prompt)
        return pixels

    def _encode_compressed(self, slot: int, tokens: torch.Tensor, prompt: PromptContext | None = None) -> None:
        gen = self.gen
        offsets = self.cache.geo.block_temporal_offsets()
        pos = grid_positions(*gen.block_grid, offsets, spatial_stride=4.0)
        gen.model.encode_tokens(tokens, pos, ("block", gen.block_grid), prompt or self._prompt_ctx,
                                self.cache.compressor_writer(slot, tokens))

    # ---- introspection and teardown -------------------------------------------------------------------------
    def stats(self) -> dict:
        cs = self.cache.stats() if not self._closed else None
        chunks = max(1, self.chunk_index)
        out = {
            "chunk_index": self.chunk_index,
            "prompt": self.prompt,
            "cache": self.cache_kind,
            "seconds_per_chunk": self._last_seconds,
            "mean_seconds_per_chunk": self._total_seconds / chunks if self.chunk_index else 0.0,
            "realtime_factor": (self._frames / self.gen.fps) / self._total_seconds if self._total_seconds else 0.0,
            "frames": self._frames,
            "start_frames": 0 if self._start is None else len(self._start),
        }
        if cs is not None:
            out.update({"kv_bytes": cs.kv_bytes, "attended_tokens": cs.attended_tokens,
                        "context_tokens": cs.context_tokens, "partitions": cs.partitions,
                        "position_range": list(cs.position_range)})
        return out

    def _drop_stream(self) -> None:
        self.cache.close()
        self.decoder.close()

    def close(self) -> None:
        """Free the cache and decoder state; idempotent. Safe while no chunk is being generated (a finish still
        running on the side worker is waited for)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wait_finish(failed_ok=True)
        self._drop_stream()
        self._prompt_ctx = None
        self._blend = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- snapshots (packcache/snapshot.py) ---------------------------------------------------------------------
    def snapshot(self, path: str | Path, extra: dict | None = None,
                 extra_tensors: dict[str, torch.Tensor] | None = None):
        """Write this session's complete state to `path` (one versioned safetensors file); `gen.restore(path)`
        continues it. Call between chunks, from the thread that generates. Returns a `SnapshotInfo`."""
        from .snapshot import write_snapshot
        return write_snapshot(self, path, extra, extra_tensors)

    def state_dict(self) -> dict:
        """The session's state between chunks; each holder (cache, decoder, importance) adds its own part."""
        from .errors import SnapshotError
        self._wait_finish()   # the last chunk's decode and compressed backup belong to the state
        with self._lock:
            if self._closed:
                raise SnapshotError("session is closed")
            if self._in_progress:
                raise SnapshotError("a chunk is being generated; snapshot between chunks")
            pending = dict(self._pending) if self._pending is not None else None
            pending_reset = self._pending_reset
        if pending is not None and pending.get("image") is not None:
            pending["image"] = torch.from_numpy(np.ascontiguousarray(pending["image"]))
        state_fn = getattr(self.decoder, "state_dict", None)
        if state_fn is None:
            raise SnapshotError(f"snapshots do not support the {type(self.decoder).__name__} decoder yet")
        return {
            "cache_kind": self.cache_kind, "seed": self.seed, "prompt": self.prompt, "chunk_index": self.chunk_index,
            "pending": pending, "pending_reset": pending_reset,
            "text": self._text, "blend": dict(self._blend) if self._blend is not None else None,
            "rng": self._rng.get_state(),
            "start": None if self._start is None else torch.from_numpy(np.ascontiguousarray(self._start)),
            "cue": None if self._cue is None else torch.from_numpy(np.ascontiguousarray(self._cue)),
            "counters": {"last_seconds": self._last_seconds, "total_seconds": self._total_seconds,
                         "frames": self._frames},
            "cache": self.cache.state_dict(), "decoder": state_fn(),
            "last_x0": None if self._last_x0 is None else self._last_x0.detach().cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output (a fresh session of the same generator and cache kind)."""
        from .errors import SnapshotError
        if state["cache_kind"] != self.cache_kind:
            raise SnapshotError(f"snapshot holds a {state['cache_kind']!r} session, not {self.cache_kind!r}")
        device = self.gen.device
        self.seed, self.prompt, self.chunk_index = int(state["seed"]), state["prompt"], int(state["chunk_index"])
        self._pending, self._pending_reset = state["pending"], state["pending_reset"]
        if self._pending is not None and self._pending.get("image") is not None:
            self._pending = {**self._pending, "image": self._pending["image"].numpy()}
        self._start = None if state.get("start") is None else state["start"].numpy()   # pictures: uint8 arrays
        self._cue = None if state.get("cue") is None else state["cue"].numpy()
        self._text = state["text"].to(device)
        blend = state["blend"]
        if blend is not None:
            blend = {**blend, "from": blend["from"].to(device), "to": blend["to"].to(device)}
            if state["blend"]["to"] is state["text"]:
                blend["to"] = self._text
        self._blend = blend
        self._prompt_ctx = self.gen.model.embed_text(self._text)
        self._rng.set_state(state["rng"])
        last = state.get("last_x0")        # (snapshots from before session 19 have none: the next chunk from noise)
        self._last_x0 = None if last is None else last.to(device, self.gen.dtype)
        c = state["counters"]
        self._last_seconds, self._total_seconds, self._frames = c["last_seconds"], c["total_seconds"], c["frames"]
        self.cache.load_state_dict(state["cache"])
        load = getattr(self.decoder, "load_state_dict", None)
        if load is None:
            raise SnapshotError(f"snapshots do not support the {type(self.decoder).__name__} decoder yet")
        load(state["decoder"])


# ---- shipped weights ----------------------------------------------------------------------------------------
def shipped_weights_path(name: str) -> Path:
    path = Path(str(resources.files("packcache") / "weights" / name))
    if not path.is_file():
        raise WeightsError(f"shipped weights missing: {path} (reinstall the package)")
    return path


def bundle_transformer(path: Path, config: TransformerConfig) -> TransformerConfig:
    """The DiT a bundle holds: `config`, with a spatial embedding over the bundle's table grid when it has one
    (the bundle decides, so retrained toy weights with a table load where the old ones without load too)."""
    from dataclasses import replace

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        if "transformer.spatial_embedding" not in f.keys():
            return replace(config, spatial_embedding=None)
        shape = f.get_slice("transformer.spatial_embedding").get_shape()
    return replace(config, spatial_embedding=(int(shape[3]), int(shape[4])))


def load_bundle(path: Path, model: CausalWanModel, vae: VideoVAE, compressor: MidCompressor) -> None:
    """One safetensors file with `transformer.`, `vae.` and `compressor.` prefixed keys (the toy model's format)."""
    from safetensors.torch import load_file

    from .weights import load_module_weights

    state = load_file(str(path))
    parts: dict[str, dict] = {"transformer": {}, "vae": {}, "compressor": {}}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts:
            raise WeightsError(f"{path.name}: unexpected key {key!r} (prefixes: transformer., vae., compressor.)")
        parts[prefix][rest] = value
    load_module_weights(model.transformer, parts["transformer"], "transformer")
    load_module_weights(vae.vae, parts["vae"], "vae")
    if compressor.hr is not None:
        load_module_weights(compressor, parts["compressor"], "compressor")
