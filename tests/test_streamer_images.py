"""Pictures from clients (streamer/images.py) and the image message (streamer/protocol.py), with plain bytes."""

import base64
import io
import json
import zlib

import numpy as np
import pytest
from PIL import Image

from streamer import protocol as P
from streamer.images import ImageError, ImageLimits, decode_image, fit_image, thumbnail_data_url


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(w=40, h=30, color=(200, 30, 40)) -> Image.Image:
    return Image.new("RGB", (w, h), color)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_each_format_to_rgb_uint8(fmt):
    out = decode_image(encode(rgb(), fmt))
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    assert abs(int(out[15, 20, 0]) - 200) < 12 and out[15, 20, 1] < 60


def test_transparency_becomes_black_and_grey_becomes_rgb():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img.putpixel((0, 0), (0, 255, 0, 255))
    out = decode_image(encode(img, "PNG"))
    assert out.shape == (8, 8, 3) and out[4, 4].tolist() == [0, 0, 0] and out[0, 0].tolist() == [0, 255, 0]
    assert decode_image(encode(Image.new("L", (5, 5), 90), "PNG")).shape == (5, 5, 3)


def test_exif_orientation_is_applied():
    img = rgb(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6                         # rotate 90 degrees clockwise on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.shape == (40, 20, 3)


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"hello, this is not a picture at all", "not an image"),
    (encode(rgb(), "GIF"), "not an image"),                       # a format we do not take
])
def test_not_an_image(data, words):
    with pytest.raises(ImageError, match=words):
        decode_image(data)


def test_truncated():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "PNG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(data[: len(data) // 2])


def test_too_large_in_bytes_pixels_and_aspect():
    with pytest.raises(ImageError, match="bytes; the limit") as e:
        decode_image(encode(rgb(), "PNG"), ImageLimits(max_bytes=50))
    assert e.value.too_large
    with pytest.raises(ImageError, match="pixels; the limit"):
        decode_image(encode(rgb(200, 100), "PNG"), ImageLimits(max_pixels=10_000))
    with pytest.raises(ImageError, match="aspect ratio of 5.0:1"):
        decode_image(encode(rgb(500, 100), "PNG"))


def png_header(w: int, h: int) -> bytes:
    """A PNG that only declares its size (no pixel data): what a decompression bomb looks like from outside."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_pixel_limit_and_zero_size_are_checked_before_decoding():
    with pytest.raises(ImageError, match="pixels; the limit is"):
        decode_image(png_header(20000, 20000))
    with pytest.raises(ImageError, match="zero-sized \(0x10\)"):
        decode_image(png_header(0, 10))


def test_animated_is_refused():
    frames = [rgb(color=(255, 0, 0)), rgb(color=(0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(ImageError, match="animated WEBP"):
        decode_image(buf.getvalue())
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(ImageError, match="animated PNG"):
        decode_image(buf.getvalue())


def test_fit_covers_and_crops_the_centre():
    a = np.zeros((40, 120, 3), np.uint8)
    a[:, 40:80] = 255                                  # a white band in the middle third
    out = fit_image(a, 64, 64)                         # scale 1.6 -> 64x192, keep the middle 64 columns
    assert out.shape == (64, 64, 3)
    assert out[32, 32].tolist() == [255, 255, 255] and out[32, 0].min() > 200 and out[32, 63].min() > 200
    assert fit_image(a, 120, 40) is a


def test_thumbnail_is_a_jpeg_data_url():
    url = thumbnail_data_url(np.zeros((64, 64, 3), np.uint8))
    assert url.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.size == (128, 128)


# ---- the protocol message

def test_image_message_json_and_binary():
    png = encode(rgb(), "PNG")
    b64 = base64.b64encode(png).decode()
    msg = P.parse_client_message(json.dumps({"type": "image", "data": b64, "text": " a cat ", "id": 3}))
    assert isinstance(msg, P.ImageCue) and msg.data == png and msg.text == "a cat" and msg.id == 3
    msg = P.parse_client_message(json.dumps({"type": "image", "data": "data:image/png;base64," + b64}))
    assert msg.data == png and msg.text == "" and msg.transition == "cut"
    msg = P.parse_client_message(png)
    assert isinstance(msg, P.ImageCue) and msg.data == png


def test_image_message_errors():
    lim = P.Limits()
    with pytest.raises(P.ProtocolError) as e:
        P.parse_client_message(json.dumps({"type": "image", "data": "not base64!!"}))
    assert e.value.code == "bad_value"
    with pytest.raises(P.ProtocolError) as e:
        P.parse_client_message(json.dumps({"type": "image"}))
    assert e.value.code == "missing_field"
    with pytest.raises(P.ProtocolError) as e:
        P.parse_client_message(b"")
    assert e.value.code == "bad_image"
    big = b"x" * (lim.max_image_bytes + 1)
    with pytest.raises(P.ProtocolError) as e:
        P.parse_client_message(big)
    assert e.value.code == "too_large"
    with pytest.raises(P.ProtocolError) as e:
        P.parse_client_message(json.dumps({"type": "image", "data": base64.b64encode(big).decode()}))
    assert e.value.code == "too_large"
    # a large picture is fine, but only in an image message: other messages keep max_message_bytes
    ok = base64.b64encode(b"x" * lim.max_image_bytes).decode()
    assert len(P.parse_client_message(json.dumps({"type": "image", "data": ok})).data) == lim.max_image_bytes
    with pytest.raises(P.ProtocolError) as e:
        P.parse_client_message(json.dumps({"type": "prompt", "text": "a", "pad": ok}))
    assert e.value.code == "too_large"
    # the largest image message still fits under the websocket's hard cap
    assert P._image_message_bytes(lim) < lim.hard_max_message_bytes


def test_images_count_against_the_prompt_rate():
    lim = P.Limits()
    gate = P.MessageGate(lim, now=0.0)
    cue = P.ImageCue(data=b"x")
    for _ in range(lim.prompt_burst):
        gate.check(cue, 0.0)
    with pytest.raises(P.ProtocolError) as e:
        gate.check(cue, 0.0)
    assert e.value.code == "rate_limited"
