"""Dense CRF (Krähenbühl & Koltun 2011) in PyTorch, faithful to densecrf as pydensecrf2 1.1 builds it.

Mirrors, operation for operation where the float32 result depends on it:
  densecrf/src/permutohedral.cpp  ``Permutohedral::init`` (the SSE build, as compiled on x86-64: pixels in
                                  blocks of 4, round half to even), ``seqCompute`` (<= 2 values per pixel) and
                                  ``sseCompute`` (more); splat, [1 2 1]/2 blur along axes 0..d, alpha-scaled slice.
  densecrf/src/pairwise.cpp       ``DenseKernel`` with NORMALIZE_SYMMETRIC: norm = 1 / sqrt(K·1 + 1e-20),
                                  applied before and after the filter; the pixel's own weight is kept.
  densecrf/src/labelcompatibility.cpp  ``PottsCompatibility``: message = -w · filtered Q.
  densecrf/src/densecrf.cpp       ``addPairwiseGaussian``/``addPairwiseBilateral`` features and ``inference``.
  pydensecrf/densecrf.pyx         defaults DIAG_KERNEL (features unscaled) and NORMALIZE_SYMMETRIC.
Vectorised torch, the same code on CPU and CUDA. Remaining differences to pydensecrf are Eigen's exp and
summation order in the softmax (ulps) and, on CUDA, cuSPARSE's order of additions in splat and slice.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config.sections import CRFParams
from pipeline.crf.permutohedral import PermutohedralLattice, f32

_MERGE_PIXELS = 1 << 23  # per merged mean field in dense_crf_torch_batch: 32 images of 513x513


def _features(image: torch.Tensor, sxy: float, srgb: float | None = None) -> torch.Tensor:
    """(H*W, 2) x/sxy, y/sxy or (H*W, 5) with r/srgb, g/srgb, b/srgb, pixel j*W + i, as densecrf.cpp."""
    h, w = image.shape[:2]
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=image.device),
        torch.arange(w, dtype=torch.float32, device=image.device),
        indexing="ij",
    )
    columns, scales = [xs.reshape(-1), ys.reshape(-1)], [sxy, sxy]
    if srgb is not None:
        columns += [image[..., k].reshape(-1).float() for k in range(3)]
        scales += [srgb] * 3
    # Divide by a tensor, never a Python scalar: CUDA turns scalar division into a reciprocal multiply.
    divisor = torch.tensor([f32(s) for s in scales], dtype=torch.float32, device=image.device)
    return torch.stack(columns, 1) / divisor


def _exp_normalise(x: torch.Tensor) -> torch.Tensor:
    """densecrf's expAndNormalize over the classes (dim 1)."""
    e = (x - x.amax(1, keepdim=True)).exp()
    return e / e.sum(1, keepdim=True)


def _pairwise_terms(images: list[torch.Tensor], params: CRFParams):
    """(lattice, normaliser, Potts weight) for the Gaussian, then the bilateral kernel, as crf.py adds them."""
    kernels = [
        (params.gaussian_compat, params.gaussian_sxy, None),
        (params.bilateral_compat, params.bilateral_sxy, params.bilateral_srgb),
    ]
    terms = []
    for compat, sxy, srgb in kernels:
        if compat == 0:  # its message is -0 * K Q: subtracting it leaves every float as it was
            continue
        lattice = PermutohedralLattice.concat([PermutohedralLattice.build(_features(im, sxy, srgb)) for im in images])
        terms.append((lattice, lattice.normaliser(), f32(compat)))
    return terms


def _mean_field(unary: torch.Tensor, terms, iterations: int) -> torch.Tensor:
    """densecrf's inference(): Q = softmax(-U); per iteration Q = softmax(-U - sum_k (-w_k) N K (N Q))."""
    q = _exp_normalise(-unary)
    for _ in range(iterations):
        energy = -unary
        for lattice, norm, weight in terms:
            energy = energy - (-weight) * (lattice.filter(q * norm) * norm)
        q = _exp_normalise(energy)
    return q


def _tensor(x) -> torch.Tensor:
    """A tensor view of x, or a copy of a read-only or negatively strided numpy array (torch takes neither)."""
    if torch.is_tensor(x):
        return x
    array = np.ascontiguousarray(x)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _as_inputs(image, probs) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated (H, W, 3) uint8 image and (C, H, W) float32 probabilities, both on probs' device."""
    image, probs = _tensor(image), _tensor(probs)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {tuple(image.shape)}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) matching image {tuple(image.shape[:2])}, got {tuple(probs.shape)}")
    if not 1 <= probs.shape[0] <= 256:
        raise ValueError(f"probs must have 1..256 classes for uint8 labels, got {probs.shape[0]}")
    return image.to(device=probs.device, dtype=torch.uint8), probs.to(torch.float32)


def _refine(images: list[torch.Tensor], probs: list[torch.Tensor], params: CRFParams) -> list[torch.Tensor]:
    """Mean field for images sharing device and class count, as one concatenated problem; Q (C, H, W) each."""
    num_classes = probs[0].shape[0]
    unary = torch.cat([-torch.log(p.clamp(params.min_prob, 1.0)).reshape(num_classes, -1).T for p in probs])
    q = _mean_field(unary.contiguous(), _pairwise_terms(images, params), params.iterations)
    sizes = [p.shape[1] * p.shape[2] for p in probs]
    return [part.T.reshape(p.shape).contiguous() for part, p in zip(q.split(sizes), probs, strict=True)]


def dense_crf_torch(image, probs, params: CRFParams = CRFParams(), *, return_probs: bool = False):
    """Refine ``probs`` (C, H, W) for ``image`` (H, W, 3 uint8), numpy or torch, on probs' device (CPU for numpy).

    Returns labels (H, W) uint8, and Q (C, H, W) float32 when ``return_probs``: what pipeline.crf.densecrf.dense_crf
    computes with pydensecrf.
    """
    image, probs = _as_inputs(image, probs)
    q = _refine([image], [probs], params)[0]
    labels = q.argmax(0).to(torch.uint8)
    return (labels, q) if return_probs else labels


def dense_crf_torch_batch(
    images: list, probs: list, params: CRFParams = CRFParams(), *, merge: bool | None = None
) -> list[torch.Tensor]:
    """Labels (H, W) uint8 for several images, each exactly as dense_crf_torch gives it.

    With ``merge`` (default: on CUDA only) images sharing device and class count run their mean field as one
    stacked lattice, up to _MERGE_PIXELS pixels at a time: fewer, larger kernels. On CPU it does not pay
    (the larger working set falls out of cache; docs/benchmarks.md), so there images run one by one.
    """
    if len(images) != len(probs):
        raise ValueError(f"got {len(images)} images but {len(probs)} probability maps")
    inputs = [_as_inputs(im, p) for im, p in zip(images, probs, strict=True)]
    runs: list[list[int]] = []
    open_runs: dict[tuple, list[int]] = {}  # the run still taking images, per (device, classes)
    for i, (_, p) in enumerate(inputs):
        run = open_runs.get((p.device, p.shape[0]))
        joins = (p.device.type == "cuda") if merge is None else merge
        if run is None or not joins or sum(inputs[k][1][0].numel() for k in run) + p[0].numel() > _MERGE_PIXELS:
            run = open_runs[(p.device, p.shape[0])] = []
            runs.append(run)
        run.append(i)
    labels: list[torch.Tensor] = [torch.empty(0)] * len(inputs)
    for run in runs:
        for i, q in zip(run, _refine([inputs[i][0] for i in run], [inputs[i][1] for i in run], params), strict=True):
            labels[i] = q.argmax(0).to(torch.uint8)
    return labels
