"""Pictures sent by clients, sans-I/O: bytes in, a checked RGB array (and a thumbnail) out, or one `ImageError`.

No sockets, no asyncio, no torch: tested with plain bytes (tests/test_streamer_images.py). The checks run in
order of cost, so a hostile upload is refused before Pillow decodes a single pixel:

    size in bytes -> format from the header (PNG, JPEG, WebP) -> dimensions from the header (zero-sized, too many
    pixels, absurd aspect ratio) -> animation -> full decode (truncated or corrupt data) -> EXIF orientation -> RGB

The picture is then fitted to the stream's size by the same rule as the engine (`packcache.start.fit_frames`):
scale to cover, crop the centre. Fitting here, on a worker thread, keeps the event loop free and lets the
acknowledgement carry a thumbnail of exactly what the stream starts from.
"""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class ImageLimits:
    """What a client's picture may be; `streamer.protocol.Limits` carries the same numbers to the client."""

    max_bytes: int = 640 * 1024
    max_pixels: int = 16_000_000
    max_aspect: float = 4.0


class ImageError(ValueError):
    """A picture that cannot be used; the message is one line for the user. `too_large` marks byte-size refusals."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> uint8 (H, W, 3) RGB, EXIF orientation applied; raises ImageError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError("image data must be bytes")
    size = len(data)
    if size == 0:
        raise ImageError("image is empty (0 bytes)")
    if size > limits.max_bytes:
        raise ImageError(f"image is {size} bytes; the limit is {limits.max_bytes}", too_large=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)), formats=FORMATS)
    except Image.UnidentifiedImageError:
        if _png_size(data) is not None and 0 in _png_size(data):   # Pillow refuses these without saying why
            raise ImageError("image is zero-sized ({}x{})".format(*_png_size(data))) from None
        raise ImageError("not an image Pillow can read as PNG, JPEG or WebP") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image has too many pixels; the limit is {limits.max_pixels}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"image header is corrupt: {exc}") from None
    with img:
        w, h = img.size
        if w == 0 or h == 0:
            raise ImageError(f"image is zero-sized ({w}x{h})")
        if w * h > limits.max_pixels:
            raise ImageError(f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}")
        aspect = max(w / h, h / w)
        if aspect > limits.max_aspect:
            raise ImageError(f"image is {w}x{h}, an aspect ratio of {aspect:.1f}:1; the limit is "
                             f"{limits.max_aspect:g}:1")
        if getattr(img, "is_animated", False) or getattr(img, "n_frames", 1) > 1:
            raise ImageError(f"animated {img.format} images are not accepted; send a single still picture")
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(f"image data is truncated or corrupt ({exc})") from None
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGB", rgba.size, (0, 0, 0))
            img.paste(rgba, mask=rgba.getchannel("A"))   # transparent parts become black
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _png_size(data) -> tuple[int, int] | None:
    """Width and height from a PNG's IHDR chunk, if the bytes start like a PNG."""
    head = bytes(data[:24])
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def fit_image(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale to cover width x height, crop the centre (the engine's rule): uint8 (height, width, 3)."""
    img = Image.fromarray(rgb)
    if img.size == (width, height):
        return rgb
    out = ImageOps.fit(img, (width, height), method=Image.Resampling.BILINEAR,
                       centering=(0.5, 0.5))
    return np.asarray(out, dtype=np.uint8).copy()


def thumbnail_data_url(rgb: np.ndarray, max_side: int = 160) -> str:
    """A small JPEG of the picture as a data: URL, for the acknowledgement (what the stream starts from)."""
    img = Image.fromarray(rgb)
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    elif scale > 1:   # toy streams are 64x64: show them bigger, pixels kept sharp
        k = max(1, int(scale))
        img = img.resize((img.width * k, img.height * k), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
