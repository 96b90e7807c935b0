"""A hostile websocket client, run as its own process by tests/test_abuse.py: it sends as fast as one process can
(prompts, malformed JSON, big junk) for --seconds, reconnecting whenever it is closed, and prints what happened as
one JSON line. Not a test module (no test_ prefix); `python tests/flooder.py ws://... --seconds 5`."""

import argparse
import json
import time

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    payloads = [json.dumps({"type": "prompt", "text": "flood"}), "{nope", json.dumps({"type": "warp"}),
                "x" * 60_000, json.dumps({"type": "ping"})]
    out = {"sent": 0, "connections": 0, "refused_http": 0, "closed": []}
    print("ready", flush=True)                   # imports done: the test starts its window at the first message
    end = time.monotonic() + args.seconds
    start = time.monotonic()
    while time.monotonic() < end:
        try:
            with connect(args.url, open_timeout=5, close_timeout=1, max_size=None) as ws:
                out["connections"] += 1
                i = 0
                while time.monotonic() < end:
                    ws.send(payloads[i % len(payloads)])
                    out["sent"] += 1
                    i += 1
        except ConnectionClosed as exc:
            if exc.rcvd is not None:
                out["closed"].append(exc.rcvd.code)
        except InvalidStatus as exc:
            out["refused_http"] += 1
            if exc.response.status_code != 429:
                out["closed"].append(exc.response.status_code)
        except (OSError, TimeoutError):
            pass
    out["rate"] = out["sent"] / (time.monotonic() - start)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
