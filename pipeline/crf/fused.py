"""The dense CRF inside the inference actor (the fused plans, pipeline/dag/stages.py).

Both backends refine the probabilities as the CRF pool would receive them (``inference.probs_encoding``),
so every plan gives the same masks. pydensecrf gets them encoded, on the host; the torch backend gets them
quantised on the actor's device, where they already are: on a GPU they never leave it. An image the torch
backend cannot allocate for (CUDA out of memory, a failed host allocation) is refined by pydensecrf on the
CPU instead, with a warning and a ``deeplab_pipeline_fallbacks_total`` count; if that fails too, it is the
image's error row (stage ``crf``), as on the pydensecrf path.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from pipeline.config.memory import crf_scale
from pipeline.config.sections import CRFParams
from pipeline.crf.densecrf import refine_row
from pipeline.crf.torch_port import dense_crf_torch, dense_crf_torch_batch
from pipeline.observability import stage_metrics
from pipeline.rows.errors import mark_error
from pipeline.rows.probs import encode_probs, quantise_probs
from pipeline.rows.schema import add_columns

log = logging.getLogger(__name__)

# What a failed allocation says when it is not a torch.OutOfMemoryError / MemoryError: the host allocator
# (c10's "can't allocate memory"), std::bad_alloc in native code, cuSPARSE/cuBLAS workspaces.
_ALLOCATION_MESSAGES = ("can't allocate memory", "out of memory", "bad_alloc", "ALLOC_FAILED")


def allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed (the input was too large), not a bug or a bad input."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _ALLOCATION_MESSAGES)


class FusedCRF:
    """Refines a batch's rows in place (``mask_crf``, ``crf_ms``, ``crf_node``, or the error), right after inference."""

    def __init__(
        self, params: CRFParams, *, backend: str, encoding: str, num_classes: int, node_id: str, device: torch.device
    ) -> None:
        if backend not in ("pydensecrf", "torch"):
            raise ValueError(f"CRF backend must be pydensecrf or torch, got {backend!r}")
        self.params, self.backend, self.encoding = params, backend, encoding
        self.num_classes, self.node_id, self.device = num_classes, node_id, device
        self.metrics = stage_metrics("crf")

    @property
    def batched(self) -> bool:
        """Whether a batch's images are best refined in one call (merged lattices on a GPU)."""
        return self.backend == "torch" and self.device.type == "cuda"

    def __call__(
        self, out: dict[str, list], rows: list[tuple[int, np.ndarray, torch.Tensor | None, int | None]]
    ) -> None:
        """``rows``: (row index, (H, W, 3) uint8 image, (C, H, W) probabilities on the device, or None when
        they are ``out["probs"][i]``, encoded, and the row's memory budget in bytes or None) per image."""
        if "mask_crf" not in out:  # the CRF stage's own columns, added on its first rows of the batch
            add_columns(out, "crf", len(out["key"]))
        on_torch = []
        for i, image, probs, budget in rows:
            h, w = image.shape[:2]
            if (
                self.backend == "torch"
                and probs is not None
                and crf_scale(h, w, self.num_classes, budget, self.params.max_pixels) == 1.0
            ):
                on_torch.append((i, image, probs, budget))
            else:  # pydensecrf, or an image over the budget: at a reduced resolution (pipeline/crf/densecrf.py)
                self._pydensecrf(out, i, image, probs, budget)
        if not (self.batched and len(on_torch) > 1 and self._torch_merged(out, on_torch)):
            for row in on_torch:
                self._torch_one(out, *row)
        for i, *_ in rows:
            out["probs"][i] = b""

    def _pydensecrf(
        self, out: dict[str, list], i: int, image: np.ndarray, probs: torch.Tensor | None, budget: int | None
    ) -> None:
        refine_row(
            out,
            i,
            image,
            None if probs is None else encode_probs(probs, self.encoding),
            params=self.params,
            encoding=self.encoding,
            num_classes=self.num_classes,
            node_id=self.node_id,
            metrics=self.metrics,
            budget=budget,
        )

    def _inputs(self, image: np.ndarray, probs: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        return image, quantise_probs(probs, self.encoding)  # dense_crf_torch moves the image to the probs' device

    def _torch_merged(self, out: dict[str, list], rows) -> bool:
        """All rows as one call (merged lattices: fewer, larger GPU kernels); False, nothing set, if it fails."""
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                inputs = [self._inputs(image, probs) for _, image, probs, _ in rows]
                images, quantised = [im for im, _ in inputs], [q for _, q in inputs]
                labels = [m.cpu().numpy().tobytes() for m in dense_crf_torch_batch(images, quantised, self.params)]
        except Exception:  # each image alone next: the one that fails is found without losing the others
            torch.cuda.empty_cache()  # what the failed merged call cached, for the images one by one
            return False
        seconds = (time.perf_counter() - start) / len(rows)
        for (i, *_), mask in zip(rows, labels, strict=True):
            out["mask_crf"][i], out["crf_ms"][i], out["crf_node"][i] = mask, seconds * 1000.0, self.node_id
            self.metrics.ok(seconds)
        return True

    def _torch_one(
        self, out: dict[str, list], i: int, image: np.ndarray, probs: torch.Tensor, budget: int | None
    ) -> None:
        out["crf_node"][i] = self.node_id
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                mask = dense_crf_torch(*self._inputs(image, probs), self.params).cpu().numpy().tobytes()
        except Exception as exc:
            if not allocation_failure(exc):
                mark_error(out, i, "crf", exc, f"dense CRF (torch) failed: {exc}")
                return
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        else:
            seconds = time.perf_counter() - start
            out["mask_crf"][i], out["crf_ms"][i] = mask, seconds * 1000.0
            self.metrics.ok(seconds)
            return
        failed_ms = (time.perf_counter() - start) * 1000.0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand back what the failed attempt cached before the next image
        log.warning(
            "dense CRF: the torch backend could not allocate for %s (%sx%s, on %s: %s); refining it with "
            "pydensecrf on the CPU",
            out["key"][i],
            image.shape[0],
            image.shape[1],
            self.device,
            reason,
        )
        self.metrics.fallback("pydensecrf")
        self._pydensecrf(out, i, image, probs, budget)
        if out["error_stage"][i]:
            out["error_message"][i] = (
                f"the torch backend could not allocate ({reason}); then {out['error_message'][i]}"
            )[:1000]
        else:
            out["crf_ms"][i] += failed_ms  # the image's CRF time includes the attempt that failed
