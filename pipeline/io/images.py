"""Image decoding that accepts what real buckets hold and refuses what would hurt the worker.

Every valid image becomes RGB uint8 in its displayed orientation: grayscale (L, LA, 1-bit),
palette (P), RGBA (alpha dropped), CMYK JPEGs, 16-bit PNGs (scaled to 8 bits, not clipped) and
EXIF-rotated photos (rotated as viewers show them; the orientation is reported).

Decoding is allow-listed and bounded: images are opened only as ``IMAGE_FORMATS``, labels only as
PNG, and the object size (read at most limit+1 bytes, pipeline/io/storage.py), the declared pixel
count and the frame count are checked from the header before any pixel is decoded, so a bomb costs
nothing. Pillow's own guard stays on at the project's hard limit, for anything decoded before our
check (``DecompressionBombError`` is a refusal like ours).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image

HARD_MAX_PIXELS = 1_000_000_000  # even with tiling: 1 GP of RGB is 3 GB before inference starts
# Pillow refuses over 2x this itself (and warns over 1x); our own check refuses over 1x first.
Image.MAX_IMAGE_PIXELS = HARD_MAX_PIXELS
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF")  # containers that decode inside open() (ICO...) are out
LABEL_FORMATS = ("PNG",)
MAX_FRAMES = 16  # only the first frame is used; a file declaring more is refused unread
MAX_IMAGE_BYTES = 256 * 2**20  # an object larger than this is refused after reading at most this + 1 bytes
MAX_LABEL_BYTES = 64 * 2**20
THUMB_WIDTH = 240  # the report's thumbnails (made by the decode worker, stored with the row)
THUMB_QUALITY = 70
THUMB_METHOD = 0  # WebP's least effort: every image pays for it (docs/benchmarks.md, "Design choices")

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class Refused(ValueError):
    """Refused before any pixel was decoded; the message names the limit."""


class ImageTooLarge(Refused):
    """Refused before decoding: the header declares more pixels than allowed."""


@dataclass(frozen=True)
class Decoded:
    rgb: np.ndarray  # (H, W, 3) uint8, displayed orientation
    exif_orientation: int | None  # the EXIF orientation tag that was applied (1-8), None if absent or invalid


@contextmanager
def open_bounded(
    data: bytes, *, formats: tuple[str, ...], max_pixels: int | None, what: str = "image"
) -> Iterator[Image.Image]:
    """The opened (not decoded) image, after the format, pixel and frame checks; ``Refused`` otherwise."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    limit = min(max_pixels or HARD_MAX_PIXELS, HARD_MAX_PIXELS)
    try:
        image = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(
            f"{what} is over Pillow's decompression-bomb limit ({HARD_MAX_PIXELS / 1e6:.0f} MP): {exc}"
        ) from exc
    with image:
        width, height = image.size
        if width * height > limit:
            raise ImageTooLarge(
                f"{what} declares {width}x{height} = {width * height / 1e6:.1f} MP, over the "
                f"{limit / 1e6:.1f} MP limit (--max-pixels; --tile allows larger images)"
            )
        frames = getattr(image, "n_frames", 1)
        if frames > MAX_FRAMES:
            raise Refused(f"{what} declares {frames} frames, over the {MAX_FRAMES}-frame limit")
        yield image


def orientation_of(image: Image.Image) -> int | None:
    """The EXIF orientation if it is a valid one (an int in 1-8), else None: any other value,
    however typed, is ignored rather than stored (it must never fail its batch's table)."""
    try:
        value = image.getexif().get(_ORIENTATION)
    except Exception:  # malformed EXIF: the pixels are still fine
        return None
    return value if type(value) is int and 1 <= value <= 8 else None


def decode_image(data: bytes, *, max_pixels: int | None = None) -> Decoded:
    with open_bounded(data, formats=IMAGE_FORMATS, max_pixels=max_pixels) as image:
        orientation = orientation_of(image)
        image.load()
        upright = image.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else image
        return Decoded(rgb=_to_rgb(upright), exif_orientation=orientation)


def thumbnail(rgb: np.ndarray, width: int) -> np.ndarray:
    """(h, ``width``, 3) uint8 RGB: ``rgb`` at ``width`` (never enlarged), same aspect."""
    height, width = thumbnail_size(rgb.shape, width)
    if (height, width) == rgb.shape[:2]:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)


def encode_thumbnail(rgb: np.ndarray, width: int = THUMB_WIDTH) -> bytes:
    """The report's picture of ``rgb``: WebP, at most ``width`` wide (a few KB, stored with the row)."""
    buffer = io.BytesIO()
    Image.fromarray(thumbnail(rgb, width)).save(buffer, format="WEBP", quality=THUMB_QUALITY, method=THUMB_METHOD)
    return buffer.getvalue()


def thumbnail_size(shape: tuple[int, ...], width: int = THUMB_WIDTH) -> tuple[int, int]:
    """(h, w) of the thumbnail of an image of ``shape``: at most ``width`` wide, same aspect."""
    w = min(width, shape[1])
    return max(1, round(shape[0] * w / shape[1])), w


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max() > 255 else 255.0
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
