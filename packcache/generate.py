"""Generate a video file from the command line.

    python -m packcache.generate --preset toy --seconds 60 --prompt "a red circle bouncing" --out video.mp4
    python -m packcache.generate --preset tiny --seconds 10 --prompt "a cat" --switch 5:"a dog":recache --out v.mp4
    python -m packcache.generate --model-dir Wan2.1-T2V-1.3B-Diffusers --checkpoint self_forcing_dmd.pt ...
    python -m packcache.generate --preset toy --start picture.png --seconds 30 --out video.mp4   # prompt optional

Shows a progress bar per chunk; every user mistake ends in one line on stderr and exit code 2, never a traceback.
With --pipeline (the default) chunk k+1 is submitted before chunk k's frames are written: its denoising runs here
while chunk k decodes on the engine's side worker (`GenerationSession.submit_chunk`); the frames are the same
(`Mp4Writer` says why the file's bytes may still differ).
"""

from __future__ import annotations

import argparse
import collections
import logging
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .checks import check_checkpoint, check_device, check_model_dir
from .errors import PackCacheError, StartFramesError
from .prompts import validate_prompt
from .threads import check_threads, default_threads, pipeline_threads, set_threads

log = logging.getLogger("packcache.generate")


@dataclass
class PromptSwitch:
    at_seconds: float
    text: str
    transition: str = "cut"


def parse_switch(spec: str) -> PromptSwitch:
    """'SECONDS:PROMPT[:TRANSITION]' -> PromptSwitch."""
    head, sep, rest = spec.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"--switch {spec!r}: expected SECONDS:PROMPT[:cut|recache|blend]")
    try:
        at = float(head)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--switch {spec!r}: {head!r} is not a number of seconds") from None
    text, transition = rest, "cut"
    head, sep, last = rest.rpartition(":")
    if sep and last in ("cut", "recache", "blend"):
        text, transition = head, last
    elif sep and re.fullmatch(r"[A-Za-z_-]+", last.strip()):
        # 'SECONDS:PROMPT:wobble' is a mistyped transition far more often than a prompt ending in ':word'
        raise argparse.ArgumentTypeError(
            f"--switch {spec!r}: unknown transition {last!r} (cut, recache or blend); to keep a ':' in the "
            "prompt, end the switch with ':cut'")
    try:
        text = validate_prompt(text)
    except PackCacheError as exc:
        raise argparse.ArgumentTypeError(f"--switch {spec!r}: {exc}") from None
    return PromptSwitch(at, text, transition)


VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi")


def load_start(path: str | Path, max_frames: int = 237):
    """A picture (Pillow: PNG, JPEG, WebP...) or a clip (av: its last `max_frames` frames, the ones the video
    continues from; 237 = 20 chunks of 3 latents, packcache.start.MAX_START_CHUNKS) -> uint8 (T, H, W, 3)."""
    from collections import deque

    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise StartFramesError(f"--start {path}: no such file")
    if path.suffix.lower() in VIDEO_SUFFIXES:
        import av
        try:
            with av.open(str(path)) as container:
                frames: deque = deque(maxlen=max_frames)
                for frame in container.decode(video=0):
                    frames.append(frame.to_ndarray(format="rgb24"))
        except (av.FFmpegError, ValueError) as e:
            raise StartFramesError(f"--start {path.name}: cannot read the video ({e})") from None
        if not frames:
            raise StartFramesError(f"--start {path.name}: the video has no frames")
        log.info("--start %s: %d frames", path.name, len(frames))
        return np.stack(list(frames))
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=np.uint8)[None]
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise StartFramesError(f"--start {path.name}: not a picture Pillow can read ({e})") from None


class Mp4Writer:
    """An H.264 (yuv420p, playable everywhere) .mp4 file written frame by frame.

    The frames are reproducible (same seed, same frames, pipeline on or off); the file's bytes are not always:
    PyAV's bundled libx264 has been seen to encode the same frames into slightly different first packets within a
    long-lived process that ran torch before (tests/test_pipeline_server.py compares the frames handed to `write`).
    """

    def __init__(self, path: Path, fps: int, width: int, height: int):
        import av

        self._av = av
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.options = {"crf": "18", "preset": "veryfast"}

    def write(self, frame) -> None:
        """One uint8 (H, W, 3) RGB frame."""
        for packet in self.stream.encode(self._av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self.container.mux(packet)

    def finish(self) -> None:
        """Flush the encoder's delayed frames into the file (call once, after the last frame)."""
        for packet in self.stream.encode():
            self.container.mux(packet)

    def close(self) -> None:
        self.container.close()


def build_generator(args):
    import torch

    from .generator import Generator

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}[args.dtype]
    if args.model_dir:
        return Generator.from_pretrained(args.model_dir, args.checkpoint, preset=args.preset or "wan2.1-t2v-1.3b",
                                         device=args.device, dtype=dtype, compression=args.compression)
    if args.checkpoint:
        raise PackCacheError("--checkpoint needs --model-dir (the diffusers folder with the VAE and text encoder)")
    return Generator.from_preset(args.preset or default_preset(), device=args.device, dtype=dtype,
                                 compression=args.compression)


def default_preset() -> str:
    from .generator import shipped_weights_path
    from .presets import PRESETS

    if "toy" in PRESETS and PRESETS["toy"].weights:
        try:
            shipped_weights_path(PRESETS["toy"].weights)
            return "toy"
        except PackCacheError:
            log.warning("toy weights not shipped; falling back to the random tiny preset")
    return "tiny"


def run(args) -> Path:
    import av  # noqa: F401 - before building the model: fail early if missing
    from tqdm import tqdm

    out = check_args(args)
    denoise_threads, finish_threads = pipeline_threads(args.threads, args.pipeline)
    set_threads(denoise_threads)
    start_frames = load_start(args.start) if args.start else None   # a bad file fails before the model loads
    gen = build_generator(args)
    gen.finisher.set_threads(finish_threads)
    if args.decoder != "wan":
        gen.use_decoder(args.decoder, args.decoder_weights)
    p = gen.preset
    frames_needed = math.ceil(args.seconds * p.fps)
    switches = sorted(args.switch or [], key=lambda s: s.at_seconds)
    session = gen.open(args.prompt, seed=args.seed, cache=args.cache, start=start_frames)
    writer = Mp4Writer(out, p.fps, p.width, p.height)

    written = produced = 0                       # frames in the file / of the chunks submitted so far
    ahead = 1 if args.pipeline else 0            # chunks submitted beyond the one being written
    submitted: collections.deque = collections.deque()
    start = time.perf_counter()
    try:
        with tqdm(total=frames_needed, unit="frame", desc=f"{p.name} {args.cache}", file=sys.stderr) as bar:
            while written < frames_needed:
                while len(submitted) <= ahead and produced < frames_needed:
                    while switches and switches[0].at_seconds * p.fps <= produced:
                        s = switches.pop(0)
                        idx = session.set_prompt(s.text, transition=s.transition)
                        log.info("prompt -> %r (%s) from chunk %d", s.text, s.transition, idx)
                    submitted.append(session.submit_chunk())   # returns once denoised and committed
                    produced = session.stats()["frames"]
                frames = submitted.popleft().result()
                for frame in frames[: frames_needed - written]:
                    writer.write(frame)
                    written += 1
                    bar.update(1)
                st = session.stats()
                bar.set_postfix(chunk=st["chunk_index"], rtf=f"{st['realtime_factor']:.2f}",
                                kv=f"{st['kv_bytes'] / 2**20:.1f}MiB")
        writer.finish()
    finally:
        writer.close()
        session.close()
        gen.close()
    elapsed = time.perf_counter() - start
    print(f"wrote {out} ({written} frames, {written / p.fps:.1f} s of video in {elapsed:.1f} s, "
          f"real-time factor {written / p.fps / elapsed:.2f})")
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):                    # one clear line, no usage dump (as run_server.py)
        self.exit(2, f"error: {message} (see --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):          # "(default: X)" unless the help already says it or X is None
        if "default:" in (action.help or "") or action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def check_args(args) -> Path:
    """Every check that needs no model, before loading one: each mistake is one line (PackCacheError)."""
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise PackCacheError(f"--out must end in .mp4, got {out.name}")
    if not out.parent.is_dir():
        raise PackCacheError(f"--out {out}: the directory {out.parent} does not exist")
    if not math.isfinite(args.seconds) or args.seconds <= 0:
        raise PackCacheError("--seconds must be a positive number")
    validate_prompt(args.prompt, allow_empty=bool(args.start))
    for s in args.switch or []:
        if not 0 <= s.at_seconds < args.seconds:
            raise PackCacheError(f"--switch at {s.at_seconds:g} s is outside the video (0 to {args.seconds:g} s; "
                                 "see --seconds)")
    try:
        check_threads(args.threads)
    except ValueError as exc:
        raise PackCacheError(str(exc)) from None
    if args.model_dir:
        check_model_dir(args.model_dir)
        check_checkpoint(args.checkpoint)
    elif args.checkpoint:
        raise PackCacheError("--checkpoint needs --model-dir (the diffusers folder with the VAE and text encoder)")
    check_device(args.device)
    if args.decoder == "taehv" and not args.decoder_weights:
        raise PackCacheError("--decoder taehv needs --decoder-weights FILE (taew2_1.pth, downloaded yourself)")
    if args.decoder_weights and not Path(args.decoder_weights).is_file():
        raise PackCacheError(f"--decoder-weights {args.decoder_weights}: no such file")
    return out


def make_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m packcache.generate", description="Generate a video file.",
                 formatter_class=_Formatter)
    ap.add_argument("--preset", help="named preset (default: toy when shipped, else tiny); see packcache.presets")
    ap.add_argument("--model-dir", help="diffusers-format Wan2.1-T2V folder (real weights)")
    ap.add_argument("--checkpoint", help="Self-Forcing-style generator checkpoint (.pt/.safetensors)")
    ap.add_argument("--prompt", default="", help="what to generate (may be empty with --start)")
    ap.add_argument("--start", metavar="PATH",
                    help="start from a picture (PNG, JPEG, WebP) or a clip (.mp4, .webm...): fitted to the preset's "
                         "size (scale to cover, centre crop) and used as the first context; the video continues "
                         "from it (the picture itself is not in the file)")
    ap.add_argument("--switch", action="append", type=parse_switch, metavar="SECONDS:PROMPT[:TRANSITION]",
                    help="change the prompt at a time; repeatable")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the video")
    ap.add_argument("--seed", type=int, default=0, help="noise seed")
    ap.add_argument("--cache", choices=("packed", "window", "full"), default="packed", help="KV cache policy")
    ap.add_argument("--compression", choices=("hr+lr", "hr", "lr", "pool"), help="override the mid compressor")
    ap.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--decoder", choices=("wan", "taehv"), default="wan",
                    help="frame decoder: the full Wan VAE, or a TAEHV tiny streaming decoder (needs --decoder-weights)")
    ap.add_argument("--decoder-weights", metavar="FILE",
                    help="TAEHV checkpoint in the taew2_1 layout (taew2_1.pth, lighttaew2_1.safetensors; "
                         "a user download)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--out", default="video.mp4", help="output file (.mp4; its directory must exist)")
    ap.add_argument("--threads", type=int, default=None,
                    help=f"torch CPU threads (default: cores - 1, at least 1, or $OMP_NUM_THREADS: here "
                         f"{default_threads()}; all cores make OpenMP spin-wait on a shared machine, see "
                         "packcache/threads.py; 0: torch's default)")
    ap.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                    help="decode off the critical path: chunk k decodes on a side thread while chunk k+1 denoises "
                         "(same frames; --threads is then split between the two, at least one each). Default: on: "
                         "20-40%% faster on a busy CPU, about 10%% slower on an idle one (README, CPU threads)")
    ap.add_argument("--log-level", default="WARNING", help="logging level")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        run(args)
    except PackCacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # unwritable --out, full disk: a user's problem, not a bug
        print(f"error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug, but still one line (--log-level DEBUG shows the traceback)
        log.debug("fatal", exc_info=True)
        print(f"error: {type(e).__name__}: {e} (--log-level DEBUG shows where)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
