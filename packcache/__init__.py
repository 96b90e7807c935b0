"""packcache: the generation engine (causal Wan DiT + PackForcing packed KV cache). No server code here.

Public face:
    Generator.from_preset(name, device=..., dtype=...) / Generator.from_pretrained(model_dir, checkpoint=None)
    gen.open(prompt, seed=0, cache="packed") -> GenerationSession
    session.next_chunk() -> uint8 (T, H, W, 3); session.set_prompt(text, transition=...); session.stats(); close()
"""

from .errors import PackCacheError, PresetError, PromptError, WeightsError
from .presets import PRESETS, Preset, get_preset
from .prompts import MAX_BLEND_CHUNKS, MAX_PROMPT_CHARS, validate_prompt

__all__ = [
    "Generator", "GenerationSession", "PRESETS", "Preset", "get_preset",
    "PackCacheError", "PresetError", "PromptError", "WeightsError",
    "MAX_BLEND_CHUNKS", "MAX_PROMPT_CHARS", "validate_prompt",
]


def __getattr__(name):  # lazy: importing the package must stay cheap (no torch model code until used)
    if name in ("Generator", "GenerationSession"):
        from . import generator
        return getattr(generator, name)
    raise AttributeError(name)
