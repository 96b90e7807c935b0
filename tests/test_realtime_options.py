"""The speed options as users reach them: run_server's --decoder/--compile/--attention, compile at warm-up (no
recompiles once warm, same frames), generate --decoder, umT5 in bf16."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(ROOT / "run_server.py")]


def test_run_server_help_and_one_line_errors_for_the_decoder_options(tmp_path):
    out = subprocess.run(RUN + ["--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    for opt in ("--decoder", "--decoder-weights", "--compile", "--no-compile", "--attention"):
        assert opt in out.stdout
    for args, why in ((["--decoder", "taehv"], "needs --decoder-weights"),
                      (["--decoder", "taehv", "--decoder-weights", str(tmp_path / "none.pth")], "is not a file"),
                      (["--attention", "xformers"], "invalid choice")):
        res = subprocess.run(RUN + args + ["--port", "0", "--preset", "tiny"], capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and why in lines[0], (args, res.stderr)


def test_configure_runtime_follows_the_command_line(tmp_path, tiny_generator):
    import run_server
    from tests.test_taehv import SMALL, random_checkpoint

    gen = tiny_generator
    random_checkpoint(tmp_path / "taew2_1.pth", widths=SMALL["widths"])
    parse = run_server.build_parser().parse_args
    try:
        run_server.configure_runtime(gen, parse(["--preset", "tiny"]))
        assert gen.compile_config is None                   # cpu: compile off by default
        assert gen.runtime_info()["decoder"] == "wan"
        run_server.configure_runtime(gen, parse(["--compile", "--decoder", "taehv", "--decoder-weights",
                                                 str(tmp_path / "taew2_1.pth"), "--attention", "sdpa",
                                                 "--cache", "window"]))
        assert gen.compile_config is not None and gen.compile_config.cache == "window"
        assert gen.runtime_info()["decoder"] == "taehv" and gen.attention_backend == "sdpa"
    finally:
        gen.compile_config = None
        gen.use_decoder("wan")


@pytest.mark.slow
def test_compile_at_warmup_reaches_steady_state_then_never_recompiles(tiny_generator):
    """torch.compile with the 'eager' backend traces exactly as inductor would (same graphs, breaks, guards) without
    generating code; the frames must not change and no new graph may appear once the warm-up is done."""
    from torch._dynamo.utils import counters

    from packcache.compile import CompileConfig, uncompile_generator

    gen = tiny_generator
    with gen.open("a red circle", seed=5) as s:
        ref = [s.next_chunk() for _ in range(4)]
    gen.compile_config = CompileConfig(backend="eager", warmup_chunks=3)
    try:
        assert gen.warmup() > 0 and gen.compiled and gen.runtime_info()["compiled"] is True
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        with gen.open("a red circle", seed=5) as s:
            frames = [s.next_chunk() for _ in range(4)]
        assert counters["stats"]["unique_graphs"] == graphs, "a steady-state chunk compiled a new graph"
        for a, b in zip(ref, frames):
            assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    finally:
        gen.compile_config = None
        uncompile_generator(gen)
    assert not gen.compiled and all(b._compiled_call_impl is None for b in gen.model.transformer.blocks)


def test_generate_decoder_option_needs_weights(tmp_path, capsys):
    from packcache.generate import main

    assert main(["--preset", "tiny", "--prompt", "x", "--seconds", "0.5", "--decoder", "taehv",
                 "--out", str(tmp_path / "v.mp4")]) == 2
    assert "needs --decoder-weights" in capsys.readouterr().err


def test_umt5_runs_in_bf16_on_the_gpu_and_float32_on_the_cpu():
    from packcache.presets import TextConfig, get_preset
    from packcache.text import build_text_encoder, text_dtype

    tiny = get_preset("tiny").text
    assert text_dtype(TextConfig(kind="umt5"), "cuda") == torch.bfloat16
    assert text_dtype(tiny, "cuda:1") == torch.bfloat16
    assert text_dtype(TextConfig(kind="umt5"), "cpu") == torch.float32
    assert text_dtype(TextConfig(kind="minilm", dim=384), "cuda") == torch.float32   # the toy model's embeddings
    # the dtype handling itself, at a tiny config on the CPU: bf16 weights, float32 output close to fp32's
    ref = build_text_encoder(tiny).encode(["a red circle"])
    enc = build_text_encoder(tiny, dtype=torch.bfloat16)
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    out = enc.encode(["a red circle"])
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.all(out[0, 13:] == 0)
    cos = torch.nn.functional.cosine_similarity(out[0, :13], ref[0, :13], dim=-1)
    assert cos.min() > 0.98, cos


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pipelined_frames_equal_serial_on_the_gpu():
    from packcache import Generator

    gen = Generator.from_preset("tiny", device="cuda", dtype=torch.float32)
    with gen.open("a red circle", seed=3) as s:
        ref = [s.next_chunk() for _ in range(5)]
    with gen.open("a red circle", seed=3) as s:
        futures = [s.submit_chunk() for _ in range(5)]
        frames = [f.result() for f in futures]
    assert all(np.array_equal(a, b) for a, b in zip(ref, frames))


def test_healthz_reports_the_runtime_once_ready(tiny_generator):
    import json
    import urllib.request

    from streamer.config import ServerConfig
    from streamer.server import BackgroundServer

    with BackgroundServer(ServerConfig(port=0, record_dir=None), tiny_generator) as bg:
        with urllib.request.urlopen(bg.server.url + "healthz", timeout=10) as r:
            body = json.loads(r.read())
    assert body["status"] == "ready"
    assert body["runtime"] == {"device": "cpu", "dtype": "float32", "attention": "sdpa", "compiled": False,
                               "decoder": "wan"}
