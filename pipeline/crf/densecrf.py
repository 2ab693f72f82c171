"""Dense-CRF refinement (DeepLab v1/v2) on pydensecrf: mean-field inference with a Gaussian
(smoothness) kernel and a bilateral (appearance) kernel over all pixel pairs."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Literal, overload

import numpy as np
import pydensecrf.densecrf as dcrf
import ray
from PIL import Image

from pipeline.config.memory import crf_budget, crf_scale, image_budget, release_freed, steady_heap
from pipeline.config.sections import CRFParams
from pipeline.evaluation.per_image import result_table
from pipeline.models.weights import Weights
from pipeline.observability import stage_metrics
from pipeline.rows import flight
from pipeline.rows.batch import Rows
from pipeline.rows.probs import decode_probs


@overload
def dense_crf(
    image: np.ndarray, probs: np.ndarray, params: CRFParams = ..., *, return_probs: Literal[False] = ...
) -> np.ndarray: ...
@overload
def dense_crf(
    image: np.ndarray, probs: np.ndarray, params: CRFParams = ..., *, return_probs: Literal[True]
) -> tuple[np.ndarray, np.ndarray]: ...
def dense_crf(
    image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams(), *, return_probs: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Refine ``probs`` (C, H, W) for ``image`` (H, W, 3 uint8); returns labels (H, W) uint8.

    pydensecrf reads raw buffers, so both inputs are converted here to the exact dtypes and the
    C-contiguous, writable layout it expects (float64, transposed or read-only inputs are fine).
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) matching image {image.shape[:2]}, got {probs.shape}")
    num_classes, height, width = probs.shape
    unary = -np.log(np.clip(probs.astype(np.float32), params.min_prob, 1.0))
    unary = np.ascontiguousarray(unary.reshape(num_classes, -1), dtype=np.float32)
    # pydensecrf takes typed memoryviews: they must be C-contiguous and writable, or it raises/reads garbage.
    rgb = np.require(image, dtype=np.uint8, requirements=["C", "W"])

    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=rgb, compat=params.bilateral_compat
    )
    q = np.array(crf.inference(params.iterations), dtype=np.float32).reshape(num_classes, height, width)
    labels = q.argmax(axis=0).astype(np.uint8)
    return (labels, q) if return_probs else labels


def reduced_crf(
    image: np.ndarray, probs: bytes, encoding: str, num_classes: int, scale: float, params: CRFParams
) -> np.ndarray:
    """Labels (H, W) uint8 of a dense CRF run at ``scale`` of the image's size.

    Image and probabilities are area-averaged down, the kernels' spatial widths scaled with them
    (the same neighbourhood in the picture), and the refined probabilities upsampled bilinearly,
    one class at a time, with a running argmax: no full-size float array is ever made.
    """
    small_rgb, small = _downscale(image, probs, encoding, num_classes, scale)
    return _refine_small(small_rgb, small, image.shape[:2], scale, params)


def _downscale(
    image: np.ndarray, probs, encoding: str, num_classes: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small_rgb = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    planes = np.frombuffer(probs, dtype=np.dtype(encoding)).reshape(num_classes, h, w)
    if encoding == "uint8":  # resized as 8-bit planes: no float32 copy of a full-size plane
        small = np.stack([np.asarray(Image.fromarray(plane).resize(size, Image.Resampling.BOX)) for plane in planes])
        return small_rgb, small.astype(np.float32) / 255.0
    return small_rgb, np.stack(
        [
            np.asarray(Image.fromarray(plane.astype(np.float32), "F").resize(size, Image.Resampling.BOX))
            for plane in planes
        ]
    )


def _refine_small(
    small_rgb: np.ndarray, small: np.ndarray, shape: tuple[int, int], scale: float, params: CRFParams
) -> np.ndarray:
    release_freed()  # PIL's full-size copies of the image and planes, before pydensecrf allocates
    h, w = shape
    scaled = replace(params, gaussian_sxy=params.gaussian_sxy * scale, bilateral_sxy=params.bilateral_sxy * scale)
    _, q = dense_crf(small_rgb, small, scaled, return_probs=True)
    labels = np.zeros((h, w), dtype=np.uint8)
    best = np.zeros((h, w), dtype=np.uint8)
    for c in range(q.shape[0]):
        up = np.asarray(
            Image.fromarray(np.round(q[c] * 255.0).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
        )
        better = up > best if c else np.ones((h, w), dtype=bool)  # ties keep the lower class, as argmax does
        labels[better] = c
        np.maximum(best, up, out=best)
    return labels


@dataclass(frozen=True, kw_only=True)
class Refinement:
    """How a stage refines its rows: the CRF's parameters, the probabilities' encoding and class
    count, and the node the rows are refined on (their ``crf_node``)."""

    params: CRFParams
    encoding: str
    num_classes: int
    node_id: str


def refine_row(
    rows: Rows, i: int, image: np.ndarray, probs: bytes | None, how: Refinement, budget: int | None = None
) -> None:
    """Refine row ``i`` in place: ``mask_crf``, ``crf_ms``, ``crf_scale``, ``crf_node``, or its error.
    Above ``budget`` bytes or ``how.params.max_pixels`` the CRF runs at a reduced resolution
    (``pipeline.config.memory.crf_scale``). ``probs`` None: take ``rows["probs"][i]`` and drop it once
    downscaled, before the CRF allocates (C bytes a pixel).

    The CRF pool and the fused inference actor both call this on the encoded probabilities, so
    either plan gives the same masks for the same inputs.
    """
    params, encoding, num_classes = how.params, how.encoding, how.num_classes
    h, w = image.shape[:2]
    rows.set(i, crf_node=how.node_id)
    start = time.perf_counter()
    scale = crf_scale(h, w, num_classes, budget, params.max_pixels)
    try:
        owned = probs is None
        if scale < 1.0:
            small_rgb, small = _downscale(image, rows["probs"][i] if owned else probs, encoding, num_classes, scale)
            if owned:
                rows.set(i, probs=b"")
            labels = _refine_small(small_rgb, small, (h, w), scale, params)
        else:
            labels = dense_crf(
                image, decode_probs(rows["probs"][i] if probs is None else probs, encoding, (num_classes, h, w)), params
            )
        rows.set(i, mask_crf=labels.tobytes())
    except Exception as exc:
        rows.fail(i, "crf", exc, f"dense CRF failed: {exc}")
        return
    seconds = time.perf_counter() - start
    rows.set(i, crf_ms=seconds * 1000.0, crf_scale=scale)
    stage_metrics("crf").ok(seconds)


@dataclass(frozen=True, kw_only=True)
class CRFSpec:
    """What a ``CRFRefiner`` needs: the CRF's parameters, the weights record (model, checksum and
    classes of the result rows), the run, the probabilities' encoding and the actor's memory share."""

    params: CRFParams
    weights: Weights
    run_id: str
    probs_encoding: str = "uint8"
    actor_memory_mib: int = 0


class CRFRefiner:
    """Ray Data callable class for the CPU actor pool: CRF per image, then the result rows.

    A failure on one image becomes that image's error row (stage ``crf``), never a failed run.
    """

    def __init__(self, spec: CRFSpec) -> None:
        steady_heap()
        self.spec = spec
        self.budget = image_budget(spec.actor_memory_mib)
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.how = Refinement(
            params=spec.params, encoding=spec.probs_encoding, num_classes=spec.weights.num_classes, node_id=node_id
        )

    def __call__(self, batch: dict[str, np.ndarray]):
        return self._refine(batch)

    def failed(self, batch: dict[str, np.ndarray]):
        """The stage's rows for inputs that arrive failed (``pipeline.rows.flight``): passed through."""
        return self._refine(batch)

    def _refine(self, batch: dict[str, np.ndarray]):
        rows = Rows.of(batch, "crf")
        num_classes, weights = self.how.num_classes, self.spec.weights
        for i in rows.pending():
            flight.record("crf", [rows["key"][i]])
            h, w = int(batch["height"][i]), int(batch["width"][i])
            image = np.frombuffer(batch["image"][i], dtype=np.uint8).reshape(h, w, 3)
            refine_row(rows, i, image, batch["probs"][i], self.how, crf_budget(self.budget, h, w, num_classes))
        return result_table(
            rows.columns,
            num_classes=num_classes,
            model=weights.model,
            weights_sha256=weights.sha256 or "",
            run_id=self.spec.run_id,
        )
