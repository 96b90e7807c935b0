"""What a prompt may be: the engine's rules and limits, with no torch, so the server's protocol imports them.

The engine refuses (with `PromptError`) every string its text encoders cannot take: anything but `str`, text with
an unpaired surrogate (JSON's "\\ud800" escape decodes to one; UTF-8 cannot encode it and the tokenizers raise
UnicodeEncodeError or TypeError deep inside generation), and text with nothing visible in it (only whitespace,
zero-width or combining characters). Everything else encodes: tests/test_prompts.py fuzzes odd strings through
the real tokenizers. The server's protocol adds stricter, display-related rules on top (control characters,
bidi overrides) and a smaller length limit; `streamer.protocol.Limits` checks that its limits fit inside these.
"""

from __future__ import annotations

import unicodedata

from .errors import PromptError

MAX_PROMPT_CHARS = 2000   # far past any text encoder's token window (umT5: 512 tokens); bounds memory per prompt
MAX_BLEND_CHUNKS = 64     # a blend interpolates text embeddings over this many chunks at most (~48 s of video)


def visible(ch: str) -> bool:
    """A character that shows: a letter, digit, punctuation or symbol (not a space, mark, format or control)."""
    return unicodedata.category(ch)[0] in "LNPS"


def validate_prompt(text: object, max_chars: int = MAX_PROMPT_CHARS, allow_empty: bool = False) -> str:
    """The stripped prompt, or PromptError saying what is wrong with it (one line). `allow_empty`: a picture is
    given, and may steer the stream alone (the empty prompt)."""
    if not isinstance(text, str):
        raise PromptError("prompt must be a string")
    for pos, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            raise PromptError(f"prompt contains an unpaired surrogate U+{ord(ch):04X} at position {pos} "
                              "(not valid Unicode text)")
    text = text.strip()
    if not text:
        if allow_empty:
            return text
        raise PromptError("prompt is empty (it may be empty only when a start image is given)")
    if len(text) > max_chars:
        raise PromptError(f"prompt is longer than {max_chars} characters")
    if not any(visible(ch) for ch in text):
        raise PromptError("prompt has no visible characters (only spaces, zero-width or combining marks)")
    return text


def validate_blend_chunks(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BLEND_CHUNKS:
        raise PromptError(f"blend_chunks must be an integer from 1 to {MAX_BLEND_CHUNKS}")
    return n
