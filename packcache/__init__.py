"""packcache: the generation engine (causal Wan DiT + PackForcing packed KV cache). No server code here.

Public face:
    Generator.from_preset(name, device=..., dtype=...) / Generator.from_pretrained(model_dir, checkpoint=None)
    gen.open(prompt, seed=0, cache="packed", start=None) -> GenerationSession   (start: uint8 picture/clip)
    session.next_chunk() -> uint8 (T, H, W, 3); session.set_prompt(text, transition=..., image=None); session.stats(); close()
    gen.next_chunks([session, ...]) -> per session its frames or its error (sessions batched in one forward pass)
    session.snapshot(path) between chunks; gen.restore(path) -> GenerationSession continuing it
"""

from .errors import PackCacheError, PresetError, PromptError, SnapshotError, StartFramesError, WeightsError
from .presets import PRESETS, Preset, get_preset
from .prompts import MAX_BLEND_CHUNKS, MAX_PROMPT_CHARS, validate_prompt

__all__ = [
    "Generator", "GenerationSession", "PRESETS", "Preset", "get_preset",
    "PackCacheError", "PresetError", "PromptError", "StartFramesError", "WeightsError",
    "SnapshotError", "SnapshotInfo", "snapshot_info", "snapshot_tensors", "restore_with_extra",
    "SNAPSHOT_SUFFIX",
    "MAX_BLEND_CHUNKS", "MAX_PROMPT_CHARS", "validate_prompt",
]


def __getattr__(name):  # lazy: importing the package must stay cheap (no torch model code until used)
    if name in ("Generator", "GenerationSession"):
        from . import generator
        return getattr(generator, name)
    if name in ("SnapshotInfo", "snapshot_info", "snapshot_tensors", "restore_with_extra",
    "SNAPSHOT_SUFFIX", "SNAPSHOT_SUFFIX"):
        from . import snapshot
        return snapshot.SUFFIX if name == "SNAPSHOT_SUFFIX" else getattr(snapshot, name)
    raise AttributeError(name)
