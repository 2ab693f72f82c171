"""PASCAL VOC colour palette and mode-P PNG encoding of class-id masks.

A mask PNG stores class ids as pixel values (255 = ignore) and carries the VOC
palette, so image viewers show colours while ``np.array(Image.open(f))`` gives ids.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.io.images import LABEL_FORMATS, open_bounded

IGNORE_INDEX = 255


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard VOC colour map (bit-interleaved), shape (n, 3) uint8; 255 is white-ish."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    # VOC draws the ignore band in a light cream colour.
    palette[IGNORE_INDEX] = (224, 224, 192)
    return palette


_PALETTE_BYTES = voc_palette().tobytes()


def mask_to_png(mask: np.ndarray) -> bytes:
    """Encode an (H, W) integer class-id array as a mode-P PNG with the VOC palette."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    image.putpalette(_PALETTE_BYTES)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def png_to_mask(data: bytes) -> np.ndarray:
    """Decode a label/mask PNG into an (H, W) uint8 array of class ids (palette indices).

    Mode P and L are taken as ids directly; other modes are rejected because converting
    an RGB colour-coded label to ids needs a palette lookup the caller must do on purpose.
    """
    with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"label PNG must be mode P or L (class ids), got mode {image.mode}")
        return np.array(image, dtype=np.uint8)


class LabelMismatch(ValueError):
    """The label's header declares another size than its image's."""


def label_to_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """An untrusted label PNG of exactly ``shape`` (h, w) as class ids. Its format (PNG only), size,
    frame count and mode are checked from the header before any pixel is decoded, so a label can
    never cost more than its image (``images.Refused`` / ``LabelMismatch`` / ``ValueError``)."""
    h, w = shape
    with open_bounded(data, formats=LABEL_FORMATS, max_pixels=None, what="label") as image:
        if image.size != (w, h):
            raise LabelMismatch(f"label size {image.width}x{image.height} differs from image size {w}x{h}")
        if image.mode not in ("P", "L"):
            raise ValueError(f"label PNG must be mode P or L (class ids), got mode {image.mode}")
        return np.array(image, dtype=np.uint8)
