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
from typing import NamedTuple

import numpy as np
import torch

from pipeline.config.memory import crf_scale
from pipeline.crf.densecrf import Refinement, refine_row
from pipeline.crf.torch_port import dense_crf_torch, dense_crf_torch_batch
from pipeline.observability import stage_metrics
from pipeline.rows.batch import Rows
from pipeline.rows.probs import encode_probs, quantise_probs

log = logging.getLogger(__name__)

# What a failed allocation says when it is not a torch.OutOfMemoryError / MemoryError: the host allocator
# (c10's "can't allocate memory"), std::bad_alloc in native code, cuSPARSE/cuBLAS workspaces.
_ALLOCATION_MESSAGES = ("can't allocate memory", "out of memory", "bad_alloc", "ALLOC_FAILED")


def allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed (the input was too large), not a bug or a bad input."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _ALLOCATION_MESSAGES)


class ToRefine(NamedTuple):
    """One image for the fused CRF: its row, its pixels, its probabilities and its memory budget."""

    row: int
    image: np.ndarray  # (H, W, 3) uint8
    probs: torch.Tensor | None  # (C, H, W) on the device; None: the row's ``probs`` column, encoded
    budget: int | None  # bytes the image may use; None: no budget


class FusedCRF:
    """Refines a batch's rows in place (``mask_crf``, ``crf_ms``, ``crf_node``, or the error), right after inference."""

    def __init__(self, how: Refinement, *, backend: str, device: torch.device) -> None:
        if backend not in ("pydensecrf", "torch"):
            raise ValueError(f"CRF backend must be pydensecrf or torch, got {backend!r}")
        self.how, self.backend, self.device = how, backend, device
        self.params, self.encoding, self.num_classes = how.params, how.encoding, how.num_classes
        self.metrics = stage_metrics("crf")

    @property
    def batched(self) -> bool:
        """Whether a batch's images are best refined in one call (merged lattices on a GPU)."""
        return self.backend == "torch" and self.device.type == "cuda"

    def __call__(self, rows: Rows, todo: list[ToRefine]) -> None:
        if "mask_crf" not in rows:  # the CRF stage's own columns, added on its first rows of the batch
            rows.add_stage("crf")
        on_torch = []
        for one in todo:
            h, w = one.image.shape[:2]
            if (
                self.backend == "torch"
                and one.probs is not None
                and crf_scale(h, w, self.num_classes, one.budget, self.params.max_pixels) == 1.0
            ):
                on_torch.append(one)
            else:  # pydensecrf, or an image over the budget: at a reduced resolution (pipeline/crf/densecrf.py)
                self._pydensecrf(rows, one)
        if not (self.batched and len(on_torch) > 1 and self._torch_merged(rows, on_torch)):
            for one in on_torch:
                self._torch_one(rows, one)
        for one in todo:
            rows.set(one.row, probs=b"")

    def _pydensecrf(self, rows: Rows, one: ToRefine) -> None:
        encoded = None if one.probs is None else encode_probs(one.probs, self.encoding)
        refine_row(rows, one.row, one.image, encoded, self.how, one.budget)

    def _inputs(self, image: np.ndarray, probs: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        return image, quantise_probs(probs, self.encoding)  # dense_crf_torch moves the image to the probs' device

    def _torch_merged(self, rows: Rows, todo: list[ToRefine]) -> bool:
        """All rows as one call (merged lattices: fewer, larger GPU kernels); False, nothing set, if it fails."""
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                inputs = [self._inputs(one.image, one.probs) for one in todo if one.probs is not None]
                images, quantised = [im for im, _ in inputs], [q for _, q in inputs]
                labels = [m.cpu().numpy().tobytes() for m in dense_crf_torch_batch(images, quantised, self.params)]
        except Exception:  # each image alone next: the one that fails is found without losing the others
            torch.cuda.empty_cache()  # what the failed merged call cached, for the images one by one
            return False
        seconds = (time.perf_counter() - start) / len(todo)
        for one, mask in zip(todo, labels, strict=True):
            rows.set(one.row, mask_crf=mask, crf_ms=seconds * 1000.0, crf_node=self.how.node_id)
            self.metrics.ok(seconds)
        return True

    def _torch_one(self, rows: Rows, one: ToRefine) -> None:
        i, image = one.row, one.image
        assert one.probs is not None, "only images with probabilities on the device go to torch"
        rows.set(i, crf_node=self.how.node_id)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                mask = dense_crf_torch(*self._inputs(image, one.probs), self.params).cpu().numpy().tobytes()
        except Exception as exc:
            if not allocation_failure(exc):
                rows.fail(i, "crf", exc, f"dense CRF (torch) failed: {exc}")
                return
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        else:
            seconds = time.perf_counter() - start
            rows.set(i, mask_crf=mask, crf_ms=seconds * 1000.0)
            self.metrics.ok(seconds)
            return
        failed_ms = (time.perf_counter() - start) * 1000.0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand back what the failed attempt cached before the next image
        log.warning(
            "dense CRF: the torch backend could not allocate for %s (%sx%s, on %s: %s); refining it with "
            "pydensecrf on the CPU",
            rows["key"][i],
            image.shape[0],
            image.shape[1],
            self.device,
            reason,
        )
        self.metrics.fallback("pydensecrf")
        self._pydensecrf(rows, one)
        if rows.failed(i):
            message = f"the torch backend could not allocate ({reason}); then {rows['error_message'][i]}"
            rows.set(i, error_message=message[:1000])
        else:
            rows.set(i, crf_ms=rows["crf_ms"][i] + failed_ms)  # the image's CRF time includes the attempt that failed
