"""Memory one image needs in each stage, and what a stage does when that exceeds its actor's share.

The estimates are linear in pixels, fitted to peak-RSS growth measured by
``benchmarks/memory_budget.py --fit`` (figures in docs/benchmarks.md):

- inference (``deeplabv3plus_demo``, CPU, fp32): ``INFER_BYTES_PER_PIXEL`` per image pixel at
  scale 1 without flip (input tensors, activations, upsampled logits, probabilities); a scale s
  costs s² of that, and each scale's activations are summed (the measured peak of 0.5/1/1.5
  lies between the largest scale's and the sum's: the sum errs on the safe side); flip doubles
  the forward batch, which measured ``FLIP_FACTOR``x.
- dense CRF (pydensecrf, 10 iterations): ``CRF_BYTES_PER_PIXEL + CRF_BYTES_PER_PIXEL_CLASS * C``
  per pixel on a natural photo; noise images and reduced-scale runs (a narrower bilateral kernel)
  grow the permutohedral lattice beyond it (docs/benchmarks.md).

An image whose inference estimate exceeds the actor's share runs tiled (``BUDGET_TILE``: network
memory is then that of one tile); an image whose CRF estimate exceeds what is left, or that has
more than ``CRFParams.max_pixels``, is refined at ``crf_scale`` < 1 (``pipeline.crf.densecrf``).
"""

from __future__ import annotations

import math
import os

INFER_BYTES_PER_PIXEL = 230
FLIP_FACTOR = 1.8
CRF_BYTES_PER_PIXEL = 200
CRF_BYTES_PER_PIXEL_CLASS = 33
BUDGET_TILE = 513  # DeepLab's crop size; the overlap is InferenceConfig.tile_overlap
MIN_CRF_SCALE = 0.05
# An actor whose own footprint (Python, torch, the model) already fills its share still gets this
# much for an image, so small images keep whole-image inference and a full-resolution CRF.
MIN_IMAGE_BYTES = 64 * 2**20


def infer_bytes(height: int, width: int, scales: tuple[float, ...], flip: bool) -> int:
    """Peak memory of whole-image multi-scale (+flip) inference on one image."""
    return int(height * width * INFER_BYTES_PER_PIXEL * sum(s * s for s in scales) * (FLIP_FACTOR if flip else 1.0))


def crf_bytes(height: int, width: int, classes: int) -> int:
    """Peak memory of pydensecrf's dense CRF on one image."""
    return int(height * width * (CRF_BYTES_PER_PIXEL + CRF_BYTES_PER_PIXEL_CLASS * classes))


def held_bytes(height: int, width: int, classes: int) -> int:
    """What a fused inference actor still holds while it refines the image: the RGB image, the
    pre-CRF mask and the uint8-encoded probabilities."""
    return height * width * (4 + classes)


def crf_budget(image_budget: int | None, height: int, width: int, classes: int) -> int | None:
    """Bytes the CRF of one image may take: the actor's ``image_budget`` less what the row holds."""
    return None if image_budget is None else max(MIN_IMAGE_BYTES, image_budget - held_bytes(height, width, classes))


def crf_scale(height: int, width: int, classes: int, budget: int | None, max_pixels: int | None) -> float:
    """Largest scale (<= 1) at which the CRF fits ``budget`` bytes and ``max_pixels`` pixels.

    Memory grows with the square of the scale. Never below ``MIN_CRF_SCALE``: an image that does
    not fit even there is refined at that scale rather than not at all."""
    pixels = height * width
    scale = 1.0
    if budget is not None and crf_bytes(height, width, classes) > budget:
        scale = math.sqrt(budget / crf_bytes(height, width, classes))
    if max_pixels and pixels > max_pixels:
        scale = min(scale, math.sqrt(max_pixels / pixels))
    return 1.0 if scale >= 1.0 else max(MIN_CRF_SCALE, math.floor(scale * 1000) / 1000)


def image_budget(actor_memory_mib: int | None) -> int | None:
    """Bytes this actor may spend on one image: its share minus what it holds now (call it once the
    model is loaded), at least ``MIN_IMAGE_BYTES``; None when budgets are off."""
    if not actor_memory_mib:
        return None
    return max(MIN_IMAGE_BYTES, actor_memory_mib * 2**20 - rss_bytes())


def rss_bytes() -> int:
    """Resident set size of this process (Linux; elsewhere its peak so far, which errs on the safe side)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# glibc's mallopt parameters (malloc.h) and the values the inference and CRF actors set.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's own ceiling for its dynamic threshold
TRIM_THRESHOLD = 64 * 2**20


def steady_heap() -> None:
    """Keep a worker thread's heap between batches (glibc; elsewhere a no-op).

    Ray Data calls an actor's UDF on a thread of its own, which glibc serves from a non-main arena:
    blocks above the default mmap threshold were mapped and unmapped each time, and the arena's top
    trimmed after each batch, so every batch faulted its pages in afresh (~450 minor faults an image
    against ~35 on a main thread, docs/compute.md). Fixed thresholds keep blocks up to 32 MiB on the
    heap and 64 MiB of free top; ``release_freed`` still trims after an oversized image."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):
        pass


def release_freed() -> None:
    """Hand memory freed by large temporaries back to the OS (glibc's ``malloc_trim``; elsewhere a
    no-op). glibc raises its mmap threshold after big frees, so later blocks of that size come from
    the heap and stay resident after they are freed (tiled inference's band temporaries)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
