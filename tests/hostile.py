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

from pipeline.demo.synthetic import SceneSpec, make_scene
from pipeline.io.palette import mask_to_png


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


def _tiff_header_bomb(width: int, height: int) -> bytes:
    """A little-endian TIFF whose only IFD declares width x height 8-bit gray pixels over 16 bytes."""
    entries = [
        (256, 4, width),  # ImageWidth, LONG
        (257, 4, height),  # ImageLength
        (258, 3, 8),  # BitsPerSample, SHORT
        (259, 3, 1),  # Compression: none
        (262, 3, 1),  # Photometric: min-is-black
        (273, 4, 0),  # StripOffsets (patched below)
        (277, 3, 1),  # SamplesPerPixel
        (278, 4, height),  # RowsPerStrip
        (279, 4, 16),  # StripByteCounts
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    data_at = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_at if tag == 273 else value
        ifd += struct.pack("<HHI", tag, kind, 1) + (
            struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        )
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\x00" * 16


def _jpeg_declaring(good_jpeg: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 frame header is patched to declare width x height."""
    at = good_jpeg.index(b"\xff\xc0") + 5  # marker, length (2), precision (1), then height, width
    return good_jpeg[:at] + struct.pack(">HH", height, width) + good_jpeg[at + 4 :]


def _bmp_declaring(width: int, height: int) -> bytes:
    """A 24-bit BMP header declaring width x height, with 16 bytes of pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 16, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + b"\x00" * 16


def ico_holding_png(png: bytes) -> bytes:
    """An ICO whose one entry is a PNG (Pillow's ICO plugin decodes it inside Image.open)."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def _frames(rgb: np.ndarray, count: int, fmt: str, **kwargs) -> bytes:
    """``count`` distinct frames of ``rgb`` as one animated/multi-page file of ``fmt``."""
    frames = [Image.fromarray(np.roll(rgb, 7 * i, axis=1)) for i in range(count)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], **kwargs)
    return buffer.getvalue()


def _exif_orientation_long(good_jpeg: bytes, value: int, kind: int = 4) -> bytes:
    """The JPEG with an APP1 EXIF block whose Orientation tag has type ``kind`` (4 = LONG)."""
    entry = struct.pack("<HHI", 0x0112, kind, 1) + struct.pack("<I", value)
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + entry + struct.pack("<I", 0)
    app1 = b"Exif\x00\x00" + tiff
    return good_jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + good_jpeg[2:]


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
    # Round 2. Decoding is allow-listed (JPEG/PNG/BMP/WebP/TIFF) and bounded before any pixel.
    put("ico-holding-png-bomb.jpg", ico_holding_png(decompression_bomb_png(60_000, 60_000)), ("decode", "accepted"))
    gif = io.BytesIO()
    photo.save(gif, format="GIF")
    put("gif-named.png", gif.getvalue(), ("decode", "accepted formats"))
    put("tiff-header-bomb.tif", _tiff_header_bomb(100_000, 100_000), ("decode", "limit"))
    put("tiff-60mp.tiff", _tiff_header_bomb(10_000, 6_000), ("decode", "MP limit"))
    put("jpeg-sof-bomb.jpg", _jpeg_declaring(good_jpeg, 60_000, 60_000), ("decode", "limit"))
    put("jpeg-sof-60mp.jpg", _jpeg_declaring(good_jpeg, 10_000, 6_000), ("decode", "MP limit"))
    put("bmp-header-bomb.bmp", _bmp_declaring(50_000, 50_000), ("decode", "limit"))
    put("apng-40-frames.png", _frames(rgb, 40, "PNG"), ("decode", "frame limit"))
    put("tiff-40-pages.tif", _frames(rgb, 40, "TIFF"), ("decode", "frame limit"))
    put("webp-40-frames.webp", _frames(rgb, 40, "WEBP", lossless=True), ("decode", "frame limit"))
    put("apng-2-frames.png", _frames(rgb, 2, "PNG"), ("mask", None))
    # Labels: PNG only, decoded only once their header matches the image (size, frames, mode).
    put("label-png-bomb.jpg", good_jpeg, ("mask", "limit"), decompression_bomb_png())
    put("label-png-400mp.jpg", good_jpeg, ("mask", "differs from image size"), decompression_bomb_png(20_000, 20_000))
    put("label-apng-frames.jpg", good_jpeg, ("mask", "frame limit"), _frames(label, 40, "PNG"))
    put("label-ico.jpg", good_jpeg, ("mask", "cannot decode label"), ico_holding_png(mask_to_png(label)))
    put("label-tiff.jpg", good_jpeg, ("mask", "cannot decode label"), _frames(label, 1, "TIFF"))
    # Metadata that cannot be stored is null, never its batch's failure (int32 column, LONG tag).
    put("exif-orientation-long-70000.jpg", _exif_orientation_long(good_jpeg, 70_000), ("mask", None))
    put("exif-orientation-long-2pow32.jpg", _exif_orientation_long(good_jpeg, 2**32 - 1), ("mask", None))
    put("exif-orientation-9.jpg", _exif_orientation_long(good_jpeg, 9, kind=3), ("mask", None))
    # A key names exactly one object: fsspec's URL syntax inside a key is part of the name.
    html = b"<!doctype html><title>not the neighbour</title>"
    put("shadow.jpg", good_jpeg, ("mask", None))
    put("shadow.jpg?versionId=null.jpg", html, ("decode", "not a readable image"))
    put("chain::shadow.jpg", html, ("decode", "not a readable image"))
    put("simplecache::s3/shadow.jpg", html, ("decode", "not a readable image"))
    return expected


# A local folder: what a POSIX listing may meet (the object store has none of these).
NOT_LISTED = ("fifo.jpg", "zero-link.jpg", "outside-link.jpg", "dir.jpg/", "dangling-link.jpg")


def write_local_hostile_folder(root: Path, *, outside: Path) -> dict[str, tuple[str, str | None]]:
    """``root``/images (no labels) with FIFOs, device and out-of-root links, a non-UTF-8 name and a
    sparse object over the size limit; returns {key: expected} for the keys that must be listed
    (``NOT_LISTED`` must not be)."""
    import os

    from pipeline.io.images import MAX_IMAGE_BYTES

    images = root / "images"
    images.mkdir(parents=True)
    rgb, _ = make_scene(2_000_101, SceneSpec(height=64, width=80))
    good = _jpeg_bytes(Image.fromarray(rgb))
    (images / "ok.jpg").write_bytes(good)
    os.mkfifo(images / "fifo.jpg")
    (images / "zero-link.jpg").symlink_to("/dev/zero")
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.jpg").write_bytes(good)
    (images / "outside-link.jpg").symlink_to(outside / "secret.jpg")
    (images / "dangling-link.jpg").symlink_to(images / "nowhere.jpg")
    (images / "dir.jpg").mkdir()
    (images / "inside-link.jpg").symlink_to(images / "ok.jpg")
    with open(images / "sparse-over-limit.jpg", "wb") as f:  # no disk blocks: a hole of limit + 1 bytes
        f.truncate(MAX_IMAGE_BYTES + 1)
    with open(os.path.join(os.fsencode(images), b"latin1-\xe9t\xe9.jpg"), "wb") as f:
        f.write(good)
    return {
        "ok.jpg": ("mask", None),
        "inside-link.jpg": ("mask", None),
        "sparse-over-limit.jpg": ("decode", "object size limit"),
        "latin1-\\xe9t\\xe9.jpg": ("read", "not valid UTF-8"),
    }


_ONE = """
import resource, sys, numpy as np
from pipeline.io.decode import decode_batch
from pipeline.io.storage import Locator
images, labels, key = sys.argv[1], sys.argv[2] or None, sys.argv[3]
locator = Locator(images, labels)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
batch = {"key": np.array([key], dtype=object), "uri": np.array([locator.image_uri(key)], dtype=object),
         "label_uri": np.array([locator.label_uri(key)], dtype=object)}
out = decode_batch(batch, storage_options={}, num_classes=21, max_pixels=50_000_000, locator=locator)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
row = (out["error_stage"][0] or "mask") + " | " + (out["error_message"][0] or out["label_error"][0] or "")
print(f"{before / 1024:.1f}\\t{after / 1024:.1f}\\t{row[:150]}")
"""


def peak_rss_table(root: Path) -> list[tuple[str, str, float, float, str]]:
    """For every hostile input: (class folder, key, peak RSS in MiB before and after reading and
    decoding it, the row it became), each in a fresh process: the process that refused it."""
    import subprocess
    import sys

    write_hostile_bucket(root / "s3")
    expected_local = write_local_hostile_folder(root / "local", outside=root / "outside")
    cases = [
        ("bucket", str(root / "s3" / "images"), str(root / "s3" / "labels"), k) for k in sorted(_keys(root / "s3"))
    ]
    cases += [("local", str(root / "local" / "images"), "", k) for k in sorted(expected_local)]
    rows = []
    for kind, images, labels, key in cases:
        key_arg = key  # escaped keys too are passed as listed
        out = subprocess.run(
            [sys.executable, "-c", _ONE, images, labels, key_arg], capture_output=True, text=True, timeout=300
        )
        line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else f"0\t0\tFAILED {out.stderr[-200:]}"
        before, after, row = line.split("\t", 2)
        rows.append((kind, key, float(before), float(after), row))
    return rows


def _keys(root: Path) -> list[str]:
    from pipeline.io.storage import list_inputs

    return list_inputs(str(root / "images"), None).keys.to_pylist()


if __name__ == "__main__":  # python -m tests.hostile DIR: the per-input peak RSS table (docs/faults.md)
    import sys

    for kind, key, before, after, row in peak_rss_table(Path(sys.argv[1])):
        print(f"| {kind} | `{key}` | {before:.0f} | {after:.0f} | {row} |")
