"""Pictures given to the studio (image-to-image inputs, masks, image prompts, LoRA training sets): read, checked and
made plain RGB, with a message naming the field for anything that is not a usable picture.

What arrives in the wild: files that are not images, truncated ones, decompression bombs, CMYK, 16-bit and palette
PNGs, pictures with transparency, animated GIFs and WebPs, and phone photos that are stored sideways with an EXIF
rotation. Each is either refused with a reason or converted as a person would expect (transparency over white, the
first frame of an animation, the rotation applied), and what was done is said.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps

from .request import RequestError

MAX_PIXELS = 40_000_000  # a decompression bomb is refused before it is decoded (Pillow's guard, lowered)
MAX_SIDE = 8192
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,")


@dataclass
class Picture:
    image: Image.Image  # RGB (or L for masks)
    sha256: str  # of `png`: its identity in the store and in a request (content-addressed)
    notes: list[str] = field(default_factory=list)  # what was done to it, for the log and the response
    png: bytes = b""  # the picture as stored


def decode(data: bytes | str, field_name: str, mask: bool = False) -> Picture:
    """A picture from bytes (or base64 / a data: URL), or RequestError naming `field_name` and the reason."""
    raw = _bytes(data, field_name)
    notes: list[str] = []
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below, by its size
            opened = Image.open(io.BytesIO(raw))
        with opened:
            if opened.format not in FORMATS:
                raise RequestError(
                    [f"{field_name}: {opened.format} pictures are not taken (PNG, JPEG, WebP, GIF, BMP or TIFF)"]
                )
            if opened.width * opened.height > MAX_PIXELS or max(opened.size) > MAX_SIDE:
                raise RequestError(
                    [
                        f"{field_name}: {opened.width}x{opened.height} is too large (at most "
                        f"{MAX_PIXELS // 1_000_000} million pixels and {MAX_SIDE} on a side)"
                    ]
                )
            if getattr(opened, "n_frames", 1) > 1:
                notes.append(f"{field_name}: an animation of {opened.n_frames} frames; its first frame is used")
            opened.seek(0)
            image = ImageOps.exif_transpose(opened)  # phone photos stored sideways
            if image is not opened and opened.getexif().get(0x0112, 1) != 1:
                notes.append(f"{field_name}: turned upright by its EXIF orientation")
            image.load()
    except RequestError:
        raise
    except Image.DecompressionBombError:
        raise RequestError([f"{field_name}: too many pixels to decode safely (a decompression bomb?)"]) from None
    except Image.UnidentifiedImageError:
        raise RequestError(
            [f"{field_name}: not a picture that can be read (not PNG, JPEG, WebP, GIF, BMP or TIFF data)"]
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated, corrupt
        raise RequestError([f"{field_name}: not a picture that can be read ({str(exc)[:100]})"]) from None
    image = _plain(image, field_name, mask, notes)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Picture(image, hashlib.sha256(buffer.getvalue()).hexdigest(), notes, buffer.getvalue())


def from_image(image: Image.Image, field_name: str, mask: bool = False) -> Picture:
    """A picture made here (a canvas, painted strokes, a render), checked and kept as `decode` keeps any other."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return decode(buffer.getvalue(), field_name, mask=mask)


def _bytes(data: bytes | str, field_name: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if not isinstance(data, str) or not data:
        raise RequestError([f"{field_name}: must be a picture, as base64 text or a data: URL"])
    text = DATA_URL.sub("", data.strip())
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError([f"{field_name}: not valid base64 (a picture as base64 text or a data: URL)"]) from None


def _plain(image: Image.Image, field_name: str, mask: bool, notes: list[str]) -> Image.Image:
    """RGB for pictures, L (white = repaint) for masks, whatever mode the file was in."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit: keep the range, lose the low bits
        notes.append(f"{field_name}: 16-bit, brought to 8 bits")
    if mask:
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            alpha = image.convert("RGBA").getchannel("A")
            # A mask drawn as paint on transparency: what is painted is repainted.
            if alpha.getextrema()[0] < 255:
                return alpha
        return image.convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(f"{field_name}: transparency shown over white")
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "CMYK":
        notes.append(f"{field_name}: CMYK, converted to RGB")
    return image.convert("RGB")


# --- Geometry: the input meets the target size ----------------------------------------------------------------------

FEATHER = 8  # pixels inside the mask over which a repainted area blends into the kept one, at 1024 px (scaled)


def fit(image: Image.Image, width: int, height: int, how: str, fill: int | tuple = (255, 255, 255)) -> Image.Image:
    """The picture at width x height: `crop` (fill, cutting the overflow at the centre), `pad` (fit inside, bars of
    `fill`) or `resize` (stretch). The same call gives a mask the same geometry as its picture."""
    if image.size == (width, height):
        return image
    resample = Image.Resampling.LANCZOS
    if how == "crop":
        return ImageOps.fit(image, (width, height), resample)
    if how == "pad":
        return ImageOps.pad(image, (width, height), resample, color=fill)
    return image.resize((width, height), resample)


def cut_to_shape(image: Image.Image, width: int, height: int) -> Image.Image:
    """The largest middle part of the picture that has the shape of width x height (not its size)."""
    w, h = image.size
    cut_w, cut_h = min(w, round(h * width / height)), min(h, round(w * height / width))
    left, top = (w - cut_w) // 2, (h - cut_h) // 2
    return image.crop((left, top, left + cut_w, top + cut_h))


def grown_size(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    """The size `grow_to_shape` grows a picture of `size` to."""
    w, h = size
    return max(w, round(h * width / height)), max(h, round(w * height / width))


def grow_to_shape(image: Image.Image, width: int, height: int) -> Image.Image:
    """The picture grown to the shape of width x height (not to its size), centred as `cut_to_shape` cuts, the new
    sides the median colour of its border: a small model's plain background carried out to the shape asked for
    (repeating the edge pixels instead streaks any speck on the edge across the new part)."""
    (w, h), (grown_w, grown_h) = image.size, grown_size(image.size, width, height)
    if (grown_w, grown_h) == (w, h):
        return image
    pixels = np.asarray(image.convert("RGB"))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    grown = Image.new("RGB", (grown_w, grown_h), tuple(np.median(border, axis=0).round().astype(int).tolist()))
    grown.paste(image, ((grown_w - w) // 2, (grown_h - h) // 2))
    return grown


def fit_note(size: tuple[int, int], width: int, height: int, how: str, field_name: str) -> str | None:
    """What fitting did, in words, when it cut, padded or stretched (not for a plain scale to the same shape)."""
    w, h = size
    if abs(w / h - width / height) < 0.01:
        return None
    done = {"crop": "cropped at the centre", "pad": "padded", "resize": "stretched"}[how]
    return f"{field_name}: {w}x{h} {done} to {width}x{height} (fit={how})"


SIDES = ("left", "right", "top", "bottom")  # the sides outpainting grows a canvas on


def outpaint(image: Image.Image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0):
    """A bigger canvas and its mask: the picture in place, the new border (white in the mask) filled by repeating
    the picture's edge, a start the prior repaints more easily than a flat colour."""
    pixels = np.pad(np.asarray(image.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    canvas = Image.fromarray(pixels)
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return canvas, mask


def paste_back(made: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """The made picture inside the mask, the original's own pixels outside it; the seam is feathered INSIDE the
    mask, so every pixel the mask keeps is the original's exactly."""
    radius = max(1, round(FEATHER * max(made.size) / 1024))
    keep = mask.point(lambda v: 255 if v < 128 else 0)
    grown = keep.filter(ImageFilter.MaxFilter(2 * radius + 1)).filter(ImageFilter.GaussianBlur(radius))
    return Image.composite(original, made, ImageChops.lighter(keep, grown))
