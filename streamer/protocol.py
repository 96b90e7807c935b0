"""The control protocol, sans-I/O: parse every client message into a typed object, render every server message.

No sockets, no asyncio, no torch: everything here is tested with plain values (tests/test_streamer_protocol.py).
`docs/protocol.md` is the user-facing description with examples; this module is the reference.

Client -> server (JSON text frames; every message may carry an "id", echoed in its ack or error):
    offer   {"sdp"}                                   -> answer
    prompt  {"text", "transition"?, "blend_chunks"?}  -> ack {"effective_chunk"}
    pause / resume / reset {"seed"?} / record {"action": "start"|"stop"} / ping   -> ack (pong for ping)
    image   {"data" (base64), "text"?, "transition"?, "blend_chunks"?, "restart"?}  -> ack {"effective_chunk", "start",
            "thumbnail"}; a binary websocket message is an image message carrying the file's bytes (no text)

Server -> client: welcome, answer, ack, pong, stats (pushed), error.

Errors (all `ProtocolError`, each with one of `ERROR_CODES` and a one-line message):
    bad_json, unknown_type, missing_field, bad_value, too_large, prompt_too_long, rate_limited, bad_sdp
are raised here (bad_image by the server, from streamer/images.py); busy, unauthorized, forbidden_origin, starting, idle_timeout, connection_failed, shutting_down,
internal are sent by the server. Fatal errors (the server closes the websocket after sending them) carry
"fatal": true.

Limits live in one `Limits` dataclass; each field's metadata says why it has its value.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Union

from packcache import MAX_BLEND_CHUNKS, MAX_PROMPT_CHARS, PromptError, validate_prompt

PROTOCOL_VERSION = 1

TRANSITIONS = ("cut", "recache", "blend")
RECORD_ACTIONS = ("start", "stop")

ERROR_CODES = {
    # raised by parse_client_message / RateLimiter: the session lives on
    "bad_json": "the message is not a JSON object",
    "unknown_type": "the message type is not one this protocol version knows",
    "missing_field": "a required field is absent",
    "bad_value": "a field has the wrong type or an out-of-range value",
    "too_large": "the message is over limits.max_message_bytes",
    "prompt_too_long": "the prompt is over limits.max_prompt_chars",
    "rate_limited": "too many messages (or prompts) per second; the message was dropped. Fatal (the connection is "
                    "closed and the address refused for limits.flood_cooldown s) past the flood budget",
    "bad_sdp": "the offer could not be negotiated",
    # sent by a cluster's front door (streamer/cluster); fatal, close 1012: reconnect with the resume key
    "moved": "the session's worker is being drained; reconnect to continue elsewhere (fatal)",
    "worker_lost": "the session's worker stopped; reconnect for a new session (fatal)",
    "bad_image": "the picture is not a usable still PNG, JPEG or WebP (truncated, zero-sized, animated, too many "
                 "pixels, absurd aspect ratio); the message says which",
    # sent by the server; fatal ones close the websocket
    "busy": "the server already runs --max-sessions sessions (fatal)",
    "starting": "the model is still loading or warming up (fatal)",
    "unauthorized": "missing or wrong token, or too many wrong tokens from this address (fatal)",
    "forbidden_origin": "the page's Origin is not allowed (fatal)",
    "idle_timeout": "no connected video for limits.idle_timeout seconds (fatal); messages do not hold a slot",
    "connection_failed": "the WebRTC connection failed or did not connect within limits.connect_timeout (fatal)",
    "shutting_down": "the server is stopping (fatal)",
    "internal": "an unexpected server error; the message says what failed",
}

# websocket close codes used with fatal errors
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008          # unauthorized, forbidden_origin
CLOSE_TOO_BIG = 1009         # over limits.hard_max_message_bytes (sent by the websockets library itself)
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN_LATER = 1013  # busy, starting


def _limit(default, reason: str):
    return field(default=default, metadata={"reason": reason})


@dataclass(frozen=True)
class Limits:
    """Every limit the protocol enforces, with its reason. Sent to the client in `welcome`."""

    max_message_bytes: int = _limit(
        64 * 1024, "a browser's SDP offer is 3-10 KB; 64 KiB leaves room for many codecs and candidates")
    hard_max_message_bytes: int = _limit(
        1024 * 1024, "beyond this the websocket is closed with code 1009 without buffering the message")
    max_prompt_chars: int = _limit(
        500, "the text encoders see at most 512 tokens; 500 characters is already a long paragraph")
    max_id_chars: int = _limit(64, "ids are echoed back; they only need to be unique per connection")
    max_blend_chunks: int = _limit(32, "32 chunks is ~24 s of video; a longer blend is a slow cut nobody sees")
    max_seed: int = _limit(2**31 - 1, "seeds are passed to torch generators; stay in the signed 32-bit range")
    message_rate: float = _limit(
        20.0, "messages per second, sustained: a person clicks far less, a script should batch")
    message_burst: int = _limit(40, "messages accepted at once before the rate applies (a reconnect replays state)")
    prompt_rate: float = _limit(2.0, "prompts per second, sustained: a new prompt only shows up chunk by chunk anyway")
    prompt_burst: int = _limit(5, "prompts accepted at once (typing several quick edits) before the rate applies")
    idle_timeout: float = _limit(
        30.0, "seconds a session may hold a slot without connected video (never offered, or its media was lost): "
              "a slot is for watching; pings and prompts do not keep it (Janus-style sweeper)")
    connect_timeout: float = _limit(
        10.0, "seconds from an answer to a connected WebRTC link (ICE + DTLS take well under 5 s even through "
              "TURN); past it the client gets connection_failed and the slot is freed")
    flood_rate: float = _limit(
        60.0, "messages per second, sustained, before the connection is closed (3x message_rate: a client "
              "that keeps going past its rate_limited answers is flooding, and every message costs the "
              "event loop that all viewers share)")
    flood_burst: int = _limit(120, "messages at once before flood_rate applies (3x message_burst)")
    flood_bytes_rate: int = _limit(
        256 * 1024, "bytes per second, sustained, before the connection is closed (a person sends a few KB)")
    flood_bytes_burst: int = _limit(2 * 1024 * 1024, "bytes at once before flood_bytes_rate applies")
    flood_cooldown: float = _limit(
        10.0, "seconds new connections from an address closed for flooding are refused (so reconnecting at "
              "once does not restart the flood; clients behind one NAT share it)")
    auth_failures: int = _limit(5, "wrong tokens an address may send at once before it is throttled")
    auth_failure_interval: float = _limit(
        10.0, "seconds per further wrong-token attempt after auth_failures (guessing drops to 0.1 tries/s)")
    max_image_bytes: int = _limit(
        640 * 1024, "pictures are fitted to the stream's size (832x480 at most); a photo that size is well under "
                    "640 KiB as JPEG/WebP, and its base64 still fits in hard_max_message_bytes")
    max_image_pixels: int = _limit(
        16_000_000, "checked from the header before decoding: a 16 MP photo decodes to 48 MB; more is a bomb")
    max_image_aspect: float = _limit(
        4.0, "the centre crop to the stream's shape keeps under a third of a picture longer than 4:1")

    def __post_init__(self):
        # the engine refuses what is over its own limits: the protocol must refuse it first, with its own error
        if not 1 <= self.max_prompt_chars <= MAX_PROMPT_CHARS:
            raise ValueError(f"max_prompt_chars must be in 1..{MAX_PROMPT_CHARS} (the engine's limit)")
        if not 1 <= self.max_blend_chunks <= MAX_BLEND_CHUNKS:
            raise ValueError(f"max_blend_chunks must be in 1..{MAX_BLEND_CHUNKS} (the engine's limit)")
        if self.flood_burst < self.message_burst or self.flood_rate < self.message_rate:
            raise ValueError("the flood budget must be at least the message rate and burst")
        if self.flood_bytes_burst < self.max_message_bytes:
            raise ValueError("flood_bytes_burst must hold at least one max_message_bytes message")

    def flood_refusal(self) -> str:
        """The fatal `rate_limited` message a flooder gets (one server, or the cluster's front door)."""
        return (f"over {self.flood_rate:g} messages or {self.flood_bytes_rate} bytes per second; connection closed, "
                f"new ones refused for {self.flood_cooldown:g} s")

    def reasons(self) -> dict[str, str]:
        return {f.name: f.metadata["reason"] for f in fields(self)}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ProtocolError(Exception):
    """A client message that cannot be honoured. `code` is one of ERROR_CODES; `id` echoes the message's id."""

    def __init__(self, code: str, message: str, id: str | int | None = None):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


# ---------------------------------------------------------------------------------------------- client messages

MessageId = Union[str, int, None]


@dataclass(frozen=True)
class Offer:
    sdp: str
    id: MessageId = None
    type = "offer"


@dataclass(frozen=True)
class Prompt:
    text: str
    transition: str = "cut"
    blend_chunks: int = 4
    id: MessageId = None
    type = "prompt"


@dataclass(frozen=True)
class ImageCue:
    """A picture to start from (before or at session start) or to cut to mid-stream; `data` is the file's bytes,
    still undecoded (streamer/images.py decodes it off the event loop)."""

    data: bytes
    text: str = ""
    transition: str = "cut"
    blend_chunks: int = 4
    restart: bool = False     # restart the stream from this picture (a reset that makes it the start)
    id: MessageId = None
    type = "image"


@dataclass(frozen=True)
class Pause:
    id: MessageId = None
    type = "pause"


@dataclass(frozen=True)
class Resume:
    id: MessageId = None
    type = "resume"


@dataclass(frozen=True)
class Reset:
    seed: int | None = None
    id: MessageId = None
    type = "reset"


@dataclass(frozen=True)
class Record:
    action: str
    id: MessageId = None
    type = "record"


@dataclass(frozen=True)
class Ping:
    id: MessageId = None
    type = "ping"


ClientMessage = Union[Offer, Prompt, ImageCue, Pause, Resume, Reset, Record, Ping]


def _require(obj: dict, key: str, kind: type | tuple[type, ...], what: str, mid: MessageId):
    if key not in obj:
        raise ProtocolError("missing_field", f"{what} needs a {key!r} field", mid)
    return _typed(obj[key], key, kind, what, mid)


def _typed(value, key: str, kind, what: str, mid: MessageId):
    # bool is an int in Python; JSON true is never a valid number here
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError("bad_value", f"{what}.{key} must be {_kind_name(kind)}, not a boolean", mid)
    if not isinstance(value, kind):
        raise ProtocolError("bad_value", f"{what}.{key} must be {_kind_name(kind)}, not {_json_type(value)}", mid)
    return value


def _kind_name(kind) -> str:
    names = {str: "a string", int: "an integer", float: "a number", dict: "an object", bool: "a boolean"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


# Embedding, override and isolate controls reorder how the rest of the line is shown (the viewer, logs): a prompt
# could display as something other than what the model reads. The marks U+200E/U+200F/U+061C stay allowed.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def check_prompt_text(text: str, limits: Limits, mid: MessageId = None) -> str:
    """Validate a prompt; returns it stripped. On top of the engine's rules (`packcache.validate_prompt`: valid
    Unicode, something visible), no control characters or bidi overrides and at most max_prompt_chars. What
    passes here encodes in every text encoder (tests/test_prompts.py fuzzes it through the real tokenizers)."""
    for pos, ch in enumerate(text):
        if unicodedata.category(ch) == "Cc" or ch in "\u2028\u2029":
            raise ProtocolError(
                "bad_value", f"prompt contains control character U+{ord(ch):04X} at position {pos}", mid)
        if ch in _BIDI_CONTROLS:
            raise ProtocolError(
                "bad_value", f"prompt contains bidi control U+{ord(ch):04X} at position {pos}", mid)
    stripped = text.strip()
    if len(stripped) > limits.max_prompt_chars:
        raise ProtocolError(
            "prompt_too_long", f"prompt has {len(stripped)} characters; the limit is {limits.max_prompt_chars}",
            mid)
    try:
        return validate_prompt(text, limits.max_prompt_chars)
    except PromptError as exc:
        raise ProtocolError("bad_value", str(exc), mid) from None


def parse_client_message(data: str | bytes, limits: Limits = Limits()) -> ClientMessage:
    """Parse one websocket message into a typed message, or raise ProtocolError. Unknown fields are ignored."""
    if isinstance(data, (bytes, bytearray, memoryview)):   # a binary message is a picture's file bytes
        return ImageCue(data=_image_bytes(bytes(data), limits, None))
    size = len(data.encode("utf-8", "surrogatepass"))
    if size > max(limits.max_message_bytes, _image_message_bytes(limits)):
        raise ProtocolError("too_large", f"message is {size} bytes; the limit is {limits.max_message_bytes}")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("bad_json", f"message is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"message must be a JSON object, not {_json_type(obj)}")

    mid = obj.get("id")
    if mid is not None:
        if isinstance(mid, bool) or not isinstance(mid, (str, int)):
            raise ProtocolError("bad_value", f"id must be a string or an integer, not {_json_type(mid)}")
        if isinstance(mid, str) and len(mid) > limits.max_id_chars:
            raise ProtocolError("bad_value", f"id is longer than {limits.max_id_chars} characters")
    if "type" not in obj:
        raise ProtocolError("missing_field", "message needs a 'type' field", mid)
    kind = obj["type"]
    if not isinstance(kind, str):
        raise ProtocolError("bad_value", f"type must be a string, not {_json_type(kind)}", mid)
    if size > limits.max_message_bytes and kind != "image":
        raise ProtocolError("too_large", f"message is {size} bytes; the limit is {limits.max_message_bytes}", mid)
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError(
            "unknown_type", f"unknown message type {kind[:40]!r}; known: {', '.join(sorted(_PARSERS))}", mid)
    return parser(obj, limits, mid)


def _parse_offer(obj, limits, mid) -> Offer:
    sdp = _require(obj, "sdp", str, "offer", mid)
    if not sdp.lstrip().startswith("v=0"):
        raise ProtocolError("bad_sdp", "offer.sdp is not an SDP session description (must start with 'v=0')", mid)
    return Offer(sdp=sdp, id=mid)


def _transition(obj: dict, what: str, limits: Limits, mid: MessageId) -> tuple[str, int]:
    """The `transition` and `blend_chunks` fields shared by prompt and image messages."""
    transition = _typed(obj.get("transition", "cut"), "transition", str, what, mid)
    if transition not in TRANSITIONS:
        raise ProtocolError(
            "bad_value", f"{what}.transition must be one of {', '.join(TRANSITIONS)}, not {transition[:40]!r}", mid)
    blend = _typed(obj.get("blend_chunks", 4), "blend_chunks", int, what, mid)
    if not 1 <= blend <= limits.max_blend_chunks:
        raise ProtocolError("bad_value", f"{what}.blend_chunks must be in 1..{limits.max_blend_chunks}", mid)
    return transition, blend


def _parse_prompt(obj, limits, mid) -> Prompt:
    text = check_prompt_text(_require(obj, "text", str, "prompt", mid), limits, mid)
    transition, blend = _transition(obj, "prompt", limits, mid)
    return Prompt(text=text, transition=transition, blend_chunks=blend, id=mid)


def _image_message_bytes(limits: Limits) -> int:
    """Largest JSON image message: the base64 of max_image_bytes plus room for the other fields."""
    return 4 * ((limits.max_image_bytes + 2) // 3) + limits.max_prompt_chars * 4 + 1024


def _image_bytes(data: bytes, limits: Limits, mid: MessageId) -> bytes:
    if not data:
        raise ProtocolError("bad_image", "image is empty (0 bytes)", mid)
    if len(data) > limits.max_image_bytes:
        raise ProtocolError("too_large", f"image is {len(data)} bytes; the limit is {limits.max_image_bytes}", mid)
    return data


def _parse_image(obj, limits, mid) -> ImageCue:
    raw = _require(obj, "data", str, "image", mid)
    if raw.startswith("data:"):                      # a data: URL as FileReader.readAsDataURL makes it
        raw = raw.partition(",")[2]
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("bad_value", "image.data must be base64 (or a base64 data: URL)", mid) from None
    text = _typed(obj.get("text", ""), "text", str, "image", mid)
    text = check_prompt_text(text, limits, mid) if text.strip() else ""
    transition, blend = _transition(obj, "image", limits, mid)
    restart = _typed(obj.get("restart", False), "restart", bool, "image", mid)
    return ImageCue(data=_image_bytes(data, limits, mid), text=text, transition=transition, blend_chunks=blend,
                    restart=restart, id=mid)


def _parse_reset(obj, limits, mid) -> Reset:
    seed = obj.get("seed")
    if seed is not None:
        _typed(seed, "seed", int, "reset", mid)
        if not 0 <= seed <= limits.max_seed:
            raise ProtocolError("bad_value", f"reset.seed must be in 0..{limits.max_seed}", mid)
    return Reset(seed=seed, id=mid)


def _parse_record(obj, limits, mid) -> Record:
    action = _require(obj, "action", str, "record", mid)
    if action not in RECORD_ACTIONS:
        raise ProtocolError("bad_value", f"record.action must be 'start' or 'stop', not {action[:40]!r}", mid)
    return Record(action=action, id=mid)


_PARSERS = {
    "offer": _parse_offer,
    "prompt": _parse_prompt,
    "image": _parse_image,
    "pause": lambda obj, limits, mid: Pause(id=mid),
    "resume": lambda obj, limits, mid: Resume(id=mid),
    "reset": _parse_reset,
    "record": _parse_record,
    "ping": lambda obj, limits, mid: Ping(id=mid),
}


# ---------------------------------------------------------------------------------------------- rate limiting

class RateLimiter:
    """Token bucket: `rate` tokens per second, at most `burst` saved up. Time is passed in (sans-I/O)."""

    def __init__(self, rate: float, burst: int, now: float):
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._last = now

    def allow(self, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class MessageGate:
    """Per-connection admission of parsed messages: the overall message rate and the prompt rate."""

    def __init__(self, limits: Limits, now: float):
        self._all = RateLimiter(limits.message_rate, limits.message_burst, now)
        self._prompts = RateLimiter(limits.prompt_rate, limits.prompt_burst, now)

    def check(self, msg: ClientMessage, now: float) -> None:
        if not self._all.allow(now):
            raise ProtocolError("rate_limited", "too many messages; slow down", msg.id)
        if isinstance(msg, (Prompt, ImageCue)) and not self._prompts.allow(now):
            raise ProtocolError("rate_limited", "too many prompts per second; this one was dropped", msg.id)


class FloodBudget:
    """Per-connection cost budget, charged for every raw message *before* it is parsed or answered.

    The MessageGate answers each message over its rate with `rate_limited`; answering still costs the shared event
    loop, so a client that keeps sending far past that (limits.flood_*: messages and bytes) is closed instead:
    its cost to everyone else is bounded by the budget, whatever rate it sends at."""

    def __init__(self, limits: Limits, now: float):
        self._messages = RateLimiter(limits.flood_rate, limits.flood_burst, now)
        self._bytes = limits.flood_bytes_rate, limits.flood_bytes_burst
        self._byte_tokens, self._last = float(limits.flood_bytes_burst), now

    def charge(self, nbytes: int, now: float) -> bool:
        """Count one message of `nbytes`; False once the connection is over its budget."""
        rate, burst = self._bytes
        self._byte_tokens = min(burst, self._byte_tokens + (now - self._last) * rate) - nbytes
        self._last = now
        return self._messages.allow(now) and self._byte_tokens >= 0


# ---------------------------------------------------------------------------------------------- server messages

def _dump(obj: dict) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=_default)


def _default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def render_welcome(session: str, *, fps: int, width: int, height: int, preset: str, limits: Limits,
                   prompt: str, chunks_ahead: int, recording: bool, resume_key: str | None = None,
                   resumed: bool = False, paused: bool = False, chunk_index: int = 0) -> str:
    msg = {"type": "welcome", "version": PROTOCOL_VERSION, "session": session, "fps": fps, "width": width,
           "height": height, "preset": preset, "prompt": prompt, "chunks_ahead": chunks_ahead,
           "recording_available": recording, "transitions": list(TRANSITIONS), "limits": limits.to_json(),
           "resumed": resumed, "paused": paused, "chunk_index": chunk_index}
    if resume_key is not None:
        msg["resume_key"] = resume_key
    return _dump(msg)


def render_answer(sdp: str, id: MessageId = None) -> str:
    return _dump({"type": "answer", "sdp": sdp, "id": id})


def render_ack(for_: str, id: MessageId = None, **fields) -> str:
    return _dump({"type": "ack", "id": id, "for": for_, **fields})


def render_pong(id: MessageId = None, t: float | None = None) -> str:
    return _dump({"type": "pong", "id": id, "t": t})


def render_error(code: str, message: str, id: MessageId = None, fatal: bool = False) -> str:
    assert code in ERROR_CODES, code
    return _dump({"type": "error", "code": code, "message": message, "id": id, "fatal": fatal})


def render_stats(stats: dict) -> str:
    return _dump({"type": "stats", **_finite(stats)})
