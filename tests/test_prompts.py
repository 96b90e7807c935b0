"""Every prompt string the protocol accepts encodes in the real text encoders; everything else is refused with an
error before it reaches the worker. Odd strings go through JSON exactly as a client sends them (lone surrogates as
"\\ud800" escapes), then through protocol.parse_client_message, then through the real tokenizers and encoders of
the `tiny` (byte-level umT5) and `toy` (all-MiniLM WordPiece, a fast tokenizer) presets."""

import json
import random

import pytest
import torch

from packcache import MAX_PROMPT_CHARS, PromptError, get_preset, validate_prompt
from packcache.text import build_text_encoder
from streamer.protocol import Limits, Prompt, ProtocolError, parse_client_message

ODD = [
    "a \ud800 red square", "\udfff", "ok \udc80\ud800 mixed", "\ud83d", "\U0001F600 smile", "a\u200db",
    "\u200b", "\u200b\u200c\u200d\ufeff", "\u200e\u200f", "\u202e reversed", "abc\u2066x\u2069",
    "\x00", "nul\x00inside", "tab\there", "line\nbreak", "\x1b[31mred", "\x7f", "\u0085", "\u2028", "\u2029",
    " ", "\t\n", "\u3000", "\u00a0\u2003\u2009", "\u180e", "\u0301\u0301", "e\u0301",
    "w" * 400, "w" * 500, "w" * 501, "w" * 5000, "x" * MAX_PROMPT_CHARS, ("longword" * 60)[:499],
    "\uffff", "\ufffd", "\U0010FFFF", "\ue000 private", "中文提示：一只猫", "مرحبا بالعالم", "Ωmega ∑ ∞",
    "<script>alert(1)</script>", "&lt;b&gt;", "%s%s%n", "{\"type\":\"prompt\"}", "\\ud800",
]


def fuzz_strings(n=300, seed=0):
    rng = random.Random(seed)
    pools = [
        [chr(c) for c in range(0, 0x20)], ["\ud800", "\udbff", "\udc00", "\udfff"],
        ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u200e", "\u200f", "\u202a", "\u202e", "\u2066"],
        [" ", "\u00a0", "\u3000", "\u2028", "\u0085", "\t"], ["\u0301", "\u0489", "\u20dd"],
        list("abc xyz"), ["\U0001F600", "\u4e2d", "\u0639", "\U0001F468\u200d\U0001F469"],
    ]
    out = []
    for _ in range(n):
        k = rng.choice([1, 2, 5, 30, 200, 520])
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(k)))
    return out


@pytest.fixture(scope="module")
def encoders():
    encs = {"tiny": build_text_encoder(get_preset("tiny").text)}
    try:
        encs["toy"] = build_text_encoder(get_preset("toy").text)
    except Exception:  # noqa: BLE001 - the minilm weights package is optional; the byte tokenizer still runs
        pass
    return encs


def test_every_accepted_prompt_encodes_and_the_rest_get_an_error(encoders):
    limits = Limits()
    accepted = refused = 0
    for text in ODD + fuzz_strings():
        wire = json.dumps({"type": "prompt", "text": text, "id": 1})        # what a client sends (ASCII escapes)
        try:
            msg = parse_client_message(wire, limits)
        except ProtocolError as e:
            assert e.code in ("bad_value", "prompt_too_long", "too_large") and e.message and e.id in (1, None)
            assert "\n" not in e.message
            refused += 1
            continue
        assert isinstance(msg, Prompt) and msg.text == msg.text.strip() and msg.text
        assert validate_prompt(msg.text) == msg.text                        # the engine takes it as well
        for name, enc in encoders.items():
            out = enc.encode([msg.text])
            assert out.shape[0] == 1 and torch.isfinite(out).all(), (name, repr(text[:40]))
        accepted += 1
    assert accepted > 50 and refused > 50                                   # the fuzz covered both sides


def test_the_engine_refuses_what_its_encoders_cannot_take():
    for text in ("a \ud800 b", "", "   ", "\u200b\u200d", "\u0301", 5, None):
        with pytest.raises(PromptError):
            validate_prompt(text)
    assert validate_prompt("  a cat \U0001F600 ") == "a cat \U0001F600"


def test_a_refused_prompt_leaves_the_engine_session_playing(tiny_generator):
    s = tiny_generator.open("a red circle")
    try:
        s.next_chunk()
        with pytest.raises(PromptError):
            s.set_prompt("a \ud800 red square")
        assert s.next_chunk().shape[-1] == 3 and s.prompt == "a red circle"
    finally:
        s.close()
