"""Evaluate the shipped toy world model: real time, prompt following, prompt switches, 24x extrapolation.

    python -m toyworld.evaluate                      # everything; writes toyworld/eval/ (tables, JSON, PNG strips)
    python -m toyworld.evaluate --quick              # fewer prompts and a 30 s long run (a smoke test)

Tables (markdown) are printed and written to toyworld/eval/RESULTS.md:

1. VAE alone: does encode + decode keep each shape colour?
2. Sampler variants side by side on the same weights (fresh re-noising vs Euler steps; guidance scales;
   time shift).
3. Real-time factor per cache kind: seconds of video per second of wall time on this CPU (threads as given).
4. Prompt following: 20 prompts in the captions' vocabulary, the share of chunks whose dominant foreground colour
   is the prompt's colour; then 8 prompts with words training never saw (e.g. "crimson"), reported apart; then the
   same 20 prompts over 8 chunks, by chunk index, packed and window (drift away from the prompt).
5. Prompt switch (`cut` and `recache`): chunks until the new colour dominates, over 10 switches each.
6. Scene (issue 16): per chunk over 8 chunks, on the evaluation prompts, a grid of scenes and its paraphrases:
   one subject, shape, background colour and pattern, motion word, with confusion tables and one strip PNG per
   prompt family (`toyworld.scene_eval`), and the scene readers' own accuracy on rendered frames
   (`toyworld.scene_check`).
7. Extrapolation: 120 s (24x the 5 s training clips) with packed, window and full caches: subject (colour and
   shape) consistency, background stability and motion per 10 s window, K/V bytes at chunk 10 vs the last chunk,
   and a PNG strip of one frame every 10 s per cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import metrics as M

HERE = Path(__file__).resolve().parent

# 20 prompts in the captions' vocabulary (canonical grammar, and the paraphrases and templates training draws)
PROMPTS = [
    "a red circle bouncing on a striped blue background",
    "a green square orbiting on a plain gray background",
    "a blue triangle drifting on a checkered white background",
    "a yellow circle zigzagging on a gradient purple background",
    "an orange square bouncing on a plain black background",
    "a purple circle orbiting on a striped green background",
    "a pink triangle bouncing on a checkered teal background",
    "a cyan square drifting on a gradient brown background",
    "a red triangle orbiting on a plain white background",
    "a blue circle zigzagging on a striped black background",
    "a green triangle drifting on a checkered brown background",
    "a yellow square bouncing on a gradient blue background",
    "a bright orange ball floating over a shaded teal backdrop",
    "a violet box ricocheting, solid black background",
    "banded gray background with a magenta disk circling",
    "an aqua wedge gliding on a flat dark green background",
    "a lime block weaving over a chequered plum backdrop",
    "a golden yellow dot revolving on a fading navy background",
    "a bright red tile jumping around on a stripy grey background",
    "a bright blue pyramid meandering on a uniform brown background",
]

# Wordings and colour names the training captions never contain: how far the text encoder carries the model.
UNSEEN_PROMPTS = [
    "a crimson ball bouncing around on a dark striped background",
    "scarlet disc moving fast over a plain grey background",
    "an emerald cube floating on a navy backdrop",
    "a lemon yellow pyramid spinning around the middle, checkered gray background",
    "a lavender box bouncing on a black background",
    "a fuchsia ball circling over white stripes",
    "an azure triangle gliding on a brown gradient",
    "a tangerine dot zigzagging on a teal background",
]

SWITCHES = [
    ("a red circle bouncing on a striped blue background", "a green square bouncing on a striped blue background"),
    ("a blue square orbiting on a plain gray background", "a yellow square orbiting on a plain gray background"),
    ("a yellow triangle drifting on a checkered white background", "a purple circle drifting on a plain black background"),
    ("a green circle zigzagging on a gradient brown background", "a red circle zigzagging on a gradient brown background"),
    ("a pink square bouncing on a plain black background", "a cyan triangle bouncing on a plain black background"),
    ("a cyan circle orbiting on a striped green background", "an orange circle orbiting on a striped green background"),
    ("an orange triangle bouncing on a checkered teal background", "a blue triangle bouncing on a checkered teal background"),
    ("a purple square drifting on a gradient gray background", "a yellow square drifting on a gradient gray background"),
    ("a red square orbiting on a plain white background", "a blue circle orbiting on a plain white background"),
    ("a green triangle bouncing on a striped black background", "a pink triangle bouncing on a striped black background"),
]

LONG_PROMPT = "a red circle bouncing on a striped blue background"


def load_generator(weights: str | Path | None = None, cache_threads: int | None = None):
    """The toy Generator, from the shipped weights or from a given bundle file (to evaluate a training run)."""
    from packcache import Generator
    if weights is None:
        return Generator.from_preset("toy", device="cpu")
    import torch

    from packcache.compress import MidCompressor
    from dataclasses import replace

    from packcache.generator import bundle_transformer, load_bundle
    from packcache.model import CausalWanModel
    from packcache.presets import get_preset
    from packcache.text import build_text_encoder
    from packcache.vae import VideoVAE
    preset = get_preset("toy")
    preset = replace(preset, transformer=bundle_transformer(Path(weights), preset.transformer))
    model = CausalWanModel(preset.transformer)
    vae = VideoVAE.build(preset.vae)
    comp = MidCompressor(preset.compressor, model.dim, model.patch_embedding, vae)
    load_bundle(Path(weights), model, vae, comp)
    return Generator._assemble(preset, model, vae, build_text_encoder(preset.text), comp, "cpu", torch.float32)


def md_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """cols: (key, header, format); a value that is None or missing (a measure that does not apply) shows as -."""
    cell = lambda v, f: "-" if v is None else format(v, f) if f else str(v)     # noqa: E731
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(cell(r.get(k), f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def vae_alone(gen, frames: np.ndarray) -> np.ndarray:
    """Rendered frames (F, H, W, 3) uint8, a whole number of stream chunks, through the generator's VAE alone ->
    uint8 frames: what any DiT's output could at best look like. Encoded chunk by chunk (`encode_by_chunks`), as
    the DiT's training latents are, and decoded by one stream decoder, as a stream's chunks are. (Until session 18
    the clip was encoded in one go, whose causal encoder drifts over a long clip: that ceiling fell to 38% one
    subject by chunk 3 and blamed the decoder for what the DiT never sees.)"""
    import torch

    from packcache.vae import encode_by_chunks, frames_to_uint8

    from .common import to_tensor
    p = gen.preset
    with torch.no_grad():
        latents = encode_by_chunks(gen.vae.encode, to_tensor(frames)[None], p.cache.chunk_frames,
                                   p.vae.temporal_stride)
        return frames_to_uint8(gen.vae.decode(torch.cat(latents, dim=2)))[0]


def vae_roundtrip(gen) -> list[dict]:
    """Does the VAE alone keep each colour? Encode and stream-decode a ground-truth clip per colour."""
    from .world import SHAPE_COLORS, render, single_shape_scene
    rows = []
    for i, color in enumerate(SHAPE_COLORS):
        frames = render(single_shape_scene(color, shape="square", background="solid", bg_color="gray", seed=i), 0, 33, 64)
        out = vae_alone(gen, frames)
        rows.append({"color": color, "decoded": str(M.dominant_color(out)),
                     "l1": float(np.abs(out.astype(np.float32) - frames.astype(np.float32)).mean() / 255)})
    return rows


def vae_ceiling(gen, clips_per_color: int = 3, chunks: int = 9, seed: int = 1) -> list[dict]:
    """How often the VAE alone keeps the subject's colour, by chunk index along varied one-shape clips (random
    shape, motion, background) as long as `chunks` stream chunks: a ceiling on prompt following at each chunk,
    since every generated chunk goes through the same decoder. The VAE trained on 9-frame clips; streams are
    longer. A chunk where the ground truth itself does not read as the colour is left out."""
    from .world import (
        BACKGROUND_COLORS,
        BACKGROUNDS,
        MOTIONS,
        SHAPE_COLORS,
        SHAPES,
        render,
        single_shape_scene,
    )
    rng = np.random.default_rng(seed)
    bounds = [gen.preset.chunk_video_frames(c) for c in range(chunks)]   # the stream's chunks (the first has 9)
    kept, total = np.zeros(chunks), np.zeros(chunks)
    for color in SHAPE_COLORS:
        for k in range(clips_per_color):
            scene = single_shape_scene(color, shape=str(rng.choice(SHAPES)), motion=str(rng.choice(MOTIONS)),
                                       background=str(rng.choice(BACKGROUNDS)),
                                       bg_color=str(rng.choice(list(BACKGROUND_COLORS))), seed=k)
            frames = render(scene, start=int(rng.integers(1000)), num_frames=bounds[-1][1], size=64)
            out = vae_alone(gen, frames)
            for c, (a, b) in enumerate(bounds):
                if M.dominant_color(frames[a:b]) == color:
                    total[c] += 1
                    kept[c] += M.dominant_color(out[a:b]) == color
    return [{"chunk": c, "kept": int(kept[c]), "clips": int(total[c]), "share": kept[c] / max(1, total[c])}
            for c in range(chunks)]


def vae_scene_ceiling(gen, clips_per_cell: int = 2, chunks: int = 6, seed: int = 2) -> dict:
    """What the scene readers still see after the VAE alone (encode + stream decode) of rendered one-subject clips
    of the shipped world, every background pattern x shape: a ceiling on the scene measures, since every
    generated chunk goes through the same decoder. -> {"by_pattern": rows, "by_shape": rows, "by_chunk": rows,
    overall shares}; by chunk index because later chunks decode from the carried decoder state, chunk 0 from none.
    A chunk counts only where the readers read the rendered truth right (they do on all, toyworld.scene_check)."""
    from .world import (
        BACKGROUND_COLORS,
        BACKGROUNDS,
        MOTIONS,
        SHAPE_COLORS,
        SHAPES,
        SHIPPED_WORLD,
        WORLD_STYLES,
        render,
        single_shape_scene,
    )
    rng = np.random.default_rng(seed)
    bounds = [gen.preset.chunk_video_frames(c) for c in range(chunks)]
    hits = {k: {"pattern": [], "shape": [], "one_subject": []} for k in (*BACKGROUNDS, *SHAPES, *range(chunks))}
    spread = {k: [] for k in BACKGROUNDS}       # the background's robust luma spread, the reader's first feature
    for kind in BACKGROUNDS:
        for shape in SHAPES:
            for k in range(clips_per_cell):
                scene = single_shape_scene(str(rng.choice(list(SHAPE_COLORS))), shape=shape,
                                           motion=str(rng.choice(MOTIONS)), background=kind,
                                           bg_color=str(rng.choice(list(BACKGROUND_COLORS))),
                                           seed=int(rng.integers(1 << 30)), style=WORLD_STYLES[SHIPPED_WORLD])
                frames = render(scene, start=0, num_frames=bounds[-1][1], size=64)
                out = vae_alone(gen, frames)
                for c, (a, b) in enumerate(bounds):
                    truth, read = M.scene_report(frames[a:b]), M.scene_report(out[a:b])
                    if truth["pattern"] == kind:
                        hits[kind]["pattern"].append(read["pattern"] == kind)
                        spread[kind].append(M.pattern_features(*M.background_image(out[a:b]))["std"])
                        hits[c]["pattern"].append(read["pattern"] == kind)
                    if truth["shape"] == shape:
                        hits[shape]["shape"].append(read["shape"] == shape)
                        hits[c]["shape"].append(read["shape"] == shape)
                    for key in (shape, kind, c):
                        hits[key]["one_subject"].append(read["one_subject"])
    share = lambda xs: float(np.mean(xs)) if xs else float("nan")
    by_pattern = [{"pattern": k, "chunks": len(hits[k]["pattern"]), "pattern_right": share(hits[k]["pattern"]),
                   "one_subject": share(hits[k]["one_subject"]),
                   "spread_median": float(np.median(spread[k])) if spread[k] else float("nan"),
                   "spread_max": max(spread[k], default=float("nan"))} for k in BACKGROUNDS]
    by_shape = [{"shape": k, "chunks": len(hits[k]["shape"]), "shape_right": share(hits[k]["shape"]),
                 "one_subject": share(hits[k]["one_subject"])} for k in SHAPES]
    by_chunk = [{"chunk": c, "one_subject": share(hits[c]["one_subject"]), "shape_right": share(hits[c]["shape"]),
                 "pattern_right": share(hits[c]["pattern"])} for c in range(chunks)]
    return {"by_pattern": by_pattern, "by_shape": by_shape, "by_chunk": by_chunk,
            "pattern": share([h for k in BACKGROUNDS for h in hits[k]["pattern"]]),
            "shape": share([h for k in SHAPES for h in hits[k]["shape"]]),
            "one_subject": share([h for k in SHAPES for h in hits[k]["one_subject"]])}


# (between steps, guidance scale, shift, guidance rescale) compared by the evaluation's sampler table
SAMPLER_VARIANTS = [("fresh", 1.0, 5.0, 0.0), ("ode", 1.0, 5.0, 0.0), ("ode", 3.0, 1.0, 0.0), ("ode", 3.0, 5.0, 0.0),
                    ("ode", 5.0, 5.0, 0.0), ("ode", 3.0, 5.0, 1.0), ("ode", 5.0, 5.0, 1.0)]


def sampler_variants(gen, prompts: list[str], chunks: int = 3,
                     variants: list[tuple[str, float, float, float]] | None = None, seed: int = 100) -> list[dict]:
    """Colour following and speed of the same weights under other sampler settings, side by side: Self-Forcing's
    fresh re-noising vs Euler (ODE) steps, classifier-free guidance scales, the time shift (1 spaces the four
    levels evenly, 1 .75 .5 .25; 5, Wan's and Self-Forcing's, spends them at high noise, 1 .94 .83 .63, where
    the subject's colour is decided) and the guidance rescale (which lets a high scale pull toward the prompt
    without over-saturating the chunks later chunks continue from). Variants are (between, guidance, shift,
    rescale); default SAMPLER_VARIANTS plus the shipped setting. `accuracy` covers all `chunks`, `first4` the
    first four (the issue's measure), `last` the final chunk (drift)."""
    import sys
    cfg = gen.sampler.config
    mine = (cfg.between_steps, cfg.guidance_scale, cfg.shift, cfg.guidance_rescale)
    if variants is None:
        variants = SAMPLER_VARIANTS + ([] if mine in SAMPLER_VARIANTS else [mine])
    rows = []
    for between, g, shift, rescale in variants:
        with sampler_settings(gen, between_steps=between, guidance_scale=g, shift=shift, guidance_rescale=rescale):
            t = time.perf_counter()
            per_prompt, accuracy = prompt_following(gen, prompts, chunks=chunks, seed=seed)
            wall = time.perf_counter() - t
        hits = np.array([r["hits"] for r in per_prompt], dtype=float)
        rows.append({"between_steps": between, "guidance": g, "shift": shift, "rescale": rescale,
                     "shipped": "yes" if (between, g, shift, rescale) == mine else "", "accuracy": accuracy,
                     "first4": float(hits[:, :4].mean()), "last": float(hits[:, -1].mean()),
                     "s_per_chunk": wall / (len(prompts) * chunks)})
        print(f"sampler {between} guidance {g:g} shift {shift:g} rescale {rescale:g}: {accuracy:.0%}",
              file=sys.stderr, flush=True)
    return rows


@contextmanager
def sampler_settings(gen, **changes):
    """The generator's sampler with `changes` to its config (SamplerConfig fields) for the block; the shipped one
    back afterwards, also when the block fails (sweeps compare settings on one loaded generator)."""
    from dataclasses import replace

    from packcache.sampler import FlowSampler
    shipped = gen.sampler
    gen.sampler = FlowSampler(replace(shipped.config, **changes))
    try:
        yield gen.sampler
    finally:
        gen.sampler = shipped


SAMPLER_COLUMNS = [("between_steps", "between steps", ""), ("guidance", "guidance", "g"), ("shift", "shift", "g"),
                   ("rescale", "rescale", "g"), ("first4", "prompt colour, chunks 1-4", ".0%"),
                   ("accuracy", "chunks 1-8", ".0%"), ("last", "chunk 8", ".0%"), ("s_per_chunk", "s/chunk", ".3f"),
                   ("shipped", "shipped", "")]


def realtime(gen, chunks: int = 12) -> list[dict]:
    rows = []
    for kind in ("packed", "window", "full"):
        s = gen.open(LONG_PROMPT, seed=0, cache=kind)
        s.next_chunk()   # warm-up chunk (first chunk: 9 frames, allocation)
        t = time.perf_counter()
        frames = 0
        for _ in range(chunks):
            frames += len(s.next_chunk())
        wall = time.perf_counter() - t
        s.close()
        rows.append({"cache": kind, "chunks": chunks, "frames": frames, "wall_s": wall,
                     "fps": frames / wall, "rtf": frames / gen.fps / wall, "s_per_chunk": wall / chunks})
    return rows


def prompt_following(gen, prompts: list[str], chunks: int = 4, seed: int = 100,
                     cache: str = "packed") -> tuple[list[dict], float]:
    rows = []
    hits = total = 0
    for i, prompt in enumerate(prompts):
        want = M.prompt_color(prompt)
        s = gen.open(prompt, seed=seed + i, cache=cache)
        got = [M.dominant_color(s.next_chunk()) for _ in range(chunks)]
        s.close()
        ok = sum(g == want for g in got)
        hits += ok
        total += chunks
        rows.append({"prompt": prompt, "want": want, "got": " ".join(str(g) for g in got), "match": f"{ok}/{chunks}",
                     "hits": [g == want for g in got]})
    return rows, hits / max(1, total)


def prompt_drift(gen, prompts: list[str], chunks: int = 8) -> list[dict]:
    """Prompt following by chunk index, past the 4 chunks the headline number covers: does the stream keep the
    prompt's colour, or drift away as its context fills with its own chunks? One row per cache kind."""
    rows = []
    for kind in ("packed", "window"):
        per_prompt, acc = prompt_following(gen, prompts, chunks=chunks, cache=kind)
        by_chunk = np.mean([r["hits"] for r in per_prompt], axis=0)
        rows.append({"cache": kind, "by_chunk": [float(v) for v in by_chunk], "all": acc})
    return rows


def prompt_switches(gen, pairs, before: int = 3, after: int = 4, transition: str = "cut") -> tuple[list[dict], float]:
    rows = []
    within = 0
    for i, (a, b) in enumerate(pairs):
        want_a, want_b = M.prompt_color(a), M.prompt_color(b)
        s = gen.open(a, seed=200 + i, cache="packed")
        pre = [M.dominant_color(s.next_chunk()) for _ in range(before)]
        s.set_prompt(b, transition=transition)
        post = [M.dominant_color(s.next_chunk()) for _ in range(after)]
        s.close()
        lag = next((k + 1 for k, c in enumerate(post) if c == want_b), None)
        stays = lag is not None and all(c == want_b for c in post[lag - 1:])
        within += int(lag is not None and lag <= 2)
        rows.append({"from": want_a, "to": want_b, "before": " ".join(map(str, pre)), "after": " ".join(map(str, post)),
                     "chunks_to_switch": lag if lag is not None else "never", "holds": stays})
    return rows, within / max(1, len(pairs))


def long_run(gen, kind: str, seconds: float, prompt: str = LONG_PROMPT, seed: int = 7) -> dict:
    s = gen.open(prompt, seed=seed, cache=kind)
    frames, kv, t = [], {}, time.perf_counter()
    chunk_walls = []
    while len(frames) < seconds * gen.fps:
        c0 = time.perf_counter()
        frames.extend(s.next_chunk())
        chunk_walls.append(time.perf_counter() - c0)
        st = s.stats()
        kv[st["chunk_index"]] = (st.get("kv_bytes", 0), st.get("attended_tokens", 0))
    wall = time.perf_counter() - t
    s.close()
    frames = np.stack(frames)
    n = max(kv)
    return {"kind": kind, "frames": frames, "wall_s": wall, "kv": kv, "chunks": n,
            "chunk_s_first10": float(np.mean(chunk_walls[1:11])), "chunk_s_last10": float(np.mean(chunk_walls[-10:]))}


def save_strip(runs: list[dict], path: Path, every_s: float = 10.0, fps: int = 16, scale: int = 2):
    from PIL import Image
    rows = []
    for r in runs:
        fr = r["frames"]
        idx = list(range(0, len(fr), int(every_s * fps)))
        row = np.concatenate([np.pad(fr[i], ((2, 2), (2, 2), (0, 0)), constant_values=255) for i in idx], axis=1)
        rows.append(row)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    img = Image.fromarray(np.concatenate(rows, axis=0))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


STAGES = ("vae", "sampler", "rt", "prompts", "switch", "scene", "long")
# the headings each stage's sections start with in RESULTS.md (for --merge)
_STAGE_HEADINGS = {"## VAE alone": "vae", "## Sampler variants": "sampler", "## Real time": "rt",
                   "## Prompt following": "prompts", "## Prompt switch": "switch", "## What the stream shows": "scene",
                   "## The scene readers": "scene", "## Extrapolation": "long"}
SCENE_MEASURES = {"one_subject": "one subject", "shape": "shape", "bg_color": "bg colour", "pattern": "pattern",
                  "motion": "motion"}


def split_sections(text: str) -> dict[str, str]:
    """RESULTS.md cut into its stages' sections (each from its first "## " heading to the next stage's)."""
    out: dict[str, list[str]] = {}
    stage = None
    for line in text.splitlines():
        if line.startswith("## "):
            stage = next((v for k, v in _STAGE_HEADINGS.items() if line.startswith(k)), stage)
        if stage is not None:
            out.setdefault(stage, []).append(line)
    return {k: "\n".join(v) + "\n" for k, v in out.items()}


def join_sections(header: str, sections: dict[str, str]) -> str:
    """RESULTS.md from its header and stage sections: one blank line between sections, however often the file
    has been merged into (a merge used to add one each time)."""
    parts = [header.rstrip()] + [v.rstrip() for v in sections.values() if v.strip()]
    return "\n\n".join(parts) + "\n"


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    return str(x)


def long_scene(frames: np.ndarray, prompt: str = LONG_PROMPT, window_s: float = 10.0, first: int = 9,
               per_chunk: int = 12) -> dict:
    """The scene readers over a long stream, chunk by chunk (the first chunk has `first` frames), against what
    `prompt` asks for: per window of `window_s` seconds and the first, last and mean window."""
    from .scene_eval import read_chunks
    bounds = [0, first] + list(range(first + per_chunk, len(frames) + 1, per_chunk))
    chunks = [frames[a:b] for a, b in zip(bounds, bounds[1:])]
    want = M.prompt_scene(prompt)
    per = int(window_s * 16 / per_chunk)
    windows = []
    for a in range(0, len(chunks), per):
        r = read_chunks(chunks[a:a + per], want)
        if not r["motion_hits"]:
            continue
        windows.append({"t0_s": sum(len(c) for c in chunks[:a]) / 16, "one_subject": r["one_subject_frames"],
                        **{k: float(np.mean(r["hits"][k])) for k in ("shape", "bg_color", "pattern")},
                        "motion": float(np.mean(r["motion_hits"]))})
    out = {"windows": windows}
    for name, sel in (("first", windows[:1]), ("last", windows[-1:]), ("mean", windows)):
        out[name] = {m: float(np.mean([w[m] for w in sel])) for m in SCENE_MEASURES}
    return out


def invocation(argv: list[str] | None) -> str:
    """The command as typed (from the shell when `argv` is None), so a report says which weights and stages made
    it: reports of candidate bundles (`--weights`) are otherwise indistinguishable from the shipped one's."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m toyworld.evaluate", *map(shlex.quote, args)])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate the toy world model (tables in toyworld/eval/RESULTS.md)")
    ap.add_argument("--weights", default=None, help="a bundle .safetensors (default: the shipped toy weights)")
    ap.add_argument("--out", type=Path, default=HERE / "eval")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=120.0, help="length of the extrapolation runs")
    ap.add_argument("--full-seconds", type=float, default=None, help="length for the full cache (default: --seconds)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="vae,sampler,rt,prompts,switch,scene,long",
                    help="stages to run; with --merge the others' sections stay as they are in the existing files")
    ap.add_argument("--merge", action="store_true",
                    help="update only the stages run in the existing RESULTS.md and results.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    gen = load_generator(args.weights)
    prompts, unseen, pairs = PROMPTS, UNSEEN_PROMPTS, SWITCHES
    seconds = args.seconds
    if args.quick:
        prompts, unseen, pairs, seconds = PROMPTS[::4], UNSEEN_PROMPTS[::4], SWITCHES[:3], min(seconds, 30.0)
    marks: dict[str, int] = {}
    results: dict = {"threads": args.threads, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    sc = gen.preset.sampler
    md = [f"# Toy world evaluation\n\n`{invocation(argv)}` on {os.cpu_count()} CPU "
          f"cores, torch threads {args.threads}. Sampler: {len(sc.timesteps)} steps, shift {sc.shift:g}, "
          f"{sc.between_steps} steps between levels, guidance {sc.guidance_scale:g} rescaled "
          f"{sc.guidance_rescale:g}; compressor "
          f"{gen.preset.compressor.mode}.\n"]

    if "vae" in only:
        marks["vae"] = len(md)
        rows = vae_roundtrip(gen)
        ok = sum(r["color"] == r["decoded"] for r in rows)
        results["vae_roundtrip"] = rows
        md += [f"## VAE alone: encode + decode keeps the colour for {ok}/{len(rows)} colours\n",
               md_table(rows, [("color", "colour", ""), ("decoded", "decoded as", ""), ("l1", "mean |error|", ".3f")]),
               ""]
        print(md[-2], flush=True)
        rows = vae_ceiling(gen)
        share = sum(r["kept"] for r in rows) / max(1, sum(r["clips"] for r in rows))
        results["vae_ceiling"] = {"rows": rows, "share": share}
        md += [f"## VAE alone on varied clips, by chunk index: the colour survives encode + decode in {share:.0%} "
               f"of chunks (a ceiling on prompt following)\n",
               md_table(rows, [("chunk", "chunk", "d"), ("kept", "kept", "d"), ("clips", "clips", "d"),
                               ("share", "share", ".0%")]), ""]
        print(md[-2], flush=True)
        ceil = vae_scene_ceiling(gen)
        results["vae_scene_ceiling"] = ceil
        md += [f"## VAE alone on the world's scenes: the scene readers see one subject in {ceil['one_subject']:.0%}"
               f" of frames, the shape in {ceil['shape']:.0%} and the pattern in {ceil['pattern']:.0%} of chunks "
               f"(a ceiling on the scene measures)\n",
               "Rendered one-subject clips of the shipped world (every pattern x shape, 2 clips each, 6 chunks), "
               "encoded chunk by chunk (as the DiT's training latents are) and decoded by one stream decoder by the "
               "VAE alone, read as the stream's chunks are. Luma spread: the background's robust spread (0-255), "
               f"which reads plain below {M.PATTERN_FLAT_STD:g}, and below {M.PATTERN_TEXTURE_STD:g} where no "
               "pattern's template fits (toyworld/metrics.py).\n",
               md_table(ceil["by_pattern"], [("pattern", "background", ""), ("chunks", "chunks", "d"),
                                             ("pattern_right", "pattern read right", ".0%"),
                                             ("one_subject", "one subject (frames)", ".0%"),
                                             ("spread_median", "luma spread, median", ".1f"),
                                             ("spread_max", "luma spread, max", ".1f")]), "",
               md_table(ceil["by_shape"], [("shape", "shape", ""), ("chunks", "chunks", "d"),
                                           ("shape_right", "shape read right", ".0%"),
                                           ("one_subject", "one subject (frames)", ".0%")]), "",
               md_table(ceil["by_chunk"], [("chunk", "chunk", "d"), ("one_subject", "one subject (frames)", ".0%"),
                                           ("shape_right", "shape read right", ".0%"),
                                           ("pattern_right", "pattern read right", ".0%")]), ""]
        print(md[-6], md[-4], md[-2], flush=True)

    if "sampler" in only:
        marks["sampler"] = len(md)
        rows = sampler_variants(gen, prompts, chunks=8)
        results["sampler_variants"] = rows
        md += [f"## Sampler variants, same weights ({len(prompts)} prompts x 8 chunks, packed cache)\n",
               md_table(rows, SAMPLER_COLUMNS), ""]
        print(md[-2], flush=True)

    if "rt" in only:
        marks["rt"] = len(md)
        rows = realtime(gen)
        results["realtime"] = rows
        md += ["## Real time (64x64, 16 FPS; chunk = 12 frames)\n",
               md_table(rows, [("cache", "cache", ""), ("fps", "frames/s", ".1f"), ("rtf", "real-time factor", ".2f"),
                               ("s_per_chunk", "s/chunk", ".3f")]), ""]
        print(md[-2], flush=True)

    if "prompts" in only:
        marks["prompts"] = len(md)
        cols = [("prompt", "prompt", ""), ("want", "colour", ""), ("got", "per-chunk dominant", ""), ("match", "match", "")]
        rows, acc = prompt_following(gen, prompts)
        results["prompt_following"] = {"rows": rows, "accuracy": acc}
        md += [f"## Prompt following: dominant colour = prompt colour in **{acc:.0%}** of chunks "
               f"({len(prompts)} prompts x 4 chunks, packed cache)\n", md_table(rows, cols), ""]
        print(md[-3], flush=True)
        rows, acc = prompt_following(gen, unseen, seed=300)
        results["unseen_words"] = {"rows": rows, "accuracy": acc}
        md += [f"### Words training never saw: prompt colour in **{acc:.0%}** of chunks ({len(unseen)} prompts)\n",
               md_table(rows, cols), ""]
        print(md[-3], flush=True)
        rows = prompt_drift(gen, prompts)
        results["prompt_drift"] = rows
        n = len(rows[0]["by_chunk"])
        table = [{"cache": r["cache"], "all": r["all"], **{f"chunk {k}": v for k, v in enumerate(r["by_chunk"])}}
                 for r in rows]
        md += [f"### By chunk index: prompt colour over {n} chunks ({len(prompts)} prompts; chunk 0 is 9 frames, "
               "the others 12)\n",
               md_table(table, [("cache", "cache", "")] + [(f"chunk {k}", f"chunk {k}", ".0%") for k in range(n)]
                        + [("all", "all", ".0%")]), ""]
        print(md[-2], flush=True)

    if "switch" in only:
        marks["switch"] = len(md)
        results["prompt_switch"] = {}
        for transition in ("cut", "recache"):   # the two a viewer's typed prompt can ask for without blending
            rows, rate = prompt_switches(gen, pairs, transition=transition)
            results["prompt_switch"][transition] = {"rows": rows, "within_2_chunks": rate}
            md += [f"## Prompt switch (`{transition}`): new colour dominant within 2 chunks in **{rate:.0%}** of "
                   f"switches\n",
                   md_table(rows, [("from", "from", ""), ("to", "to", ""), ("before", "3 chunks before", ""),
                                   ("after", "4 chunks after", ""), ("chunks_to_switch", "chunks to switch", ""),
                                   ("holds", "holds", "")]), ""]
            print(md[-3], flush=True)

    if "scene" in only:
        marks["scene"] = len(md)
        from . import scene_check, scene_eval
        res = scene_eval.evaluate_scenes(gen, args.out, quick=args.quick)
        check = scene_check.check_all(quick=args.quick)
        results["scene"] = {"sets": {k: v["summary"] for k, v in res["sets"].items()},
                            "families": {k: v["summary"] for k, v in res["families"].items()},
                            "runs": {k: [{x: r[x] for x in ("prompt", "want", "chunks", "motions")} for r in v["runs"]]
                                     for k, v in {**res["sets"], **res["families"]}.items()},
                            "readers_on_renders": check}
        md += scene_eval.report_md(res, md_table) + scene_check.report_md(check)
        print("\n".join(md[marks["scene"]:marks["scene"] + 4]), flush=True)

    if "long" in only:
        marks["long"] = len(md)
        runs, summary = [], []
        for kind in ("packed", "window", "full"):
            secs = seconds if kind != "full" or args.full_seconds is None else args.full_seconds
            r = long_run(gen, kind, secs)
            r["windows"] = M.window_report(r["frames"], window_s=10.0)
            r["scene"] = long_scene(r["frames"])
            runs.append(r)
            kv10 = r["kv"].get(10, (0, 0))
            kvn = r["kv"][r["chunks"]]
            w = r["windows"]
            summary.append({
                "cache": kind, "seconds": len(r["frames"]) / 16, "wall_s": r["wall_s"],
                "subject_first10": w[0]["subject_consistency"], "subject_last": w[-1]["subject_consistency"],
                "subject_mean": float(np.mean([x["subject_consistency"] for x in w])),
                "bg_mean": float(np.mean([x["background_stability"] for x in w])),
                "motion_first": w[0]["motion_px_s"], "motion_last": w[-1]["motion_px_s"],
                "dyn_mean": float(np.mean([x["dynamic_degree"] for x in w])),
                "kv10": kv10[0] / 1024, "kvn": kvn[0] / 1024, "tok10": kv10[1], "tokn": kvn[1],
                "chunk_s_first10": r["chunk_s_first10"], "chunk_s_last10": r["chunk_s_last10"],
            })
            print(kind, summary[-1], flush=True)
        save_strip(runs, args.out / "extrapolation_strip.png")
        results["long"] = {"summary": summary, "windows": {r["kind"]: r["windows"] for r in runs}}
        md += [f"## Extrapolation: {seconds:.0f} s (24x the 5 s training clips), prompt \"{LONG_PROMPT}\"\n",
               "Subject consistency = mean of colour and shape agreement with the first second; background "
               "stability = 1 - mean |bg pixel difference| vs frame 0; motion = subject centroid speed (px/s, "
               "frame 64 px); dynamic degree = share of 1 s windows where the subject moves > 3 px/s. Strip: "
               "`eval/extrapolation_strip.png` (rows packed, window, full; one frame every 10 s).\n",
               md_table(summary, [("cache", "cache", ""), ("seconds", "video s", ".0f"),
                                  ("subject_first10", "subject 0-10 s", ".2f"), ("subject_last", "subject last 10 s", ".2f"),
                                  ("subject_mean", "subject mean", ".2f"), ("bg_mean", "background", ".3f"),
                                  ("motion_first", "motion 0-10 s", ".1f"), ("motion_last", "motion last 10 s", ".1f"),
                                  ("dyn_mean", "dynamic degree", ".2f"), ("kv10", "KV KiB @chunk 10", ".0f"),
                                  ("kvn", "KV KiB @last", ".0f"), ("tokn", "attended tokens @last", ""),
                                  ("chunk_s_first10", "s/chunk early", ".3f"), ("chunk_s_last10", "s/chunk late", ".3f")]),
               ""]
        scene_rows = [{"cache": r["kind"], **{f"{m}_{w}": r["scene"][w][m] for m in SCENE_MEASURES
                                              for w in ("first", "last", "mean")}} for r in runs]
        results["long"]["scene"] = {r["kind"]: r["scene"] for r in runs}
        md += ["### What the 120 s streams show besides colour (per chunk; motion per 4 chunks): first 10 s, "
               "last 10 s, mean over all windows\n",
               md_table(scene_rows, [("cache", "cache", "")] + [
                   (f"{m}_{w}", f"{SCENE_MEASURES[m]} {w}", ".0%") for m in SCENE_MEASURES
                   for w in ("first", "last", "mean")]), ""]
        for r in runs:
            md += [f"### {r['kind']}: per 10 s window\n",
                   md_table(r["windows"], [("t0_s", "from s", ".0f"), ("subject_consistency", "subject", ".2f"),
                                           ("color_consistency", "colour", ".2f"), ("shape_consistency", "shape", ".2f"),
                                           ("background_stability", "background", ".3f"),
                                           ("motion_px_s", "motion px/s", ".1f"), ("dynamic_degree", "dynamic", ".2f"),
                                           ("visible", "subject visible", ".2f")]), ""]
        print("\n".join(md[-8:]), flush=True)

    sections = {stage: "\n".join(md[a:b]) for stage, a, b in
                zip(marks, marks.values(), list(marks.values())[1:] + [len(md)])}
    header = "\n".join(md[:min(marks.values(), default=len(md))])
    if args.merge and (args.out / "RESULTS.md").is_file():
        old = split_sections((args.out / "RESULTS.md").read_text())
        sections = {k: sections.get(k, old.get(k)) for k in STAGES if k in sections or k in old}
        if (args.out / "results.json").is_file():
            results = {**json.loads((args.out / "results.json").read_text()), **results}
        header = header.rstrip() + f" Merged into the previous results: only stages {', '.join(marks)} were rerun.\n"
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=_jsonable))
    (args.out / "RESULTS.md").write_text(join_sections(header, sections))
    print(f"wrote {args.out / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
