"""The engine's exception tree: every error a user can cause is one of these, with a one-line message.

PackCacheError
 ├── PresetError     unknown preset or an invalid override
 ├── WeightsError    missing files, missing/unexpected/mis-shaped checkpoint keys
 ├── PromptError     empty prompt, bad transition, bad blend length
 ├── SnapshotError   a session snapshot that is unreadable, corrupted, newer, or from another model
 └── StartFramesError  a start picture/clip that is not uint8 (T, H, W, 3)
"""


class PackCacheError(Exception):
    """Base of every error the engine raises on purpose."""


class PresetError(PackCacheError, ValueError):
    pass


class WeightsError(PackCacheError):
    pass


class PromptError(PackCacheError, ValueError):
    pass


class SnapshotError(PackCacheError):
    pass


class StartFramesError(PackCacheError, ValueError):
    """A start picture/clip or an image cue that is not uint8 (T, H, W, 3) with T, H, W >= 1."""
