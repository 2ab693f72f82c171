"""Multi-scale (+flip) DeepLab inference and the Ray Data actor that runs it.

Each scaled input is resized bilinearly (align_corners=False, like torchvision's DeepLab heads),
logits are upsampled back to the original size, turned into softmax probabilities and averaged
over scales and flips — DeepLab v3's evaluation protocol (Chen et al. 2017, Sec. 4.4).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import replace

import numpy as np
import ray
import torch
from torch.nn import functional as F

from pipeline.config import CRFParams, InferenceConfig
from pipeline.crf_fused import FusedCRF
from pipeline.memory import BUDGET_TILE, crf_budget, image_budget, infer_bytes, release_freed
from pipeline.models import build_model
from pipeline.observability import stage_metrics
from pipeline.metrics import uncertainty, uncertainty_summary
from pipeline.probs import encode_probs
from pipeline.results import mark_error, result_table
from pipeline.schema import add_columns, to_stream
from pipeline.testing import limit_memory_if_asked
from pipeline.checkpoints import load_into, normalisation, num_classes_in, read_checkpoint
from pipeline.weights import WeightsError, categories_from, default_weights


def multiscale_probs(model: torch.nn.Module, image: torch.Tensor, scales: tuple[float, ...], flip: bool,
                     average: str = "probs") -> torch.Tensor:
    """Average over ``scales`` (and horizontal flips) for a (N, 3, H, W) batch; returns probabilities.

    ``average="probs"`` averages softmax probabilities (DeepLab v3's protocol); ``"logits"``
    averages logits and applies one softmax (DeepLab v2's max/avg-fused score maps behave closer
    to this). Either way every prediction is first upsampled to the input's full resolution.
    """
    height, width = image.shape[-2:]
    total = None
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
    total = total / (len(scales) * (2 if flip else 1))
    return total if average == "probs" else total.softmax(dim=1)


def class_map(probs: torch.Tensor) -> torch.Tensor:
    """(H, W) uint8 most probable class of (C, H, W) probabilities (the first one on ties).

    ``max(0).indices`` rather than ``argmax(0)``: same result, but torch 2.14's CPU argmax over
    the leading dimension is ~20x slower (20 ms vs 1 ms for 6x300x380, benchmarks/pipeline_vs_loop.py's
    images), which made it a third of the demo model's per-image time.
    """
    return probs.max(dim=0).indices.to(torch.uint8)


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]  # the last window ends at the border


def sliding_window_probs(model: torch.nn.Module, image: torch.Tensor, *, tile: int, overlap: int,
                         scales: tuple[float, ...], flip: bool, average: str = "probs") -> torch.Tensor:
    """Multi-scale inference on overlapping ``tile`` x ``tile`` windows, probabilities averaged where
    windows overlap. Network memory depends on the tile, not on the image, so very large images
    run within a fixed budget (the full-resolution probability map stays on the host)."""
    height, width = image.shape[-2:]
    if height <= tile and width <= tile:
        return multiscale_probs(model, image, scales, flip, average)
    stride = max(1, tile - overlap)
    total = count = None
    for top in _tile_starts(height, tile, stride):
        for left in _tile_starts(width, tile, stride):
            window = image[..., top : top + tile, left : left + tile]
            probs = multiscale_probs(model, window, scales, flip, average).cpu()
            if total is None:
                total = torch.zeros(image.shape[0], probs.shape[1], height, width)
                count = torch.zeros(1, 1, height, width)
            total[..., top : top + tile, left : left + tile] += probs
            count[..., top : top + tile, left : left + tile] += 1
    return total / count


_BAND_ROWS = 64


def tiled_outputs(model: torch.nn.Module, rgb: np.ndarray, *, mean: torch.Tensor, std: torch.Tensor,
                  config: InferenceConfig, encoding: str | None) -> tuple[np.ndarray, dict[str, float], np.ndarray | None]:
    """What ``Segmenter`` keeps of sliding-window inference on one RGB uint8 image — the pre-CRF
    class map, the uncertainty summaries and (``encoding``) the encoded probabilities — computed
    band by band: the same windows and averages as ``sliding_window_probs``, but neither the
    normalised image nor the probabilities ever exist at full size in float32 (88 bytes a pixel
    at 6 classes), so memory is the image, the outputs and two tile rows of probabilities."""
    height, width = rgb.shape[:2]
    tile, stride = config.tile, max(1, config.tile - config.tile_overlap)
    tops, lefts = _tile_starts(height, tile, stride), _tile_starts(width, tile, stride)
    rows, cols = torch.zeros(height), torch.zeros(width)  # windows covering each row / column
    for top in tops:
        rows[top : top + tile] += 1
    for left in lefts:
        cols[left : left + tile] += 1
    device = mean.device
    autocast = (torch.autocast(device.type, dtype=_AUTOCAST[config.precision])
                if config.precision != "fp32" else contextlib.nullcontext())
    with warnings.catch_warnings():  # the batch's image buffer is read-only; windows are only read, never written
        warnings.simplefilter("ignore", UserWarning)
        host = torch.from_numpy(rgb)
    mask = np.empty((height, width), dtype=np.uint8)
    encoded = None
    top_sum = entropy_sum = low = 0.0
    acc = None  # rows top..top+tile of the probabilities summed over windows
    with torch.inference_mode():
        for n, top in enumerate(tops):
            bottom = min(top + tile, height)
            for left in lefts:
                x = host[top:bottom, left : left + tile].to(device).permute(2, 0, 1)[None].float().div_(255.0)
                x = (x - mean) / std
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast:
                    p = multiscale_probs(model, x, config.scales, config.flip, config.average)[0].float().cpu()
                if acc is None:
                    acc = torch.zeros(p.shape[0], min(tile, height), width)
                    if encoding:
                        encoded = np.empty((p.shape[0], height, width), dtype=np.dtype(encoding))
                acc[:, : bottom - top, left : left + p.shape[2]] += p
            done = (tops[n + 1] if n + 1 < len(tops) else height) - top  # rows no later window touches
            for r0 in range(0, done, _BAND_ROWS):  # a few rows at a time keeps the temporaries small
                r1 = min(done, r0 + _BAND_ROWS)
                band = acc[:, r0:r1] / (rows[top + r0 : top + r1, None] * cols[None, :])
                mask[top + r0 : top + r1] = class_map(band).numpy()
                best = band.max(dim=0).values
                top_sum += float(best.double().sum())
                entropy_sum += float(-(band * band.clamp_min(1e-12).log()).sum(dim=0).double().sum())
                low += float((best < config.low_conf_threshold).sum())
                if encoded is not None:
                    encoded[:, top + r0 : top + r1] = np.frombuffer(encode_probs(band, encoding),
                                                                    dtype=encoded.dtype).reshape(band.shape)
            keep = bottom - top - done  # rows the next tile row adds to, moved to the top of acc
            acc[:, :keep] = acc[:, done : done + keep].clone()
            acc[:, keep:] = 0
    pixels = height * width
    # The encoded probabilities stay an array, not bytes: bytes() would copy C bytes a pixel once more.
    return mask, uncertainty_summary(top_sum / pixels, entropy_sum / pixels, low / pixels, acc.shape[0]), encoded


def infer_batch(model: torch.nn.Module, images: list[np.ndarray], *, mean: torch.Tensor, std: torch.Tensor,
                config: InferenceConfig, seconds: list[float] | None = None) -> list[torch.Tensor]:
    """(C, H, W) probabilities per RGB uint8 image.

    Images of one size run as one tensor batch ("bucket" batching, exact); with "pad" batching
    images are zero-padded (after normalisation) to the largest size in their group, run at once,
    and cropped back — fewer, larger forwards, at the cost of padded context near the borders.
    ``forward_groups`` decides the groups. ``seconds``, if given, receives each image's share of
    the forward pass it was in (its group's time divided among the group's images).
    """
    device = mean.device
    autocast = (torch.autocast(device.type, dtype=_AUTOCAST[config.precision])
                if config.precision != "fp32" else contextlib.nullcontext())

    def run(x: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            if config.tile:
                return sliding_window_probs(model, x, tile=config.tile, overlap=config.tile_overlap,
                                            scales=config.scales, flip=config.flip, average=config.average)
            return multiscale_probs(model, x, config.scales, config.flip, config.average)

    def to_tensor(rgbs: list[np.ndarray]) -> torch.Tensor:
        host = torch.from_numpy(np.stack(rgbs))
        if device.type == "cuda":
            host = host.pin_memory()  # lets the copy overlap with the previous batch's compute
        x = host.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - mean) / std

    results: list[torch.Tensor | None] = [None] * len(images)
    if seconds is not None:
        seconds[:] = [0.0] * len(images)
    with torch.inference_mode():
        for indices in forward_groups([im.shape[:2] for im in images], config):
            start = time.perf_counter()
            if len(indices) == 1 or config.batching == "bucket":
                probs = run(to_tensor([images[i] for i in indices]))
            else:
                height = max(images[i].shape[0] for i in indices)
                width = max(images[i].shape[1] for i in indices)
                x = torch.zeros(len(indices), 3, height, width, device=device)
                for j, i in enumerate(indices):
                    x[j, :, : images[i].shape[0], : images[i].shape[1]] = to_tensor([images[i]])[0]
                probs = run(x)
            for j, i in enumerate(indices):
                results[i] = probs[j, :, : images[i].shape[0], : images[i].shape[1]]
            if seconds is not None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # kernels run asynchronously: time them, not their launch
                for i in indices:
                    seconds[i] = (time.perf_counter() - start) / len(indices)
    return results


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
        by_size: dict[tuple[int, int], list[int]] = {}
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


def predict_probs(model: torch.nn.Module, rgb: np.ndarray, *, mean: torch.Tensor, std: torch.Tensor,
                  scales: tuple[float, ...], flip: bool) -> torch.Tensor:
    """(C, H, W) averaged probabilities for one RGB uint8 image; mean/std are (1, 3, 1, 1) on the device."""
    return infer_batch(model, [rgb], mean=mean, std=std, config=InferenceConfig(scales=scales, flip=flip))[0]


_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def load_model(model_name: str, weights_uri: str | None, *, storage_options: dict | None = None,
               output_stride: int | None = None, num_classes: int | None = None,
               expected_sha256: str | None = None):
    """(model in eval mode, sha256, class names); num_classes from the checkpoint when not given.

    ``weights_uri=None`` means the model's default weight set (``DEFAULT_WEIGHTS``), resolved in
    this process: bundled files are found in the local install on every node.
    """
    if weights_uri is None:
        default = default_weights(model_name)
        weights_uri, expected_sha256 = default.uri, expected_sha256 or default.sha256
    checkpoint = read_checkpoint(weights_uri, expected_sha256=expected_sha256, storage_options=storage_options)
    if num_classes is None:
        num_classes = num_classes_in(checkpoint.state_dict)
        if num_classes is None:
            raise WeightsError(f"cannot tell the number of classes from {weights_uri}; pass --num-classes")
    model = build_model(model_name, num_classes=num_classes, output_stride=output_stride)
    load_into(model, checkpoint, weights_uri)
    return model.eval(), checkpoint.sha256, categories_from(checkpoint.metadata, num_classes)


class Segmenter:
    """Ray Data callable class: model loaded once per actor, multi-scale inference per image.

    Emits per image the pre-CRF argmax mask, confidence summaries and, when a CRF stage follows,
    the averaged probabilities in ``inference.probs_encoding`` (see pipeline/probs.py). With
    ``crf`` it refines each image itself, with ``crf_backend`` (the torch one on the actor's
    device), and emits the result rows: the probabilities never cross the object store.
    """

    def __init__(self, *, model: str, weights_uri: str | None, storage_options: dict, inference: InferenceConfig,
                 weights_sha256: str, num_classes: int, use_gpu: bool, threads: int, crf_follows: bool,
                 run_id: str, mean: tuple[float, ...], std: tuple[float, ...], crf: CRFParams | None = None,
                 crf_backend: str = "pydensecrf", actor_memory_mib: int = 0) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.threads = max(1, threads)
        self.model, self.sha256, categories = load_model(
            model, weights_uri, storage_options=storage_options, output_stride=inference.output_stride,
            num_classes=num_classes, expected_sha256=weights_sha256)
        self.model.to(self.device)
        self.model_name = model
        self.num_classes = len(categories)
        self.inference = inference
        self.crf_follows = crf_follows
        self.run_id = run_id
        self.mean, self.std = normalisation(mean, std, self.device)
        limit_memory_if_asked()
        self.budget = image_budget(actor_memory_mib)  # measured now that the model is loaded
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.metrics = stage_metrics("infer")
        # Refine in this actor, right after inference (no CRF pool follows).
        self.crf = None if crf is None else FusedCRF(crf, backend=crf_backend, encoding=inference.probs_encoding,
                                                     num_classes=self.num_classes, node_id=self.node_id,
                                                     device=self.device)

    def __call__(self, batch: dict[str, np.ndarray]):
        if self.device.type == "cpu":
            # Per call, not once in __init__: Ray Data calls this from another thread than the
            # constructor, and OpenMP's thread count is per thread. oneDNN's convolutions read it
            # there and ran on one core (Ray starts workers with OMP_NUM_THREADS=1), while
            # torch.get_num_threads() still said 2 — half the CPU fallback's throughput.
            torch.set_num_threads(self.threads)
        n = len(batch["key"])
        out = add_columns({k: list(v) for k, v in batch.items()}, "infer", n)
        out["infer_node"] = [self.node_id] * n
        todo = [i for i in range(n) if not out["error_stage"][i]]
        images = [np.frombuffer(batch["image"][i], dtype=np.uint8).reshape(int(batch["height"][i]),
                                                                          int(batch["width"][i]), 3) for i in todo]
        results, seconds = self._infer(out, todo, images)
        if self.crf is not None:
            add_columns(out, "crf", n)
        refine = []  # (row, image, probabilities on the device or None, memory budget) for the fused CRF
        for j, (i, image) in enumerate(zip(todo, images)):
            if results[j] is None:
                continue
            (out["mask_pre"][i], summary, out["probs"][i], probs), results[j] = results[j], None
            for name, value in summary.items():
                out[name][i] = value
            out["infer_ms"][i] = seconds[j] * 1000.0
            self.metrics.ok(seconds[j])
            if self.crf is not None:
                refine.append((i, image, probs, crf_budget(self.budget, *image.shape[:2], self.num_classes)))
                if not self.crf.batched:  # one image at a time: each one's probabilities go as it is refined
                    self.crf(out, refine)
                    refine = []
        if refine:
            self.crf(out, refine)
        if self.crf_follows:
            return to_stream(out)
        return result_table(out, num_classes=self.num_classes, model=self.model_name,
                            weights_sha256=self.sha256, run_id=self.run_id)

    def _infer(self, out: dict[str, list], todo: list[int], images: list[np.ndarray]):
        """(pre-CRF mask bytes, uncertainty, encoded probabilities, the probabilities on the device for
        the fused torch CRF or None) or None, and seconds, per image.

        An image whose whole-image inference would exceed the actor's memory share runs tiled
        (``infer_tile``), as every image does with ``--tile``; a failure is that row's error."""
        results: list[tuple | None] = [None] * len(images)
        seconds = [0.0] * len(images)
        inf = self.inference
        encoding = inf.probs_encoding if self.crf_follows or self.crf is not None else None
        budget_tiled = replace(inf, tile=BUDGET_TILE, tile_overlap=min(inf.tile_overlap, BUDGET_TILE // 2))
        whole = []
        for j, image in enumerate(images):
            h, w = image.shape[:2]
            config = inf
            if not inf.tile and self.budget is not None and infer_bytes(h, w, inf.scales, inf.flip) > self.budget:
                config = budget_tiled
            if not config.tile or max(h, w) <= config.tile:
                whole.append(j)
                continue
            out["infer_tile"][todo[j]] = config.tile
            start = time.perf_counter()
            try:
                mask, summary, encoded = tiled_outputs(self.model, image, mean=self.mean, std=self.std,
                                                       config=config, encoding=encoding)
            except Exception as exc:
                mark_error(out, todo[j], "infer", exc, f"inference failed: {exc}")
                continue
            release_freed()
            if encoded is not None and self.crf_follows:
                encoded = encoded.tobytes()  # the batch column to the CRF pool holds bytes; the fused CRF reads the array
            results[j], seconds[j] = (mask.tobytes(), summary, b"" if encoded is None else encoded, None), \
                time.perf_counter() - start
        times: list[float] = []
        try:
            probs = infer_batch(self.model, [images[j] for j in whole], mean=self.mean, std=self.std,
                                config=inf, seconds=times)
        except Exception:
            # Find the image that fails (e.g. out of memory on a huge one) without losing the others.
            probs, times = [], []
            for j in whole:
                one: list[float] = []
                try:
                    probs.append(infer_batch(self.model, [images[j]], mean=self.mean, std=self.std,
                                             config=inf, seconds=one)[0])
                except Exception as exc:
                    mark_error(out, todo[j], "infer", exc, f"inference failed: {exc}")
                    probs.append(None)
                times.append(one[0] if one else 0.0)
        for k, j in enumerate(whole):
            p, probs[k] = probs[k], None  # the full-size probabilities go as soon as they are encoded
            if p is not None:
                on_device = self.crf is not None and self.crf.backend == "torch"  # refined where they are
                results[j] = (class_map(p).cpu().numpy().tobytes(), uncertainty(p, inf.low_conf_threshold),
                              encode_probs(p, encoding) if encoding and not on_device else b"",
                              p if on_device else None)
                seconds[j] = times[k]
        return results, seconds

