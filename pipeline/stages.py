"""The Ray Data DAG: inputs → read+decode (tasks) → inference (actor pool) → dense CRF (CPU actor
pool) → one result table per batch. Every stage passes failed rows through untouched, so each
input key leaves the DAG exactly once, as a mask row or an error row."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import ray
from PIL import UnidentifiedImageError

from pipeline.config import JobConfig
from pipeline.crf import CRFRefiner
from pipeline.images import ImageTooLarge, decode_image
from pipeline.inference import Segmenter
from pipeline.observability import stage_metrics
from pipeline.palette import IGNORE_INDEX, png_to_mask
from pipeline.storage import InputFile, read_bytes
from pipeline.tables import mark_error
from pipeline.weights import Weights


def decode_batch(batch: dict[str, np.ndarray], *, storage_options: dict, num_classes: int,
                 max_pixels: int | None) -> dict[str, np.ndarray]:
    """Read and decode images and labels; any failure becomes that row's error."""
    n = len(batch["key"])
    out = {
        "key": list(batch["key"]), "uri": list(batch["uri"]),
        "image": [b""] * n, "height": [0] * n, "width": [0] * n, "exif_orientation": [0] * n,
        "label": [b""] * n, "has_label": [False] * n,
        "error_stage": [""] * n, "error_type": [""] * n, "error_message": [""] * n,
    }
    for i in range(n):
        uri, label_uri = str(batch["uri"][i]), str(batch["label_uri"][i])
        start = time.perf_counter()
        try:
            data = read_bytes(uri, storage_options)
        except Exception as exc:
            mark_error(out, i, "read", exc, f"cannot read {uri}: {exc}")
            continue
        try:
            decoded = decode_image(data, max_pixels=max_pixels)
        except ImageTooLarge as exc:
            mark_error(out, i, "decode", exc, f"refused before decoding: {exc}")
            continue
        except UnidentifiedImageError as exc:
            mark_error(out, i, "decode", exc, f"not a readable image: {len(data)} bytes starting {data[:12]!r} "
                                          f"are in no known image format")
            continue
        except Exception as exc:
            mark_error(out, i, "decode", exc, f"cannot decode image ({len(data)} bytes): {exc}")
            continue
        stage_metrics("decode").ok(time.perf_counter() - start)
        h, w = decoded.rgb.shape[:2]
        out["image"][i], out["height"][i], out["width"][i] = decoded.rgb.tobytes(), h, w
        out["exif_orientation"][i] = decoded.exif_orientation or 0
        if not label_uri:
            continue
        try:
            label_data = read_bytes(label_uri, storage_options)
        except FileNotFoundError:
            continue  # images without a label are still segmented
        except Exception as exc:
            mark_error(out, i, "label", exc, f"cannot read label {label_uri}: {exc}")
            continue
        try:
            label = png_to_mask(label_data)
        except Exception as exc:
            mark_error(out, i, "label", exc, f"cannot decode label {label_uri}: {exc}")
            continue
        if label.shape != (h, w):
            mark_error(out, i, "label", None, f"label size {label.shape[1]}x{label.shape[0]} differs from image size {w}x{h}")
            continue
        bad = np.unique(label[(label >= num_classes) & (label != IGNORE_INDEX)])
        if bad.size:
            mark_error(out, i, "label", None, f"label has class ids {bad[:10].tolist()} outside 0..{num_classes - 1} "
                                          f"(and {IGNORE_INDEX} = ignore)")
            continue
        out["label"][i], out["has_label"][i] = label.tobytes(), True
    return {k: np.array(v, dtype=object) if k in ("image", "label") else np.array(v) for k, v in out.items()}


@dataclass(frozen=True)
class Resources:
    """Where each stage runs, resolved against the cluster before any work starts."""

    use_gpu: bool
    infer_cpus: float
    infer_threads: int

    @classmethod
    def resolve(cls, config: JobConfig, cluster: dict[str, float]) -> "Resources":
        compute = config.compute
        use_gpu = compute.use_gpu if compute.use_gpu is not None else cluster.get("GPU", 0) > 0
        if use_gpu:
            return cls(True, compute.infer_cpus or 1.0, int(compute.infer_cpus or 1))
        if compute.infer_cpus is not None:
            cpus = compute.infer_cpus
        else:
            # CPU fallback: leave room for the CRF pool at its maximum and for decode tasks, and
            # split the rest between inference actors, so torch threads never oversubscribe cores.
            crf_max = compute.crf_actors[1] * compute.crf_cpus if config.crf is not None else 0.0
            spare = cluster.get("CPU", 1.0) - crf_max - compute.decode_cpus
            cpus = max(0.5, spare / compute.infer_actors[1])
        return cls(False, cpus, max(1, math.floor(cpus + 0.5)))


# A worker that dies mid-batch (node preempted, OOM-killed, segfault in native code) loses no
# rows: Ray re-runs the batch on a restarted actor / another worker, and Ray Data keeps only one
# result per batch, so every key still leaves the DAG once. Ray Data 2.60 defaults are unbounded
# (max_restarts=-1, max_task_retries=-1, tasks max_retries=-1): an input that kills its worker
# every time would then loop forever instead of failing the run. So actors may restart without
# limit (one per death, a long run on spot nodes sees many), but one batch is retried 3 times;
# after that the run fails with the worker's death as the reason and --resume continues it.
TASK_RETRIES = 3
ACTOR_FAULT_TOLERANCE = {"max_restarts": -1, "max_task_retries": TASK_RETRIES}


def build_dataset(files: list[InputFile], config: JobConfig, weights: Weights, weights_sha256: str,
                  resources: Resources) -> ray.data.Dataset:
    """The whole DAG from listed inputs to RESULT_SCHEMA tables, one readable function."""
    compute = config.compute
    ds = ray.data.from_items([{"key": f.key, "uri": f.uri, "label_uri": f.label_uri} for f in files],
                             override_num_blocks=max(1, min(len(files) // compute.batch_size, 200)))
    # Tiled inference bounds network memory, so the pixel guard only applies to whole-image runs.
    max_pixels = None if config.inference.tile else config.inference.max_pixels
    ds = ds.map_batches(decode_batch, fn_kwargs={"storage_options": config.storage_options,
                                                 "num_classes": weights.num_classes, "max_pixels": max_pixels},
                        batch_size=compute.batch_size, num_cpus=compute.decode_cpus, max_retries=TASK_RETRIES)
    ds = ds.map_batches(
        Segmenter,
        fn_constructor_kwargs={
            "model": config.model, "weights_uri": config.weights_uri, "storage_options": config.storage_options,
            "inference": config.inference, "weights_sha256": weights_sha256, "num_classes": weights.num_classes,
            "use_gpu": resources.use_gpu, "threads": resources.infer_threads,
            "crf_follows": config.crf is not None, "run_id": config.run_id,
            "mean": weights.mean, "std": weights.std,
        },
        batch_size=compute.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=compute.infer_actors[0], max_size=compute.infer_actors[1]),
        num_gpus=1 if resources.use_gpu else 0,
        num_cpus=resources.infer_cpus,
        resources=compute.infer_resources or None,
        **ACTOR_FAULT_TOLERANCE,
    )
    if config.crf is not None:
        ds = ds.map_batches(
            CRFRefiner,
            fn_constructor_kwargs={"params": config.crf, "num_classes": weights.num_classes, "model": config.model,
                                   "weights_sha256": weights_sha256, "run_id": config.run_id,
                                   "probs_encoding": config.inference.probs_encoding},
            batch_size=1,  # one image per call keeps CRF actors evenly loaded
            compute=ray.data.ActorPoolStrategy(min_size=compute.crf_actors[0], max_size=compute.crf_actors[1]),
            num_cpus=compute.crf_cpus,
            resources=compute.crf_resources or None,
            **ACTOR_FAULT_TOLERANCE,
        )
    return ds
