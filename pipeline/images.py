"""Image decoding that accepts what real buckets hold and refuses what would hurt the worker.

Every valid image becomes RGB uint8 in its displayed orientation: grayscale (L, LA, 1-bit),
palette (P), RGBA (alpha dropped), CMYK JPEGs, 16-bit PNGs (scaled to 8 bits, not clipped) and
EXIF-rotated photos (rotated as viewers show them; the orientation is reported). The pixel count
is checked from the header before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# We enforce our own limit (below) before decoding; PIL's global guard would reject large images
# even when tiled inference is on.
Image.MAX_IMAGE_PIXELS = None
HARD_MAX_PIXELS = 1_000_000_000  # even with tiling: 1 GP of RGB is 3 GB before inference starts

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageTooLarge(ValueError):
    """Refused before decoding: the header declares more pixels than allowed."""


@dataclass(frozen=True)
class Decoded:
    rgb: np.ndarray  # (H, W, 3) uint8, displayed orientation
    exif_orientation: int | None  # the EXIF orientation tag that was applied (1 = upright), None if absent


def decode_image(data: bytes, *, max_pixels: int | None = None) -> Decoded:
    if not data:
        raise ValueError("empty file (0 bytes)")
    limit = min(max_pixels or HARD_MAX_PIXELS, HARD_MAX_PIXELS)
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if width * height > limit:
            raise ImageTooLarge(
                f"image declares {width}x{height} = {width * height / 1e6:.1f} MP, over the "
                f"{limit / 1e6:.1f} MP limit (--max-pixels; --tile allows larger images)"
            )
        orientation = image.getexif().get(0x0112)
        image.load()
        upright = ImageOps.exif_transpose(image)
        return Decoded(rgb=_to_rgb(upright), exif_orientation=int(orientation) if orientation else None)


def decode_thumbnail(data: bytes, width: int) -> np.ndarray:
    """(h, ``width``, 3) uint8 RGB, upright, decoded reduced where the format allows (JPEG's DCT
    scaling through ``draft``), so a 45 MP photo never becomes a full-size array."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (width, max(1, round(image.height * width / max(1, image.width)))))
        upright = ImageOps.exif_transpose(image)
        rgb = Image.fromarray(_to_rgb(upright)) if upright.mode in _SIXTEEN_BIT else upright.convert("RGB")
        width = min(width, rgb.width)  # never enlarged
        height = max(1, round(rgb.height * width / rgb.width))
        return np.asarray(rgb.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max() > 255 else 255.0
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
