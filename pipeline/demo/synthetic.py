"""A deterministic synthetic segmentation dataset (scenes + VOC-style labels).

Scenes are textured, noisy backgrounds with several objects of five shape classes. Objects vary
in size (a few pixels to half the image), colour (per-class hue priors that overlap with each
other and with the background), texture and orientation; they are drawn antialiased (4x
supersampled) and may occlude each other. Labels follow PASCAL VOC: mode-P PNG, the VOC palette,
class id per pixel, and a 255 "ignore" band along every object border.

Everything is a pure function of the seed, so the demo bucket, the training set and the
held-out split can be regenerated bit-for-bit.
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.io.palette import IGNORE_INDEX, mask_to_png

CLASS_NAMES: tuple[str, ...] = ("background", "disc", "box", "triangle", "ring", "bar")

# Hue centres per object class; the spreads below make neighbours overlap, so colour alone is
# not enough and the network has to use shape and context.
_HUE_CENTRES = {1: 0.02, 2: 0.14, 3: 0.33, 4: 0.55, 5: 0.75}
_HUE_SPREAD = 0.07
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneSpec:
    """Size and content ranges of generated scenes."""

    height: int = 240
    width: int = 320
    min_objects: int = 2
    max_objects: int = 6
    min_size_frac: float = 0.06  # object radius as a fraction of the shorter side
    max_size_frac: float = 0.35
    noise_sigma: float = 10.0
    ignore_band: int = 3  # odd filter size; 3 gives a 2-pixel band on each boundary


def _smooth_field(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency random field in [0, 1], shape (h, w), by bicubic upsampling of noise."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _random_colour(rng: np.random.Generator, hue: float | None = None) -> np.ndarray:
    if hue is None:
        hue = rng.random()
    hue = (hue + rng.normal(0.0, _HUE_SPREAD)) % 1.0
    sat = rng.uniform(0.45, 0.95)
    val = rng.uniform(0.45, 0.95)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Two random colours blended by a smooth field, plus oriented stripes."""
    a, b = _random_colour(rng), _random_colour(rng)
    field = _smooth_field(rng, h, w, cells=int(rng.integers(3, 8)))[..., None]
    base = a * field + b * (1.0 - field)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(6.0, 30.0)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    base += rng.uniform(5.0, 25.0) * stripes[..., None]
    return base


def _shape_alpha(rng: np.random.Generator, cls: int, h: int, w: int, spec: SceneSpec) -> np.ndarray:
    """Antialiased coverage in [0, 1] of one object of class ``cls``."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(canvas)
    short = min(h, w)
    r = rng.uniform(spec.min_size_frac, spec.max_size_frac) * short
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    theta = rng.uniform(0, 2 * math.pi)

    def poly(points):
        draw.polygon([(x * s, y * s) for x, y in points], fill=255)

    if cls == 1:  # disc (slightly elliptic)
        e = rng.uniform(0.8, 1.0)
        draw.ellipse([(cx - r) * s, (cy - r * e) * s, (cx + r) * s, (cy + r * e) * s], fill=255)
    elif cls == 2:  # box
        a = r * rng.uniform(0.7, 1.0)
        bw = r * rng.uniform(0.7, 1.0)
        corners = [(-a, -bw), (a, -bw), (a, bw), (-a, bw)]
        poly([_rot(x, y, theta, cx, cy) for x, y in corners])
    elif cls == 3:  # triangle
        poly([_rot(r * math.cos(t), r * math.sin(t), theta, cx, cy) for t in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)])
    elif cls == 4:  # ring
        inner = r * rng.uniform(0.45, 0.65)
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
        draw.ellipse([(cx - inner) * s, (cy - inner) * s, (cx + inner) * s, (cy + inner) * s], fill=0)
    elif cls == 5:  # bar: long thin rotated rectangle
        length, half = r * 1.6, max(2.0, r * rng.uniform(0.12, 0.25))
        corners = [(-length, -half), (length, -half), (length, half), (-length, half)]
        poly([_rot(x, y, theta, cx, cy) for x, y in corners])
    else:
        raise ValueError(f"unknown class {cls}")
    small = canvas.resize((w, h), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _rot(x: float, y: float, theta: float, cx: float, cy: float) -> tuple[float, float]:
    c, s = math.cos(theta), math.sin(theta)
    return (cx + x * c - y * s, cy + x * s + y * c)


def _object_texture(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    colour = _random_colour(rng, _HUE_CENTRES[cls])
    shade = 0.75 + 0.5 * _smooth_field(rng, h, w, cells=4)[..., None]
    tex = colour * shade
    if rng.random() < 0.5:  # fine dots/stripes so texture is a weak, not a decisive, cue
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        period = rng.uniform(3.0, 9.0)
        tex += (
            rng.uniform(5, 20)
            * np.sin(xx * 2 * math.pi / period)[..., None]
            * np.sin(yy * 2 * math.pi / period)[..., None]
        )
    return tex


def make_scene(seed: int, spec: SceneSpec = SceneSpec()) -> tuple[np.ndarray, np.ndarray]:
    """Return (image uint8 HxWx3, label uint8 HxW with class ids and 255 borders)."""
    rng = np.random.default_rng(seed)
    h, w = spec.height, spec.width
    image = _background(rng, h, w)
    label = np.zeros((h, w), dtype=np.uint8)

    # Background distractors: blobs in object-like colours that are still background.
    for _ in range(int(rng.integers(0, 3))):
        blob = _smooth_field(rng, h, w, cells=int(rng.integers(4, 9)))
        alpha = np.clip((blob - 0.75) * 6.0, 0.0, 1.0)[..., None]
        colour = _random_colour(rng, _HUE_CENTRES[int(rng.integers(1, 6))])
        image = image * (1 - alpha) + colour * alpha

    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        alpha = _shape_alpha(rng, cls, h, w, spec)
        if alpha.max() < 0.5:
            continue  # fell off the canvas
        tex = _object_texture(rng, cls, h, w)
        a = alpha[..., None]
        image = image * (1 - a) + tex * a
        label[alpha >= 0.5] = cls

    image += rng.normal(0.0, spec.noise_sigma, image.shape)
    image_u8 = np.clip(image, 0, 255).astype(np.uint8)
    blur = rng.uniform(0.0, 0.8)
    if blur > 0.2:
        image_u8 = np.asarray(Image.fromarray(image_u8).filter(ImageFilter.GaussianBlur(blur)))

    if spec.ignore_band:
        lab = Image.fromarray(label)
        grown = np.asarray(lab.filter(ImageFilter.MaxFilter(spec.ignore_band)))
        shrunk = np.asarray(lab.filter(ImageFilter.MinFilter(spec.ignore_band)))
        label = label.copy()
        label[grown != shrunk] = IGNORE_INDEX
    return image_u8, label


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def varied_spec(seed: int, spec: SceneSpec = SceneSpec()) -> SceneSpec:
    """``spec`` with a size drawn from the seed (160..320 x 200..400), as in real mixed buckets."""
    size_rng = np.random.default_rng(10_000_000 + seed)
    return replace(spec, height=int(size_rng.integers(160, 321)), width=int(size_rng.integers(200, 401)))


def write_bucket(root: str | Path, seeds: range, spec: SceneSpec = SceneSpec()) -> list[str]:
    """Write ``images/scene_<seed>.jpg`` and ``labels/scene_<seed>.png`` of varied sizes under ``root``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    keys = []
    for seed in seeds:
        image, label = make_scene(seed, varied_spec(seed, spec))
        key = f"scene_{seed:05d}"
        (root / "images" / f"{key}.jpg").write_bytes(encode_jpeg(image))
        (root / "labels" / f"{key}.png").write_bytes(mask_to_png(label))
        keys.append(key)
    return keys


DEMO_SEEDS = range(2_000_000, 2_000_032)  # disjoint from training (0..) and held-out (1_000_000..)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a synthetic bucket: images/*.jpg + labels/*.png")
    parser.add_argument("root", help="output directory")
    parser.add_argument("--first-seed", type=int, default=DEMO_SEEDS.start)
    parser.add_argument("--count", type=int, default=len(DEMO_SEEDS))
    cli = parser.parse_args()
    written = write_bucket(cli.root, range(cli.first_seed, cli.first_seed + cli.count))
    print(f"wrote {len(written)} scenes under {cli.root}")
