"""Multi-scale (+flip) DeepLab inference (the Ray Data actor that runs it is ``pipeline/inference/segmenter.py``).

Each scaled input is resized bilinearly (align_corners=False, like torchvision's DeepLab heads),
logits are upsampled back to the original size, turned into softmax probabilities and averaged
over scales and flips — DeepLab v3's evaluation protocol (Chen et al. 2017, Sec. 4.4).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from typing import NamedTuple, cast

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.config.sections import InferenceConfig
from pipeline.models import build_model, default_weights
from pipeline.models.checkpoints import load_into, num_classes_in, parse_checkpoint, read_checkpoint
from pipeline.models.weights import WeightsError, categories_from, split_checksum


def multiscale_probs(
    model: torch.nn.Module, image: torch.Tensor, scales: tuple[float, ...], flip: bool, average: str = "probs"
) -> torch.Tensor:
    """Average over ``scales`` (and horizontal flips) for a (N, 3, H, W) batch; returns probabilities.

    ``average="probs"`` averages softmax probabilities (DeepLab v3's protocol); ``"logits"``
    averages logits and applies one softmax (DeepLab v2's max/avg-fused score maps behave closer
    to this). Either way every prediction is first upsampled to the input's full resolution.
    """
    height, width = image.shape[-2:]
    total: torch.Tensor | None = None
    for scale in scales:
        x = image
        if scale != 1.0:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            x = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        if flip:
            x = torch.cat([x, x.flip(-1)], dim=0)
        out = model(x).float()
        if flip:
            plain, mirrored = out.chunk(2, dim=0)
            out = torch.cat([plain, mirrored.flip(-1)], dim=0)
        if out.shape[-2:] != (height, width):
            out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
        if average == "probs":
            out = out.softmax(dim=1)
        if flip:
            out = out.view(2, -1, *out.shape[1:]).sum(0)
        total = out if total is None else total + out
    if total is None:
        raise ValueError("no scales to infer at")
    total = total / (len(scales) * (2 if flip else 1))
    return total if average == "probs" else total.softmax(dim=1)


def class_map(probs: torch.Tensor) -> torch.Tensor:
    """(H, W) uint8 most probable class of (C, H, W) probabilities (the first one on ties).

    ``max(0).indices`` rather than ``argmax(0)``: same result, but torch's CPU argmax over the
    leading dimension is much slower (docs/benchmarks.md, "Design choices").
    """
    return top_class(probs)[1]


def top_class(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) top-class probability and ``class_map`` of (C, H, W) probabilities, from one ``max``:
    the uncertainty summaries need the first, the mask the second."""
    top = probs.max(dim=0)
    return top.values, top.indices.to(torch.uint8)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]  # the last window ends at the border


def _forward(model: torch.nn.Module, x: torch.Tensor, config: InferenceConfig) -> torch.Tensor:
    """Probabilities of a normalised (N, 3, H, W) batch on its device, whole: an image larger than
    ``config.tile`` runs tiled through ``pipeline.inference.tiling.tiled_outputs``, the one tiled path."""
    if config.tile and max(x.shape[-2:]) > config.tile:
        raise ValueError(
            f"a {x.shape[-2]}x{x.shape[-1]} image is larger than the {config.tile} px tile: "
            "tiled inference is pipeline.inference.tiling.tiled_outputs"
        )
    if x.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, config.precision):
        return multiscale_probs(model, x, config.scales, config.flip, config.average)


def _normalised(rgbs: list[np.ndarray], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Same-size RGB uint8 images as one normalised (N, 3, H, W) float batch on mean's device."""
    host = torch.from_numpy(np.stack(rgbs))
    if mean.device.type == "cuda":
        host = host.pin_memory()  # lets the copy overlap with the previous batch's compute
    x = host.to(mean.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


def _padded(images: list[np.ndarray], mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Images of different sizes, normalised, zero-padded to the largest in one batch."""
    height, width = max(im.shape[0] for im in images), max(im.shape[1] for im in images)
    x = torch.zeros(len(images), 3, height, width, device=mean.device)
    for j, im in enumerate(images):
        x[j, :, : im.shape[0], : im.shape[1]] = _normalised([im], mean, std)[0]
    return x


def infer_batch(
    model: torch.nn.Module,
    images: list[np.ndarray],
    *,
    mean: torch.Tensor,
    std: torch.Tensor,
    config: InferenceConfig,
    seconds: list[float] | None = None,
) -> list[torch.Tensor]:
    """(C, H, W) probabilities per RGB uint8 image.

    Images of one size run as one tensor batch ("bucket" batching, exact); with "pad" batching
    images are zero-padded (after normalisation) to the largest size in their group, run at once,
    and cropped back — fewer, larger forwards, at the cost of padded context near the borders.
    ``forward_groups`` decides the groups. ``seconds``, if given, receives each image's share of
    the forward pass it was in (its group's time divided among the group's images).
    """
    results: list[torch.Tensor | None] = [None] * len(images)
    if seconds is not None:
        seconds[:] = [0.0] * len(images)
    with torch.inference_mode():
        for indices in forward_groups([im.shape[:2] for im in images], config):
            start = time.perf_counter()
            group = [images[i] for i in indices]
            same = len(indices) == 1 or config.batching == "bucket"
            probs = _forward(model, _normalised(group, mean, std) if same else _padded(group, mean, std), config)
            for j, i in enumerate(indices):
                results[i] = probs[j, :, : images[i].shape[0], : images[i].shape[1]]
            if seconds is not None:
                if mean.device.type == "cuda":
                    torch.cuda.synchronize(mean.device)  # kernels run asynchronously: time them, not their launch
                for i in indices:
                    seconds[i] = (time.perf_counter() - start) / len(indices)
    return cast(list[torch.Tensor], results)  # forward_groups puts every index in one group


def forward_groups(sizes: list[tuple[int, int]], config: InferenceConfig) -> list[list[int]]:
    """Which images (by index) share one forward pass.

    "bucket": images of the same size, in input order; "pad": consecutive images, padded to the
    largest. Either way a group holds at most ``config.max_batch_pixels`` (padded) pixels, so a
    Ray batch of large images never becomes one huge tensor: the Ray batch size amortises
    per-batch overhead, this bounds memory. Tiled inference runs image by image.
    """
    if config.tile:
        return [[i] for i in range(len(sizes))]
    groups: list[list[int]] = []
    if config.batching == "bucket":
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, size in enumerate(sizes):
            by_size.setdefault(tuple(size), []).append(i)
        for (height, width), indices in by_size.items():
            step = max(1, config.max_batch_pixels // (height * width))
            groups += [indices[k : k + step] for k in range(0, len(indices), step)]
        return groups
    height = width = 0
    for i, (h, w) in enumerate(sizes):
        grown = (max(height, h), max(width, w))
        if groups and (len(groups[-1]) + 1) * grown[0] * grown[1] <= config.max_batch_pixels:
            groups[-1].append(i)
            height, width = grown
        else:
            groups.append([i])
            height, width = h, w
    return groups


def predict_probs(
    model: torch.nn.Module,
    rgb: np.ndarray,
    *,
    mean: torch.Tensor,
    std: torch.Tensor,
    scales: tuple[float, ...],
    flip: bool,
) -> torch.Tensor:
    """(C, H, W) averaged probabilities for one RGB uint8 image; mean/std are (1, 3, 1, 1) on the device."""
    return infer_batch(model, [rgb], mean=mean, std=std, config=InferenceConfig(scales=scales, flip=flip))[0]


_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST[precision])


class LoadedModel(NamedTuple):
    """``load_model``'s result: the model in eval mode, its checkpoint's sha256 and its class names."""

    model: torch.nn.Module
    sha256: str
    categories: tuple[str, ...]


def load_model(
    model_name: str,
    weights_uri: str | None,
    *,
    storage_options: dict | None = None,
    output_stride: int | None = None,
    num_classes: int | None = None,
    expected_sha256: str | None = None,
    data: bytes | None = None,
) -> LoadedModel:
    """The model in eval mode, its sha256 and class names; num_classes from the checkpoint when not given.

    ``weights_uri=None`` means the model's default weight set (``pipeline.models.DEFAULT_WEIGHTS``),
    resolved in this process: bundled files are found in the local install on every node.
    ``data``: the checkpoint's bytes, read by someone else already (the driver hands them to the
    inference actors); checked against ``expected_sha256`` all the same.
    """
    if weights_uri is None:
        default = default_weights(model_name)
        weights_uri, expected_sha256 = default.uri, expected_sha256 or default.sha256
    if data is not None:
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 and not digest.startswith(expected_sha256):
            raise WeightsError(f"the weights handed over have sha256 {digest}, not {expected_sha256}")
        checkpoint = parse_checkpoint(data, digest, split_checksum(weights_uri)[0])
    else:
        checkpoint = read_checkpoint(weights_uri, expected_sha256=expected_sha256, storage_options=storage_options)
    if num_classes is None:
        num_classes = num_classes_in(checkpoint.state_dict)
        if num_classes is None:
            raise WeightsError(f"cannot tell the number of classes from {weights_uri}; pass --num-classes")
    with torch.device("meta"):  # no initialisation for the checkpoint to overwrite, no second copy of it
        model = build_model(model_name, num_classes=num_classes, output_stride=output_stride)
    load_into(model, checkpoint, weights_uri)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a tensor no state dict holds
        raise RuntimeError(f"{model_name} keeps tensors outside its state dict: it cannot be loaded from a checkpoint")
    return LoadedModel(model.eval(), checkpoint.sha256, categories_from(checkpoint.metadata, num_classes))
