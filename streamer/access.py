"""Who may connect: the Origin check, the token, throttling of wrong tokens and of flooding addresses.

Sans-I/O like protocol.py (time is passed in), so each rule is tested with plain values (tests/test_access.py).

Origin rule (browsers send Origin on every websocket; scripts usually send none and are let through, the token is
what guards them). An Origin is allowed when its (scheme, host, port) equals one of
  - an --allowed-origin entry ('*' allows any), or
  - an address the server listens on: scheme http, port = the listening port, host = the listening IP; for a
    loopback listener also `localhost` (and 127.0.0.1 / [::1]); for a wildcard listener (0.0.0.0, ::) any IP
    literal of this machine, `localhost` and the machine's own host names.
The Host header is never trusted: a DNS-rebinding page (evil.example resolving to 127.0.0.1) sends
Origin http://evil.example:8080 and Host evil.example:8080, and is refused. Behind a TLS proxy the page's origin
is https://your.domain: name it with --allowed-origin.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import OrderedDict
from urllib.parse import urlsplit

from .protocol import Limits

_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_TRACKED = 4096          # addresses remembered by each throttle (oldest forgotten first): memory stays bounded


def parse_origin(origin: str) -> tuple[str, str, int] | None:
    """'http://Host:8080' -> ('http', 'host', 8080); None when it is not an http(s) origin."""
    try:
        u = urlsplit(origin.strip().rstrip("/"))
        port = u.port
    except ValueError:
        return None
    if u.scheme not in _DEFAULT_PORTS or not u.hostname or u.path or u.query or u.username:
        return None
    return u.scheme, u.hostname.lower(), port if port is not None else _DEFAULT_PORTS[u.scheme]


def _ip(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def _is_local_ip(ip) -> bool:
    """Whether this machine has the address (binding to it succeeds only then)."""
    if ip.is_loopback:
        return True
    if ip.is_unspecified or ip.is_multicast:
        return False
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
        return True
    except OSError:
        return False


class OriginPolicy:
    def __init__(self, allowed: tuple[str, ...], listening: list[tuple[str, int]]):
        """`listening`: (ip, port) of each socket the server listens on (getsockname)."""
        self.any = "*" in allowed
        self.allowed = {o for o in (parse_origin(a) for a in allowed if a != "*") if o is not None}
        self.listening = [(_ip(host), port) for host, port in listening]
        self._names = {"localhost"}
        if any(ip is not None and ip.is_unspecified for ip, _ in self.listening):
            for name in (socket.gethostname(), socket.getfqdn()):
                if name:
                    self._names.add(name.lower())
        self._local: OrderedDict[str, bool] = OrderedDict()

    def allows(self, origin: str) -> bool:
        if self.any:
            return True
        parsed = parse_origin(origin)
        if parsed is None:
            return False                     # "null" (file://, sandboxed frames), other schemes, garbage
        if parsed in self.allowed:
            return True
        scheme, host, port = parsed
        if scheme != "http":                 # the server itself speaks plain http; TLS means a proxy
            return False
        ip = _ip(host)
        for lip, lport in self.listening:
            if port != lport or lip is None:
                continue
            if ip is None:
                if host == "localhost" and lip.is_loopback:
                    return True
                if lip.is_unspecified and host in self._names:
                    return True
            elif ip == lip or (ip.is_loopback and lip.is_loopback):
                return True
            elif lip.is_unspecified and ip.version == lip.version and self._local_ip(ip):
                return True
        return False

    def _local_ip(self, ip) -> bool:
        key = str(ip)
        hit = self._local.get(key)
        if hit is None:
            hit = self._local[key] = _is_local_ip(ip)
            while len(self._local) > _MAX_TRACKED:
                self._local.popitem(last=False)
        return hit


class AddressThrottle:
    """Per-address attempt budget: `burst` failures at once, then one per `interval` seconds (a token bucket that
    only failures spend, so a client with the right token is never slowed)."""

    def __init__(self, burst: int, interval: float):
        self.burst, self.interval = burst, interval
        self._state: OrderedDict[str, tuple[float, float]] = OrderedDict()   # address -> (tokens, at)

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self._state.get(address, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) / self.interval)

    def blocked(self, address: str, now: float) -> bool:
        """Whether the address has no attempt left."""
        return address in self._state and self._tokens(address, now) < 1.0

    def failed(self, address: str, now: float) -> None:
        tokens = max(0.0, self._tokens(address, now) - 1.0)
        self._state.pop(address, None)
        self._state[address] = (tokens, now)
        while len(self._state) > _MAX_TRACKED:
            self._state.popitem(last=False)

    def retry_after(self, address: str, now: float) -> float:
        return max(0.0, (1.0 - self._tokens(address, now)) * self.interval) if address in self._state else 0.0


class PenaltyBox:
    """Addresses refused until a time (closed for flooding)."""

    def __init__(self):
        self._until: OrderedDict[str, float] = OrderedDict()

    def add(self, address: str, until: float) -> None:
        self._until.pop(address, None)
        self._until[address] = until
        while len(self._until) > _MAX_TRACKED:
            self._until.popitem(last=False)

    def remaining(self, address: str, now: float) -> float:
        until = self._until.get(address)
        if until is None:
            return 0.0
        if until <= now:
            del self._until[address]
            return 0.0
        return until - now


def auth_throttle(limits: Limits) -> AddressThrottle:
    return AddressThrottle(limits.auth_failures, limits.auth_failure_interval)
