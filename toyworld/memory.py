"""A memory test where the mid partition matters: a subject that is seen, leaves, and should come back the same.

The stream is *teacher-forced* through the cache with world frames whose content the world knows exactly, then
the model continues on its own:

    chunks 0 .. S-1            the empty background (they become the sink)
    chunks S .. S+M-1          the subject (colour, shape, motion) in view: they end up in the mid bank
    chunks S+M .. S+M+G-1      the empty background again: the subject has left (recent / newest mid blocks)
    then P chunks generated    prompt "a <shape> <motion> on a <background>": it names no colour

The subject's colour is given only by what was seen after the sink and before the recent window, so a continuation
gets it right only through memory: `memory_recall` is the share of generated chunks whose dominant foreground
colour (`toyworld.metrics.dominant_color`) is the subject's. With G >= the window baseline's chunks, the window
cache cannot see the subject; with G >= recent + top-k, FIFO selection attends only to empty blocks; full history
and top-k selection can reach it. Chance is about 1/8 (eight colours), less when the model draws nothing.

Teacher forcing uses the session's own commit and finish phases (`GenerationSession._commit`, `_finish`) with given
clean latents in place of denoised ones, so the cache, the compressor and the streaming decoder see exactly what
they would for a generated chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import metrics as M
from .common import to_tensor
from .world import SHAPE_COLORS, Background, Scene, render, single_shape_scene

BG_WORDS = {"stripes": "striped", "solid": "plain", "checker": "checkered", "gradient": "gradient"}


@dataclass(frozen=True)
class MemoryTrial:
    color: str
    shape: str
    motion: str
    background: str
    bg_color: str
    seed: int

    def scene(self) -> Scene:
        return single_shape_scene(self.color, self.shape, self.motion, self.background, self.bg_color, self.seed)

    def empty(self) -> Scene:
        return Scene(background=self.scene().background, shapes=())

    @property
    def prompt(self) -> str:
        """Shape, motion and the background's pattern, as the captions word them, and no colour word at all: with
        the background's colour named, the toy model painted the subject in it (session 10: 3 of 4 trials), so
        the prompt itself steered the colour the test asks memory for."""
        from .world import MOTION_WORDS
        motion, bg = MOTION_WORDS[self.motion][0], BG_WORDS[self.background]
        return f"a {self.shape} {motion} on a {bg} background"


def trials(n: int, seed: int = 0) -> list[MemoryTrial]:
    """n trials cycling through the eight colours, with seeded shape, motion and background."""
    from .world import BACKGROUND_COLORS, MOTIONS, SHAPES
    rng = np.random.default_rng(seed)
    colors = list(SHAPE_COLORS)
    return [MemoryTrial(colors[i % len(colors)], str(rng.choice(SHAPES)), str(rng.choice(MOTIONS)),
                        str(rng.choice(["stripes", "solid", "checker", "gradient"])),
                        str(rng.choice(list(BACKGROUND_COLORS))), int(rng.integers(1000))) for i in range(n)]


def chunk_frames(gen, index: int) -> tuple[int, int]:
    """[start, end) video frames of stream chunk `index` (`Preset.chunk_video_frames`)."""
    return gen.preset.chunk_video_frames(index)


def script_frames(gen, trial: MemoryTrial, sink: int, seen: int, gap: int) -> tuple[np.ndarray, list[bool]]:
    """The teacher-forced frames, chunk by chunk (empty, subject, empty), and which chunks show the subject."""
    n = sink + seen + gap
    total = chunk_frames(gen, n - 1)[1]
    size = gen.preset.height
    with_subject = render(trial.scene(), 0, total, size)
    without = render(trial.empty(), 0, total, size)
    shown = [sink <= i < sink + seen for i in range(n)]
    parts = [(with_subject if shown[i] else without)[slice(*chunk_frames(gen, i))] for i in range(n)]
    return np.concatenate(parts), shown


@torch.no_grad()
def encode_chunks(gen, frames: np.ndarray, chunks: int) -> list[torch.Tensor]:
    """Clean latents per chunk, each chunk encoded afresh from its previous frame plus its own frames (how the toy
    model's final training data was encoded: a long clip in one go drifts)."""
    out = []
    x = to_tensor(frames)[None]
    for i in range(chunks):
        a, b = chunk_frames(gen, i)
        z = gen.vae.encode(x[:, :, a:b]) if i == 0 else gen.vae.encode(x[:, :, a - 1:b])[:, :, 1:]
        out.append(z.to(gen.device, gen.dtype))
    return out


@torch.no_grad()
def teacher_force(session, latents: torch.Tensor) -> np.ndarray:
    """Commit given clean latents as the session's next chunk (cache, compressor, decoder); returns its frames."""
    from packcache.vae import frames_to_uint8
    prompt = session._prompt_for_chunk()
    anchor = session.cache.begin_chunk()
    slot = session._commit(latents, prompt, anchor)
    pixels = session._finish(latents, slot, prompt, decode=True)
    session.chunk_index += 1
    return frames_to_uint8(pixels)[0]


def run_trial(gen, trial: MemoryTrial, cache: str = "packed", sink: int = 2, seen: int = 3, gap: int = 3,
              probe: int = 3, seed: int = 0, force_subject: bool = False) -> dict:
    """One trial: teacher-force sink + seen + gap chunks, generate `probe` chunks; recall and the probe frames.
    `force_subject`: every layer attends to the subject's blocks instead of its top-k (`force_selection`)."""
    frames, shown = script_frames(gen, trial, sink, seen, gap)
    latents = encode_chunks(gen, frames, len(shown))
    s = gen.open(trial.prompt, seed=seed, cache=cache)
    subject_chunks = set(range(sink, sink + seen))
    if force_subject:
        force_selection(s, subject_chunks)
    out, picked = [], []
    try:
        for z in latents:
            teacher_force(s, z)
        for _ in range(probe):
            out.append(s.next_chunk())
            picked += selected_mid_chunks(s)
        stats = s.stats()
    finally:
        s.close()
    got = [M.dominant_color(c) for c in out]
    # recall 0 has two causes: the colour is wrong, or nothing is drawn (the model continues the empty gap)
    return {"trial": trial, "got": got, "recall": sum(g == trial.color for g in got) / probe,
            "drawn": sum(g is not None for g in got) / probe,
            "frames": np.concatenate(out), "kv_bytes": stats.get("kv_bytes", 0),
            "attended_tokens": stats.get("attended_tokens", 0),
            "subject_selected": (sum(c in subject_chunks for c in picked) / len(picked)) if picked else None}


def force_selection(session, chunk_ids: set[int]) -> None:
    """Make the session's top-k selection take the mid blocks of `chunk_ids` first (then the others by importance).

    An instrument, not a cache mode: recall with the subject's blocks forced in measures whether the model *reads*
    them, apart from whether selection *picks* them (`subject_selected`). Replaces this session's
    `BlockImportance.top_k` only; FIFO selection does not use it."""
    cache = session.cache
    importance = getattr(cache, "importance", None)
    if importance is None or not getattr(cache, "compresses", False):
        raise ValueError("forcing the selection needs a packed cache with top-k selection")
    ranked = importance.top_k

    def top_k(layer: int, k: int, valid: torch.Tensor) -> torch.Tensor:
        ids = cache.mid_chunk_ids
        wanted = [i for i in range(len(ids)) if bool(valid[i]) and int(ids[i]) in chunk_ids]
        others = [int(i) for i in ranked(layer, int(valid.sum()), valid) if int(i) not in wanted]
        return torch.tensor((wanted + others)[:k], dtype=torch.long)
    importance.top_k = top_k


def selected_mid_chunks(session) -> list[int]:
    """Chunk ids of the mid blocks every layer attended to for the session's last chunk (empty for caches without
    a mid bank). Memory recall needs two things, that selection picks the blocks that held the subject and that
    the model reads them; this is the first, measured apart from the second."""
    layers = session.gen.preset.transformer.num_layers
    chosen = getattr(session.cache, "selected_chunks", None)
    if chosen is None:
        return []
    return [c for layer in range(layers) for c in (chosen(layer) or [])]
