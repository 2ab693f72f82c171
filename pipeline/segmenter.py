"""The Ray Data actor that segments images: model loaded once, multi-scale inference per image,
tiled when an image would exceed the actor's memory share, and the CRF fused in where the plan
says so (pipeline/stages.py)."""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from functools import partial

import numpy as np
import ray
import torch

from pipeline.checkpoints import normalisation
from pipeline.config import CRFParams, InferenceConfig
from pipeline.crf_fused import FusedCRF
from pipeline.inference import autocast, class_map, infer_batch, load_model, multiscale_probs, tile_starts
from pipeline.memory import BUDGET_TILE, crf_budget, image_budget, infer_bytes, release_freed
from pipeline.metrics import uncertainty, uncertainty_summary
from pipeline.observability import stage_metrics
from pipeline.probs import encode_probs
from pipeline.results import mark_error, result_table
from pipeline.schema import add_columns, to_stream
from pipeline.testing import limit_memory_if_asked

_BAND_ROWS = 64


class _Bands:
    """The outputs of tiled inference, filled a band of finished rows at a time: the class map, the
    uncertainty sums and (``encoding``) the encoded probabilities."""

    def __init__(self, height: int, width: int, encoding: str | None, low_conf_threshold: float) -> None:
        self.mask = np.empty((height, width), dtype=np.uint8)
        self.encoding, self.threshold = encoding, low_conf_threshold
        self.encoded: np.ndarray | None = None
        self.top_sum = self.entropy_sum = self.low = 0.0

    def add(self, band: torch.Tensor, row: int) -> None:
        """(C, rows, W) averaged probabilities of the image rows from ``row`` on."""
        end = row + band.shape[1]
        self.mask[row:end] = class_map(band).numpy()
        best = band.max(dim=0).values
        self.top_sum += float(best.double().sum())
        self.entropy_sum += float(-(band * band.clamp_min(1e-12).log()).sum(dim=0).double().sum())
        self.low += float((best < self.threshold).sum())
        if self.encoding:
            if self.encoded is None:
                self.encoded = np.empty((band.shape[0], *self.mask.shape), dtype=np.dtype(self.encoding))
            self.encoded[:, row:end] = np.frombuffer(
                encode_probs(band, self.encoding), dtype=self.encoded.dtype
            ).reshape(band.shape)

    def summary(self, num_classes: int) -> dict[str, float]:
        pixels = self.mask.size
        return uncertainty_summary(self.top_sum / pixels, self.entropy_sum / pixels, self.low / pixels, num_classes)


def _coverage(length: int, starts: list[int], tile: int) -> torch.Tensor:
    """How many windows cover each row (or column)."""
    count = torch.zeros(length)
    for start in starts:
        count[start : start + tile] += 1
    return count


def _window(
    model: torch.nn.Module, window: torch.Tensor, *, mean: torch.Tensor, std: torch.Tensor, config: InferenceConfig
) -> torch.Tensor:
    """(C, h, w) probabilities on the host of one (h, w, 3) uint8 window."""
    device = mean.device
    x = window.to(device).permute(2, 0, 1)[None].float().div_(255.0)
    x = (x - mean) / std
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, config.precision):
        return multiscale_probs(model, x, config.scales, config.flip, config.average)[0].float().cpu()


def tiled_outputs(
    model: torch.nn.Module,
    rgb: np.ndarray,
    *,
    mean: torch.Tensor,
    std: torch.Tensor,
    config: InferenceConfig,
    encoding: str | None,
) -> tuple[np.ndarray, dict[str, float], np.ndarray | None]:
    """What ``Segmenter`` keeps of sliding-window inference on one RGB uint8 image — the pre-CRF
    class map, the uncertainty summaries and (``encoding``) the encoded probabilities — computed
    band by band: the same windows and averages as ``sliding_window_probs``, but neither the
    normalised image nor the probabilities ever exist at full size in float32, so memory is the
    image, the outputs and two tile rows of probabilities."""
    height, width = rgb.shape[:2]
    tile, stride = config.tile, max(1, config.tile - config.tile_overlap)
    tops, lefts = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    rows, cols = _coverage(height, tops, tile), _coverage(width, lefts, tile)
    with warnings.catch_warnings():  # the batch's image buffer is read-only; windows are only read
        warnings.simplefilter("ignore", UserWarning)
        host = torch.from_numpy(rgb)
    out = _Bands(height, width, encoding, config.low_conf_threshold)
    acc = None  # rows top..top+tile of the probabilities summed over windows
    with torch.inference_mode():
        for n, top in enumerate(tops):
            bottom = min(top + tile, height)
            for left in lefts:
                p = _window(model, host[top:bottom, left : left + tile], mean=mean, std=std, config=config)
                if acc is None:
                    acc = torch.zeros(p.shape[0], min(tile, height), width)
                acc[:, : bottom - top, left : left + p.shape[2]] += p
            done = (tops[n + 1] if n + 1 < len(tops) else height) - top  # rows no later window touches
            for r0 in range(0, done, _BAND_ROWS):  # a few rows at a time keeps the temporaries small
                r1 = min(done, r0 + _BAND_ROWS)
                out.add(acc[:, r0:r1] / (rows[top + r0 : top + r1, None] * cols[None, :]), top + r0)
            keep = bottom - top - done  # rows the next tile row adds to, moved to the top of acc
            acc[:, :keep] = acc[:, done : done + keep].clone()
            acc[:, keep:] = 0
    # The encoded probabilities stay an array, not bytes: bytes() would copy C bytes a pixel once more.
    return out.mask, out.summary(acc.shape[0]), out.encoded


class Segmenter:
    """Ray Data callable class: model loaded once per actor, multi-scale inference per image.

    Emits per image the pre-CRF argmax mask, confidence summaries and, when a CRF stage follows,
    the averaged probabilities in ``inference.probs_encoding`` (see pipeline/probs.py). With
    ``crf`` it refines each image itself, with ``crf_backend`` (the torch one on the actor's
    device), and emits the result rows: the probabilities never cross the object store.
    """

    def __init__(
        self,
        *,
        model: str,
        weights_uri: str | None,
        storage_options: dict,
        inference: InferenceConfig,
        weights_sha256: str,
        num_classes: int,
        use_gpu: bool,
        threads: int,
        crf_follows: bool,
        run_id: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        crf: CRFParams | None = None,
        crf_backend: str = "pydensecrf",
        actor_memory_mib: int = 0,
    ) -> None:
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.threads = max(1, threads)
        self.model, self.sha256, categories = load_model(
            model,
            weights_uri,
            storage_options=storage_options,
            output_stride=inference.output_stride,
            num_classes=num_classes,
            expected_sha256=weights_sha256,
        )
        self.model.to(self.device)
        self.num_classes = len(categories)
        self.inference = inference
        self.crf_follows = crf_follows
        # The last compute stage emits the result rows; before a CRF pool, the stream goes on.
        self.emit = (
            to_stream
            if crf_follows
            else partial(
                result_table, num_classes=self.num_classes, model=model, weights_sha256=self.sha256, run_id=run_id
            )
        )
        self.mean, self.std = normalisation(mean, std, self.device)
        limit_memory_if_asked()
        self.budget = image_budget(actor_memory_mib)  # measured now that the model is loaded
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.metrics = stage_metrics("infer")
        # Refine in this actor, right after inference (no CRF pool follows).
        self.crf = (
            None
            if crf is None
            else FusedCRF(
                crf,
                backend=crf_backend,
                encoding=inference.probs_encoding,
                num_classes=self.num_classes,
                node_id=self.node_id,
                device=self.device,
            )
        )

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
        images = [
            np.frombuffer(batch["image"][i], dtype=np.uint8).reshape(int(batch["height"][i]), int(batch["width"][i]), 3)
            for i in todo
        ]
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
        return self.emit(out)

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
            results[j] = self._tiled(out, todo[j], image, config, encoding)
            seconds[j] = time.perf_counter() - start
        self._whole(out, todo, images, whole, encoding, results, seconds)
        return results, seconds

    def _tiled(
        self, out: dict[str, list], i: int, image: np.ndarray, config: InferenceConfig, encoding: str | None
    ) -> tuple | None:
        try:
            mask, summary, encoded = tiled_outputs(
                self.model, image, mean=self.mean, std=self.std, config=config, encoding=encoding
            )
        except Exception as exc:
            mark_error(out, i, "infer", exc, f"inference failed: {exc}")
            return None
        release_freed()
        if encoded is not None and self.crf_follows:
            encoded = encoded.tobytes()  # the CRF pool's batch column holds bytes; the fused CRF reads the array
        return mask.tobytes(), summary, b"" if encoded is None else encoded, None

    def _whole(
        self,
        out: dict[str, list],
        todo: list[int],
        images: list[np.ndarray],
        whole: list[int],
        encoding: str | None,
        results: list,
        seconds: list[float],
    ) -> None:
        """Whole-image inference of ``images[j]`` for j in ``whole``, into ``results``/``seconds``."""
        inf = self.inference
        times: list[float] = []
        try:
            probs = infer_batch(
                self.model, [images[j] for j in whole], mean=self.mean, std=self.std, config=inf, seconds=times
            )
        except Exception:
            # Find the image that fails (e.g. out of memory on a huge one) without losing the others.
            probs, times = [], []
            for j in whole:
                one: list[float] = []
                try:
                    probs.append(
                        infer_batch(self.model, [images[j]], mean=self.mean, std=self.std, config=inf, seconds=one)[0]
                    )
                except Exception as exc:
                    mark_error(out, todo[j], "infer", exc, f"inference failed: {exc}")
                    probs.append(None)
                times.append(one[0] if one else 0.0)
        on_device = self.crf is not None and self.crf.backend == "torch"  # refined where they are
        for k, j in enumerate(whole):
            p, probs[k] = probs[k], None  # the full-size probabilities go as soon as they are encoded
            if p is not None:
                results[j] = (
                    class_map(p).cpu().numpy().tobytes(),
                    uncertainty(p, inf.low_conf_threshold),
                    encode_probs(p, encoding) if encoding and not on_device else b"",
                    p if on_device else None,
                )
                seconds[j] = times[k]
