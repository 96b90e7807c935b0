"""The server batching live sessions (tiny engine, real WebRTC clients): two viewers' chunks share device steps
(/metrics), and --max-sessions auto sizes admission from device memory at startup."""

import asyncio
import json
import re
import urllib.request

from streamer.client import StreamClient
from streamer.config import ServerConfig
from streamer.server import BackgroundServer


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} missing"
    return float(m.group(1))


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


async def test_two_viewers_share_batched_steps_and_auto_admission(tiny_generator, tmp_path):
    config = ServerConfig(port=0, max_sessions=None, chunks_ahead=6, record_dir=None)
    with BackgroundServer(config, tiny_generator) as bg:
        limit = config.max_sessions                       # sized at startup from the device's free memory
        assert isinstance(limit, int) and limit >= 2
        health = json.loads(await asyncio.to_thread(get, bg.server.url + "healthz"))
        assert health["max_sessions"] == limit
        async with StreamClient(bg.server.ws_url) as a, StreamClient(bg.server.ws_url) as b:
            await asyncio.gather(a.start_video(), b.start_video())
            await asyncio.gather(a.wait_frames(12, timeout=60), b.wait_frames(12, timeout=60))
            text = await asyncio.to_thread(get, bg.server.url + "metrics")
        assert metric(text, "streamer_max_sessions") == limit
        steps, sessions = metric(text, "streamer_batch_sessions_count"), metric(text, "streamer_batch_sessions_sum")
        assert steps >= 1 and sessions > steps          # some device steps advanced both viewers at once
        assert metric(text, 'streamer_batch_sessions_bucket{le="1"}') < steps
        assert 1 <= metric(text, "streamer_batch_size") <= 2


def test_cli_max_sessions_auto_and_max_batch():
    from run_server import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--max-sessions", "auto", "--max-batch", "3"]))
    assert cfg.max_sessions is None and cfg.max_batch == 3
    cfg = config_from_args(build_parser().parse_args(["--max-sessions", "5"]))
    assert cfg.max_sessions == 5 and cfg.max_batch is None
    import pytest
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--max-sessions", "lots"])
    with pytest.raises(ValueError, match="bounded cache"):
        config_from_args(build_parser().parse_args(["--max-sessions", "auto", "--cache", "full"]))
