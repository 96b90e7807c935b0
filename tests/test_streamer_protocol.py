"""The sans-I/O protocol: every client message parsed or refused with the right code; server messages rendered."""

import json

import pytest

from streamer import protocol as P
from streamer.metrics import Registry

L = P.Limits()


def parse(obj):
    return P.parse_client_message(obj if isinstance(obj, (str, bytes)) else json.dumps(obj), L)


def code_of(obj):
    with pytest.raises(P.ProtocolError) as e:
        parse(obj)
    return e.value.code, e.value.id


def test_valid_messages_parse_to_typed_objects():
    assert parse({"type": "prompt", "text": "  a cat  ", "id": "c1"}) == P.Prompt("a cat", "cut", 4, "c1")
    assert parse({"type": "prompt", "text": "x", "transition": "blend", "blend_chunks": 8}) == \
        P.Prompt("x", "blend", 8, None)
    assert parse({"type": "pause", "id": 3}) == P.Pause(3)
    assert parse({"type": "resume"}) == P.Resume()
    assert parse({"type": "reset", "seed": 7}) == P.Reset(7)
    assert parse({"type": "reset"}) == P.Reset(None)
    assert parse({"type": "record", "action": "stop"}) == P.Record("stop")
    assert parse({"type": "ping", "id": "p"}) == P.Ping("p")
    assert parse({"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n"}).sdp.startswith("v=0")
    assert parse({"type": "pause", "future_field": 1}) == P.Pause()      # unknown fields are ignored


@pytest.mark.parametrize("raw, code", [
    ("{not json", "bad_json"),
    ("[1, 2]", "bad_json"),
    (b'', "bad_image"),                                                  # binary frames are pictures (empty here)
    ({"text": "no type"}, "missing_field"),
    ({"type": 5}, "bad_value"),
    ({"type": "teleport"}, "unknown_type"),
    ({"type": "prompt"}, "missing_field"),
    ({"type": "prompt", "text": 42}, "bad_value"),
    ({"type": "prompt", "text": "   "}, "bad_value"),
    ({"type": "prompt", "text": "x" * 501}, "prompt_too_long"),
    ({"type": "prompt", "text": "bell\x07"}, "bad_value"),
    ({"type": "prompt", "text": "two\nlines"}, "bad_value"),
    ({"type": "prompt", "text": "x", "transition": "wipe"}, "bad_value"),
    ({"type": "prompt", "text": "x", "transition": "blend", "blend_chunks": 0}, "bad_value"),
    ({"type": "prompt", "text": "x", "blend_chunks": True}, "bad_value"),
    ({"type": "reset", "seed": -1}, "bad_value"),
    ({"type": "reset", "seed": 1.5}, "bad_value"),
    ({"type": "record"}, "missing_field"),
    ({"type": "record", "action": "pause"}, "bad_value"),
    ({"type": "offer"}, "missing_field"),
    ({"type": "offer", "sdp": "hello"}, "bad_sdp"),
    ({"type": "pause", "id": {"x": 1}}, "bad_value"),
    ({"type": "pause", "id": "i" * 65}, "bad_value"),
    ({"type": "prompt", "text": "x" * (64 * 1024)}, "too_large"),
])
def test_bad_messages_get_their_code(raw, code):
    assert code_of(raw)[0] == code


def test_errors_echo_the_message_id():
    assert code_of({"type": "prompt", "id": "c9"}) == ("missing_field", "c9")
    assert code_of({"type": "nope", "id": 4}) == ("unknown_type", 4)


def test_limits_each_have_a_reason_and_serialise():
    reasons = L.reasons()
    assert set(reasons) == set(L.to_json()) and all(len(r) > 20 for r in reasons.values())


def test_rate_limits_are_token_buckets():
    gate = P.MessageGate(L, now=0.0)
    prompt = P.Prompt("x", id="p")
    results = [gate_ok(gate, prompt, 0.0) for _ in range(L.prompt_burst + 3)]
    assert results == [True] * L.prompt_burst + [False] * 3
    assert gate_ok(gate, prompt, 1.0 / L.prompt_rate + 1e-6)            # refills at prompt_rate
    pause = P.Pause()
    allowed = sum(gate_ok(gate, pause, 2.0) for _ in range(100))
    assert allowed <= L.message_burst


def gate_ok(gate, msg, now):
    try:
        gate.check(msg, now)
        return True
    except P.ProtocolError as e:
        assert e.code == "rate_limited" and e.id == msg.id
        return False


def test_server_messages_render_as_json():
    w = json.loads(P.render_welcome("s1", fps=16, width=64, height=64, preset="tiny", limits=L, prompt="p",
                                    chunks_ahead=2, recording=True))
    assert w["type"] == "welcome" and w["version"] == P.PROTOCOL_VERSION and w["limits"]["max_prompt_chars"] == 500
    assert json.loads(P.render_ack("prompt", "c1", effective_chunk=5)) == \
        {"type": "ack", "id": "c1", "for": "prompt", "effective_chunk": 5}
    e = json.loads(P.render_error("busy", "full", fatal=True))
    assert e == {"type": "error", "code": "busy", "message": "full", "id": None, "fatal": True}
    s = json.loads(P.render_stats({"rtf": float("inf"), "n": 1}))
    assert s == {"type": "stats", "rtf": None, "n": 1}                    # never emits invalid JSON


def test_metrics_text_format():
    r = Registry()
    c = r.counter("x_total", "things", ("kind",))
    c.inc(kind="a")
    c.inc(2, kind="b")
    h = r.histogram("lat_seconds", "latency", (0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    r.gauge("g", "a gauge", fn=lambda: 1.5)
    text = r.render()
    for line in ('x_total{kind="a"} 1', 'x_total{kind="b"} 2', 'lat_seconds_bucket{le="0.1"} 1',
                 'lat_seconds_bucket{le="1"} 2', 'lat_seconds_bucket{le="+Inf"} 3', "lat_seconds_count 3",
                 "# TYPE lat_seconds histogram", "g 1.5"):
        assert line in text.splitlines()
