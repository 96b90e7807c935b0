"""How many CPU threads torch uses for generation: one place for the default and its reason.

Default: one less than the cores this process may run on (at least 1), or $OMP_NUM_THREADS when set. Why not all
of them: torch's intra-op pool (OpenMP) spin-waits at every barrier, so when one of its threads shares a core
with anything else (the server's event loop and video encoder, a second process) each barrier waits for a
descheduled thread, and a chunk gets 10-20x slower (measured in the README: the toy model at 0.05-0.08x real
time with all threads vs ~1x with one, with another process busy on a 2-core machine). One core left free costs
at most 1/cores of the peak speed and removes that cliff. No torch import here: the CLIs check arguments first.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))     # what a container or taskset actually grants
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, available_cores() - 1)


def check_threads(n: int | None) -> None:
    if n is not None and n < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's own default), got {n}")


def pipeline_threads(n: int | None, pipeline: bool) -> tuple[int, int]:
    """(denoising thread's, side worker's) torch threads for `--threads n` (None: the default). Pipelined, the two
    threads compute at once, so n is split between them, at least one each (with the default on 2 cores, 1 + 1: the
    side worker takes the core the default leaves free); serial, the side worker runs only while the caller waits
    for it, so both get n. 0 stays 0 (torch's own default)."""
    check_threads(n)
    n = default_threads() if n is None else n
    if not pipeline or n == 0:
        return n, n
    finish = max(1, n // 2)
    return max(1, n - finish), finish


def set_threads(n: int | None) -> int:
    """Apply `n` torch threads to the calling thread (None: default_threads(); 0: leave torch's choice)."""
    import torch

    check_threads(n)
    n = default_threads() if n is None else n
    if n:
        torch.set_num_threads(n)
    log.info("torch CPU threads: %d", torch.get_num_threads())
    return torch.get_num_threads()
