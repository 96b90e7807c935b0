"""Access rules and budgets as plain values (streamer/access.py, protocol.FloodBudget): no sockets, time passed in."""

import socket

import pytest

from streamer.access import AddressThrottle, OriginPolicy, PenaltyBox, parse_origin
from streamer.protocol import FloodBudget, Limits


def test_parse_origin_normalises_scheme_host_and_default_port():
    assert parse_origin("HTTP://LocalHost:8080/") == ("http", "localhost", 8080)
    assert parse_origin("https://example.com") == ("https", "example.com", 443)
    assert parse_origin("http://[::1]:9") == ("http", "::1", 9)
    for bad in ("null", "file://", "ws://x:1", "http://x:99999", "http://u@x:1", "http://x:1/path", ""):
        assert parse_origin(bad) is None, bad


def test_loopback_listener_accepts_its_own_names_only():
    p = OriginPolicy((), [("127.0.0.1", 8080)])
    for ok in ("http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080"):
        assert p.allows(ok), ok
    for no in ("http://evil.example:8080", "https://127.0.0.1:8080", "http://127.0.0.1:8081",
               f"http://{socket.gethostname()}:8080", "null"):
        assert not p.allows(no), no


def test_wildcard_listener_accepts_this_machines_addresses_and_names():
    p = OriginPolicy((), [("0.0.0.0", 8080)])
    assert p.allows("http://localhost:8080") and p.allows(f"http://{socket.gethostname()}:8080")
    assert p.allows("http://127.0.0.1:8080")
    assert not p.allows("http://192.0.2.1:8080")                  # TEST-NET-1: never one of ours
    assert not p.allows("http://evil.example:8080")


def test_allowed_origins_compare_normalised_and_star_allows_all():
    p = OriginPolicy(("https://app.example.com",), [("127.0.0.1", 8080)])
    assert p.allows("https://app.example.com:443") and p.allows("https://APP.example.com/")
    assert not p.allows("http://app.example.com") and not p.allows("https://app.example.com:8443")
    assert OriginPolicy(("*",), [("127.0.0.1", 8080)]).allows("null")


def test_address_throttle_allows_a_burst_then_one_per_interval():
    t = AddressThrottle(burst=3, interval=10.0)
    for _ in range(3):
        assert not t.blocked("a", 0.0)
        t.failed("a", 0.0)
    assert t.blocked("a", 0.0) and not t.blocked("b", 0.0)
    assert t.retry_after("a", 0.0) == pytest.approx(10.0)
    assert t.blocked("a", 9.9) and not t.blocked("a", 10.1)


def test_penalty_box_expires():
    box = PenaltyBox()
    box.add("a", 10.0)
    assert box.remaining("a", 4.0) == pytest.approx(6.0) and box.remaining("b", 4.0) == 0
    assert box.remaining("a", 10.5) == 0


def test_flood_budget_counts_messages_and_bytes_before_parsing():
    lim = Limits()
    f = FloodBudget(lim, 0.0)
    assert all(f.charge(10, 0.0) for _ in range(lim.flood_burst))
    assert not f.charge(10, 0.0)                                   # over the burst at one instant
    g = FloodBudget(lim, 0.0)
    for i in range(600):                                           # flood_rate/s sustained is fine
        assert g.charge(100, i / lim.flood_rate)
    big = FloodBudget(lim, 0.0)
    n = lim.flood_bytes_burst // lim.max_message_bytes
    assert all(big.charge(lim.max_message_bytes, 0.0) for _ in range(n))
    assert not big.charge(lim.max_message_bytes, 0.0)              # bytes run out before messages do


def test_limits_must_fit_inside_the_engines():
    from packcache import MAX_BLEND_CHUNKS, MAX_PROMPT_CHARS

    assert Limits().max_prompt_chars <= MAX_PROMPT_CHARS and Limits().max_blend_chunks <= MAX_BLEND_CHUNKS
    with pytest.raises(ValueError):
        Limits(max_prompt_chars=MAX_PROMPT_CHARS + 1)
    with pytest.raises(ValueError):
        Limits(max_blend_chunks=MAX_BLEND_CHUNKS + 1)
