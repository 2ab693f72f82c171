"""Generator of hostile inputs: what a nightly job meets in a real bucket.

``write_hostile_bucket(root)`` writes ``images/`` and ``labels/`` and returns {key: expected},
where expected is ("mask", None) for inputs that must be segmented or (stage, message_part) for
inputs that must become exactly one error row.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.palette import mask_to_png
from pipeline.synthetic import SceneSpec, make_scene


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny valid-looking PNG whose header declares width x height RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def write_hostile_bucket(root: Path) -> dict[str, tuple[str, str | None]]:
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    rgb, label = make_scene(2_000_100, SceneSpec(height=96, width=128))
    photo = Image.fromarray(rgb)
    expected: dict[str, tuple[str, str | None]] = {}

    def put(key: str, data: bytes, outcome: tuple[str, str | None], label_data: bytes | None = None):
        (images / key).parent.mkdir(parents=True, exist_ok=True)
        (images / key).write_bytes(data)
        if label_data is not None:
            label_key = key.rsplit(".", 1)[0] + ".png"
            (labels / label_key).parent.mkdir(parents=True, exist_ok=True)
            (labels / label_key).write_bytes(label_data)
        expected[key] = outcome

    good_jpeg = _jpeg_bytes(photo)
    put("ok.jpg", good_jpeg, ("mask", None), mask_to_png(label))
    put("zero-byte.jpg", b"", ("decode", "empty file"))
    put("truncated.jpg", good_jpeg[: len(good_jpeg) // 2], ("decode", "truncated"))
    good_png = _png_bytes(photo)
    put("truncated.png", good_png[: len(good_png) // 3], ("decode", ""))
    put("html-named.jpg", b"<!doctype html><html><body>404 Not Found</body></html>", ("decode", "not a readable image"))
    put("mode-L.png", _png_bytes(photo.convert("L")), ("mask", None))
    put("mode-LA.png", _png_bytes(photo.convert("LA")), ("mask", None))
    put("mode-P.png", _png_bytes(photo.convert("P", palette=Image.ADAPTIVE)), ("mask", None))
    put("mode-RGBA.png", _png_bytes(photo.convert("RGBA")), ("mask", None))
    put("mode-CMYK.jpg", _jpeg_bytes(photo.convert("CMYK")), ("mask", None))
    sixteen = Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    put("mode-I16.png", _png_bytes(sixteen), ("mask", None))
    put("mode-1.png", _png_bytes(photo.convert("1")), ("mask", None))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    put("exif-rotated.jpg", _jpeg_bytes(photo, exif=exif.tobytes()), ("mask", None))
    put("bomb.png", decompression_bomb_png(), ("decode", "refused before decoding"))
    put("tiny-1x1.png", _png_bytes(Image.new("RGB", (1, 1), (200, 30, 30))), ("mask", None))
    put("elongated-10000x8.png", _png_bytes(Image.fromarray(np.tile(rgb[:8, :125], (1, 80, 1)))), ("mask", None))
    # A bad label is a QA artefact, not a reason to lose the mask: segmented, label_error says why.
    put("label-wrong-size.jpg", good_jpeg, ("mask", "differs from image size"), mask_to_png(label[:50, :60]))
    bad_ids = label.copy()
    bad_ids[:5, :5] = 77
    put("label-bad-ids.jpg", good_jpeg, ("mask", "outside"), mask_to_png(bad_ids))
    put("label-not-png.jpg", good_jpeg, ("mask", "cannot decode label"), b"not a png at all")
    put("dir with space/ünïcødé file.jpg", good_jpeg, ("mask", None))
    put("odd#hash?query.jpg", good_jpeg, ("mask", None))
    return expected
