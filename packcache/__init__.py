"""packcache: the generation engine (causal Wan DiT + PackForcing packed KV cache). No server code here.

Public face:
    Generator.from_preset(name, device=..., dtype=...) / Generator.from_pretrained(model_dir, checkpoint=None)
    gen.open(prompt, seed=0, cache="packed", start=None) -> GenerationSession   (start: uint8 picture/clip)
    session.next_chunk() -> uint8 (T, H, W, 3); session.set_prompt(text, transition=..., image=None); session.stats(); close()
"""

from .errors import PackCacheError, PresetError, PromptError, StartFramesError, WeightsError
from .presets import PRESETS, Preset, get_preset

__all__ = [
    "Generator", "GenerationSession", "PRESETS", "Preset", "get_preset",
    "PackCacheError", "PresetError", "PromptError", "StartFramesError", "WeightsError",
]


def __getattr__(name):  # lazy: importing the package must stay cheap (no torch model code until used)
    if name in ("Generator", "GenerationSession"):
        from . import generator
        return getattr(generator, name)
    raise AttributeError(name)
