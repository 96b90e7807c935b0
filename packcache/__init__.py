"""packcache: the generation engine (causal Wan DiT + PackForcing packed KV cache). No server code here.

Public face:
    Generator.from_preset(name, device=..., dtype=...) / Generator.from_pretrained(model_dir, checkpoint=None)
    gen.open(prompt, seed=0, cache="packed") -> GenerationSession
    session.next_chunk() -> uint8 (T, H, W, 3); session.set_prompt(text, transition=...); session.stats(); close()
    gen.next_chunks([session, ...]) -> per session its frames or its error (sessions batched in one forward pass)
"""

from .errors import PackCacheError, PresetError, PromptError, WeightsError
from .presets import PRESETS, Preset, get_preset

__all__ = [
    "Generator", "GenerationSession", "PRESETS", "Preset", "get_preset",
    "PackCacheError", "PresetError", "PromptError", "WeightsError",
]


def __getattr__(name):  # lazy: importing the package must stay cheap (no torch model code until used)
    if name in ("Generator", "GenerationSession"):
        from . import generator
        return getattr(generator, name)
    raise AttributeError(name)
