#!/usr/bin/env python3
"""Start the live streaming server: python run_server.py, then open the printed URL in a browser.

The server listens at once (so /healthz answers "starting" while the model loads), builds the model on its
device worker, generates one throwaway chunk (warm-up), and only then accepts viewers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):                    # one clear line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):              # "(default: X)" unless the help already says it
        if "default:" in (action.help or "") or action.default is None or action.default is False \
                or action.default == []:                 # identity: 0 and 0.0 are defaults worth showing
            return action.help
        return super()._get_help_string(action)


def _default_preset() -> str:
    from packcache import PRESETS
    return "toy" if "toy" in PRESETS else "tiny"


def _sessions_arg(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from streamer.config import DEFAULT_PROMPT, ServerConfig
    from streamer.protocol import Limits

    d, lim = ServerConfig(), Limits()
    p = _Parser(prog="run_server.py", description="Live AI video streaming server (PackForcing packed KV cache).",
                formatter_class=_Formatter)
    g = p.add_argument_group("network")
    g.add_argument("--host", default=d.host, help="address to listen on (0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=d.port, help="HTTP + websocket port")
    g.add_argument("--token", default=os.environ.get("PACKFORCING_TOKEN"),
                   help="require this token from clients (?token= or Authorization: Bearer); never printed; "
                        "prefer $PACKFORCING_TOKEN or --token-file (a command line is visible to every local "
                        "user); default: $PACKFORCING_TOKEN, else none")
    g.add_argument("--token-file", default=None, metavar="FILE",
                   help="read the token from this file's first line (instead of --token)")
    g.add_argument("--metrics-need-token", action="store_true",
                   help="/metrics asks for the token too (/healthz stays open for load balancers)")
    g.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow pages from this origin (e.g. https://example.com) to connect; repeatable; "
                        "'*' allows any; default: only the addresses the server listens on (scheme, host and "
                        "port compared)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=None,
                   help="model preset (default: 'toy' if installed, else 'tiny'); with --model-dir: the "
                        "architecture of the weights")
    g.add_argument("--model-dir", default=None, help="diffusers-format Wan2.1 folder (real weights)")
    g.add_argument("--checkpoint", default=None, help="Self-Forcing generator checkpoint (with --model-dir)")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu… (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: bfloat16 on cuda, float32 on cpu)")
    g.add_argument("--threads", "--cpu-threads", dest="cpu_threads", type=int, default=None, metavar="N",
                   help="torch CPU threads for generation (default: cores - 1, at least 1, or $OMP_NUM_THREADS: "
                        "with every core busy OpenMP spin-waits and chunks get 10-20x slower; see "
                        "packcache/threads.py; 0: torch's default)")
    g.add_argument("--cache", default=d.cache, choices=["packed", "window", "full"], help="KV cache policy")
    g.add_argument("--decoder", default="wan", choices=["wan", "taehv"],
                   help="frame decoder: the full Wan VAE, or a TAEHV tiny streaming decoder (fast; needs "
                        "--decoder-weights)")
    g.add_argument("--decoder-weights", default=None, metavar="FILE",
                   help="TAEHV checkpoint in the taew2_1 layout (taew2_1.pth or lighttaew2_1.safetensors, a user "
                        "download)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the transformer blocks (and a TAEHV decoder) during warm-up, before the "
                        "server says ready; default: on for cuda, off for cpu (inductor's C++ build takes minutes "
                        "there and gains little for the small CPU models)")
    g.add_argument("--attention", default="auto", choices=["auto", "fa3", "cudnn", "flash", "sdpa"],
                   help="attention kernel; auto picks FlashAttention-3 or cuDNN on Hopper GPUs, else PyTorch SDPA "
                        "(the choice is logged)")
    g = p.add_argument_group("sessions")
    g.add_argument("--max-sessions", type=_sessions_arg, default=d.max_sessions,
                   help="concurrent sessions; one more client gets 'busy'. 'auto': as many as the device memory "
                        "holds (one session's cache + activations, measured at startup and logged)")
    g.add_argument("--max-batch", type=int, default=None,
                   help="most sessions advanced together in one batched device step (default: every session "
                        "whose next chunk is due; 1: one session at a time)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt a new session starts with")
    g.add_argument("--seed", type=int, default=d.default_seed, help="seed a new session starts with")
    g.add_argument("--chunks-ahead", type=int, default=d.chunks_ahead,
                   help="chunks generated ahead of playback (bounded buffer)")
    g.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=d.pipeline,
                   help="decode off the critical path: each chunk's decode (and compressed K/V backup) runs on a "
                        "side thread (its own CUDA stream on a GPU) while the next chunk denoises; same frames. "
                        "Default: on: on a GPU the finish is device work on its own stream, and on a busy CPU it "
                        "measured 20-40%% faster (about 10%% slower on an idle one, see the README's CPU threads); "
                        "--no-pipeline runs each chunk start to end on the device worker")
    g.add_argument("--idle-timeout", type=float, default=lim.idle_timeout,
                   help="seconds a session survives with no video connection and no message")
    g.add_argument("--reconnect-grace", type=float, default=d.reconnect_grace,
                   help="seconds a session outlives a dropped websocket so the viewer can resume it "
                        "(same stream, same cache); 0 ends it at once")
    g.add_argument("--state-dir", default=None, metavar="DIR",
                   help="on shutdown (SIGTERM/SIGINT) save every live session here and restore them on the next "
                        "start: a viewer resuming within --reconnect-grace continues its stream (needs "
                        "--reconnect-grace > 0)")
    g.add_argument("--ping-interval", type=float, default=d.ping_interval, help="websocket keepalive ping (s)")
    g.add_argument("--ping-timeout", type=float, default=d.ping_timeout,
                   help="drop a client whose pong is this late (s)")
    g.add_argument("--record-dir", default=d.record_dir,
                   help="where 'record' writes MP4 files; '' disables server-side recording")
    g.add_argument("--record-all", action="store_true", help="record every session from its start")
    g = p.add_argument_group("cluster (needs Ray: pip install -e '.[cluster]'; see the README's operator section)")
    g.add_argument("--cluster", choices=["ray"], default=None,
                   help="serve through a front door on --port that admits each client to one of --workers Ray "
                        "worker actors (each owns one device; --max-sessions is per worker)")
    g.add_argument("--workers", type=int, default=2, help="worker actors to start (with --cluster)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster ('auto', HOST:6379 or ray://HOST:10001); default: start a local one")
    g.add_argument("--worker-gpus", type=float, default=None,
                   help="GPUs per worker (default: 1 if the Ray cluster has GPUs, else 0: CPU workers)")
    g.add_argument("--worker-cpus", type=float, default=1.0,
                   help="CPUs per worker (Ray reservation; also the torch threads of CPU workers)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log detail (debug also shows aiortc/websockets and tracebacks)")
    return p


def config_from_args(args):
    from dataclasses import replace

    from streamer.config import ServerConfig
    from streamer.protocol import Limits

    return ServerConfig(
        host=args.host, port=args.port, max_sessions=args.max_sessions, max_batch=args.max_batch, token=args.token,
        metrics_need_token=args.metrics_need_token,
        allowed_origins=tuple(args.allowed_origin), default_prompt=args.prompt, default_seed=args.seed,
        cache=args.cache, cpu_threads=args.cpu_threads, chunks_ahead=args.chunks_ahead, pipeline=args.pipeline,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout, reconnect_grace=args.reconnect_grace, state_dir=args.state_dir,
        record_dir=args.record_dir or None, record_all=args.record_all,
        limits=replace(Limits(), idle_timeout=args.idle_timeout))


def read_token(args) -> None:
    """--token-file -> args.token (one line; surrounding whitespace dropped)."""
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                args.token = f.readline().strip()
        except OSError as exc:
            raise SystemExit(f"run_server.py: error: --token-file {args.token_file}: {exc.strerror or exc}")
        if not args.token:
            raise SystemExit(f"run_server.py: error: --token-file {args.token_file} is empty")


def preflight(args, config) -> None:
    """Everything that can be checked before a model loads, each failing in one line (SystemExit): the port is
    free, the device exists, the model folder is complete. Seconds, not a model load."""
    import socket

    from packcache import PackCacheError
    from packcache.checks import check_checkpoint, check_device, check_model_dir

    if config.port:
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server binds (TIME_WAIT ok)
                s.bind((config.host, config.port))
        except OSError as exc:
            raise SystemExit(f"run_server.py: error: cannot listen on {config.host}:{config.port}: "
                             f"{exc.strerror or exc}")
    try:
        if args.model_dir:
            check_model_dir(args.model_dir)
            check_checkpoint(args.checkpoint)
        check_device(args.device)
    except PackCacheError as exc:
        raise SystemExit(f"run_server.py: error: {exc}")


def generator_factory(args):
    """What the device worker calls to build the model. Arguments are checked here (before torch is imported)."""
    from packcache import get_preset

    if args.model_dir:
        if not os.path.isdir(args.model_dir):
            raise SystemExit(f"run_server.py: error: --model-dir {args.model_dir} is not a directory")
        if args.checkpoint and not os.path.isfile(args.checkpoint):
            raise SystemExit(f"run_server.py: error: --checkpoint {args.checkpoint} is not a file")
    elif args.checkpoint:
        raise SystemExit("run_server.py: error: --checkpoint needs --model-dir")
    else:
        preset = args.preset or _default_preset()
        get_preset(preset)                               # unknown names fail here, with the known ones listed
    if args.decoder == "taehv" and not args.decoder_weights:
        raise SystemExit("run_server.py: error: --decoder taehv needs --decoder-weights FILE (taew2_1.pth, "
                         "downloaded yourself)")
    if args.decoder_weights and not os.path.isfile(args.decoder_weights):
        raise SystemExit(f"run_server.py: error: --decoder-weights {args.decoder_weights} is not a file")
    if args.decoder_weights and args.decoder != "taehv":
        raise SystemExit("run_server.py: error: --decoder-weights needs --decoder taehv")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"run_server.py: error: --device {device} but no CUDA device is available")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda")
                                                           else torch.float32)
    build = _build(args, device, dtype, None if args.model_dir else preset)

    def factory():
        return configure_runtime(build(), args)
    return factory


def configure_runtime(gen, args):
    """Attention backend, frame decoder and compile-at-warm-up, as the command line asks."""
    from packcache.compile import CompileConfig, default_enabled

    if args.attention != "auto":
        gen.use_attention(args.attention)
    if args.decoder != "wan":
        gen.use_decoder(args.decoder, args.decoder_weights)
    compile_on = default_enabled(gen.device) if args.compile is None else args.compile
    if compile_on:
        gen.compile_config = CompileConfig(cache=args.cache)
    logging.getLogger("run_server").info("runtime: %s", gen.runtime_info() | {"compile": compile_on})
    return gen


def _build(args, device, dtype, preset):
    from packcache import Generator, PackCacheError

    if args.model_dir:
        return lambda: Generator.from_pretrained(args.model_dir, checkpoint=args.checkpoint, device=device,
                                                 dtype=dtype)
    if args.preset is None and preset != "tiny":
        def default_model():
            try:
                return Generator.from_preset(preset, device=device, dtype=dtype)
            except PackCacheError as exc:            # e.g. the toy model's weights are not installed yet
                logging.getLogger("run_server").warning("preset %r unavailable (%s); serving 'tiny' (random "
                                                        "weights) instead", preset, exc)
                return Generator.from_preset("tiny", device=device, dtype=dtype)
        return default_model
    return lambda: Generator.from_preset(preset, device=device, dtype=dtype)


async def serve(args) -> int:
    from streamer.console import listen_error, ready_line
    from streamer.server import StreamServer

    config = config_from_args(args)
    factory = generator_factory(args)
    server = StreamServer(config)
    try:
        await server.listen()
    except OSError as exc:
        print(listen_error(config.host, config.port, exc), file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"loading the model… (/healthz says 'starting' until it is warm: {server.url}healthz)", flush=True)
    load = asyncio.create_task(server.load(factory))
    await asyncio.wait([load, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if load.done() and load.exception() is not None:
        exc = load.exception()
        await server.close()
        print(f"run_server.py: error: could not load the model: {exc}", file=sys.stderr)
        return 1
    if not stop.is_set():
        print(ready_line(server.url, bool(config.token)), flush=True)
        await stop.wait()
    print("shutting down…", flush=True)
    load.cancel()
    await server.close()
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "debug":
        for noisy in ("aioice", "aiortc", "websockets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        read_token(args)
        config = config_from_args(args)                # bad values fail before anything starts
        if args.cluster:
            from streamer.cluster.cli import cluster_config_from_args
            cluster_config_from_args(args)
        preflight(args, config)
    except ValueError as exc:
        print(f"run_server.py: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:
        print(exc.code, file=sys.stderr)
        return 2
    try:
        if args.cluster:
            from streamer.cluster.cli import serve_cluster
            return asyncio.run(serve_cluster(args, config_from_args(args), generator_factory))
        return asyncio.run(serve(args))
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        raise
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback (--log-level debug shows it)
        from packcache import PackCacheError
        if isinstance(exc, PackCacheError):
            print(f"run_server.py: error: {exc}", file=sys.stderr)
            return 2
        logging.getLogger("run_server").debug("fatal", exc_info=True)
        print(f"run_server.py: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
