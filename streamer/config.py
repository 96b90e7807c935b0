"""ServerConfig: everything the server needs to know, in one dataclass (run_server.py fills it from argparse)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .protocol import Limits, ProtocolError, check_prompt_text

WEB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web")

DEFAULT_PROMPT = "a red circle bouncing on a striped blue background"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080                      # 0 picks a free port (tests); `StreamServer.port` tells which
    max_sessions: int | None = 4          # concurrent generation sessions; one more gets "busy". None ("auto"):
                                          #   as many as the device memory left after warm-up holds (StreamServer)
    # Most sessions advanced by one batched device step (one model call per denoising step for all of them);
    # None: every session whose next chunk is due. Smaller batches: lower chunk latency, less throughput.
    max_batch: int | None = None
    token: str | None = None              # when set, clients must send it (?token= or Authorization: Bearer)
    # A cluster worker: every connection comes from the front door (one address for all clients), which keeps the
    # per-address flood penalty itself. A flooder is still closed here, but the address is never refused: that
    # would refuse every client of the front door (streamer/cluster/frontdoor.py).
    behind_front_door: bool = False
    metrics_need_token: bool = False      # /metrics asks for the token too (/healthz never does: load balancers)
    # Origins allowed to open the websocket besides the server's own listening addresses (scheme, host and port
    # compared; see streamer/access.py) and clients that send no Origin (scripts). "*" allows any origin.
    allowed_origins: tuple[str, ...] = ()
    default_prompt: str = DEFAULT_PROMPT  # what a new session generates until the viewer types something
    default_seed: int = 0
    cache: str = "packed"                 # packed | window | full (the engine's cache kinds)
    chunks_ahead: int = 2                 # chunks generated ahead of playback (the frame buffer's bound)
    # Decode off the critical path: a chunk's finish (decode, compressed K/V backup) runs on the engine's side
    # worker while the device worker denoises the next batch (streamer/session.py). Frames are the same either way.
    pipeline: bool = True
    stats_interval: float = 0.5           # seconds between pushed stats messages (protocol promises <= 1 s)
    ping_interval: float = 5.0            # websocket keepalive: a silent client is dropped after
    ping_timeout: float = 5.0             #   ping_interval + ping_timeout seconds at most
    # Seconds a session survives a lost websocket (not a clean close) so the client can resume it with
    # ?resume=<session>&key=<resume_key> (same cache and position; a new peer connection). 0: ended at once.
    reconnect_grace: float = 0.0
    # Where live sessions are saved on shutdown (SIGTERM) and restored from on start, so a client resuming with
    # its session id and key continues its stream across a restart. Needs reconnect_grace > 0. None: off.
    state_dir: str | None = None
    record_dir: str | None = "recordings"  # where `record` writes MP4 files; None disables recording
    record_all: bool = False              # start recording every session as soon as it opens
    # torch intra-op threads of the device worker thread when generating on the CPU (--threads). None:
    # packcache.threads.default_threads() (cores - 1, at least 1: why is written there). 0: torch's default.
    cpu_threads: int | None = None
    web_dir: str = WEB_DIR
    limits: Limits = field(default_factory=Limits)

    def worker_threads(self) -> int:
        """torch CPU threads for the device worker (0: torch's default)."""
        from packcache.threads import default_threads

        if self.cpu_threads is not None:
            return self.cpu_threads
        return default_threads()

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.max_sessions is not None and self.max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1 (or auto), got {self.max_sessions}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_sessions is None and self.cache == "full":
            raise ValueError("max_sessions auto needs a bounded cache (packed or window): a full cache keeps growing")
        if self.chunks_ahead < 1:
            raise ValueError(f"chunks_ahead must be at least 1, got {self.chunks_ahead}")
        if self.cache not in ("packed", "window", "full"):
            raise ValueError(f"cache must be packed, window or full, got {self.cache!r}")
        if not 0 < self.stats_interval <= 1.0:
            raise ValueError("stats_interval must be in (0, 1] seconds")
        if self.token is not None and not self.token:
            raise ValueError("token must not be empty")
        for origin in self.allowed_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"allowed origin {origin!r} must look like http(s)://host[:port] or be '*'")
        if self.cpu_threads is not None and self.cpu_threads < 0:
            raise ValueError("cpu_threads must be >= 0")
        if self.reconnect_grace < 0:
            raise ValueError("reconnect_grace must be >= 0 seconds")
        if self.state_dir is not None and not (self.state_dir and self.reconnect_grace > 0):
            raise ValueError("state_dir needs a directory and reconnect_grace > 0 (clients resume within the grace)")
        try:
            check_prompt_text(self.default_prompt, self.limits)
        except ProtocolError as exc:
            raise ValueError(f"the starting prompt: {exc.message}") from None
        if self.record_all and not self.record_dir:
            raise ValueError("record_all needs a record_dir")
