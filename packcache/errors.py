"""The engine's exception tree: every error a user can cause is one of these, with a one-line message.

PackCacheError
 ├── PresetError     unknown preset or an invalid override
 ├── WeightsError    missing files, missing/unexpected/mis-shaped checkpoint keys
 └── PromptError     empty prompt, bad transition, bad blend length
"""


class PackCacheError(Exception):
    """Base of every error the engine raises on purpose."""


class PresetError(PackCacheError, ValueError):
    pass


class WeightsError(PackCacheError):
    pass


class PromptError(PackCacheError, ValueError):
    pass
