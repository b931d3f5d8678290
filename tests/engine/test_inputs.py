"""Pictures as they arrive in the wild (training uploads today; image inputs next): each one refused with a reason
naming the field, or made plain RGB the way a person would expect, saying what was done."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from cascade_studio.engine import RequestError
from cascade_studio.engine.inputs import cut_to_shape, decode, grow_to_shape


def png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "PNG"), **options)
    return buffer.getvalue()


def refused(data, words: str) -> None:
    with pytest.raises(RequestError) as caught:
        decode(data, "images.0.image")
    assert caught.value.messages[0].startswith("images.0.image: ") and words in caught.value.messages[0]


def test_what_cannot_be_used_is_refused_naming_the_field():
    good = png(Image.new("RGB", (16, 16), "red"))
    refused(b"not a picture at all", "not a picture that can be read")
    refused(good[: len(good) // 2], "not a picture that can be read")  # truncated
    refused("@@@", "not valid base64")
    refused("", "must be a picture")

    # A bomb: a PNG whose header claims 20000 x 20000 pixels, refused before anything is decoded.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def claims(width: int, height: int) -> bytes:
        header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")

    refused(claims(20000, 20000), "too many pixels to decode safely")  # Pillow's own guard, at open
    refused(claims(7000, 6000), "7000x6000 is too large (at most 40 million pixels")  # ours, before decoding


def test_modes_animations_and_rotation_become_plain_rgb_and_say_so():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    picture = decode(png(rgba), "image")
    assert picture.image.mode == "RGB" and picture.image.getpixel((0, 0)) == (255, 255, 255)
    assert "transparency shown over white" in picture.notes[0]

    cmyk = decode(png(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), format="JPEG"), "image")
    assert cmyk.image.mode == "RGB" and cmyk.image.getpixel((0, 0))[0] > 200 and "CMYK" in cmyk.notes[0]

    deep = decode(png(Image.new("I;16", (8, 8), 65535)), "image")
    assert deep.image.mode == "RGB" and deep.image.getpixel((0, 0)) == (255, 255, 255) and "16-bit" in deep.notes[0]

    frames = [Image.new("RGB", (8, 8), c) for c in ("blue", "red")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    gif = decode(buffer.getvalue(), "image")
    assert gif.image.getpixel((0, 0))[2] > 200 and "first frame" in gif.notes[0]

    sideways = Image.new("RGB", (20, 10), "green")
    exif = sideways.getexif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees to show it
    photo = decode(png(sideways, format="JPEG", exif=exif.tobytes()), "image")
    assert photo.image.size == (10, 20) and "EXIF orientation" in photo.notes[0]

    as_text = decode("data:image/png;base64," + base64.b64encode(png(Image.new("RGB", (4, 4)))).decode(), "image")
    assert as_text.image.size == (4, 4) and len(as_text.sha256) == 64


def test_cut_to_shape_and_grow_to_shape_meet_in_the_middle():
    """What a small model that draws squares does with a wide picture: the middle square in, and its picture grown
    back to the wide shape around it, the new sides the colour of its border."""
    wide = Image.new("RGB", (300, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (100, 0, 200, 100))  # a red middle square
    middle = cut_to_shape(wide, 128, 128)
    assert middle.size == (100, 100) and middle.getcolors() == [(10000, (255, 0, 0))]
    drawn = Image.new("RGB", (128, 128), (250, 250, 250))
    drawn.paste((0, 200, 0), (0, 50, 10, 60))  # a speck on the left edge is not streaked across the new side
    grown = grow_to_shape(drawn, 300, 100)
    assert grown.size == (384, 128) and grown.crop((128, 0, 256, 128)).tobytes() == drawn.tobytes()
    assert grown.crop((0, 0, 128, 128)).getcolors() == [(128 * 128, (250, 250, 250))]
    assert grow_to_shape(drawn, 256, 256) is drawn and cut_to_shape(drawn, 512, 512).size == (128, 128)
