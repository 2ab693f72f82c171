"""The Ray Data actor that segments images: model loaded once, multi-scale inference per image,
tiled when an image would exceed the actor's memory share, and the CRF fused in where the plan
says so (pipeline/dag/stages.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import ray
import torch

from pipeline.config.memory import BUDGET_TILE, crf_budget, image_budget, infer_bytes, release_freed, steady_heap
from pipeline.config.sections import CRFParams, InferenceConfig
from pipeline.crf.densecrf import Refinement
from pipeline.crf.fused import FusedCRF, ToRefine
from pipeline.evaluation.metrics import uncertainty
from pipeline.evaluation.per_image import result_table
from pipeline.inference.multiscale import infer_batch, load_model, top_class
from pipeline.inference.tiling import tiled_outputs
from pipeline.io.decode import DecodeApart, Decoder, DecodeSpec
from pipeline.models.weights import Weights, normalisation
from pipeline.observability import stage_metrics
from pipeline.rows import flight
from pipeline.rows.batch import Rows
from pipeline.rows.probs import encode_probs
from pipeline.rows.schema import to_stream


@dataclass(frozen=True, kw_only=True)
class InferSpec:
    """What a ``Segmenter`` needs, resolved on the driver: the weights record (model, checksum,
    classes, normalisation), the inference section, the placement the resource plan chose, and the
    stages it runs itself (``decode``: a ``Decoder``'s spec; ``crf``: refine with ``crf_backend``)."""

    weights: Weights
    inference: InferenceConfig
    storage_options: dict
    run_id: str
    use_gpu: bool = False
    threads: int = 1
    actor_memory_mib: int = 0
    crf_follows: bool = False  # a CRF pool refines next: emit the stream with probabilities
    rows_follow: bool = False  # result-row tasks follow: emit labels and masks, not images
    crf: CRFParams | None = None  # refine in this actor (no CRF pool follows)
    crf_backend: str = "pydensecrf"
    decode: DecodeSpec | None = None


@dataclass
class Inferred:
    """What inference keeps of one image: its pre-CRF class map (uint8 bytes), uncertainty summaries,
    the probabilities encoded for a CRF (b"" when none runs, an array from tiling for the fused CRF),
    the probabilities on the device for the fused torch CRF (else None), and its seconds."""

    mask: bytes
    summary: dict[str, float]
    encoded: bytes | np.ndarray
    on_device: torch.Tensor | None
    seconds: float


class Segmenter:
    """Ray Data callable class: model loaded once per actor, multi-scale inference per image.

    Emits per image the pre-CRF argmax mask, confidence summaries and, when a CRF stage follows,
    the averaged probabilities in ``inference.probs_encoding`` (see pipeline/rows/probs.py). With
    ``spec.crf`` it refines each image itself, with ``spec.crf_backend`` (the torch one on the
    actor's device), and emits the result rows: the probabilities never cross the object store.
    With ``spec.decode`` it reads and decodes its batch of keys itself. ``weights_data``: the
    checkpoint's bytes (or their object-store reference), a payload beside the spec, not part of it.
    """

    def __init__(self, spec: InferSpec, weights_data: ray.ObjectRef | bytes | None = None) -> None:
        steady_heap()
        self.decoder: Decoder | DecodeApart | None = None if spec.decode is None else Decoder(spec.decode)
        recorder = flight.current()
        if self.decoder is not None and recorder is not None and "decode" in recorder.died_in:
            self.decoder = DecodeApart(self.decoder)  # an input killed this actor while decoding
        # The driver's copy: no download per actor and restart.
        data: bytes | None = ray.get(weights_data) if isinstance(weights_data, ray.ObjectRef) else weights_data
        del weights_data
        self.device = torch.device("cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
        self.threads = max(1, spec.threads)
        weights, inference = spec.weights, spec.inference
        loaded = load_model(
            weights.model,
            weights.uri,
            storage_options=spec.storage_options,
            output_stride=inference.output_stride,
            num_classes=weights.num_classes,
            expected_sha256=weights.sha256,
            data=data,
        )
        del data
        self.model, self.sha256 = loaded.model, loaded.sha256
        self.model.to(self.device)
        self.num_classes = len(loaded.categories)
        self.inference = inference
        self.crf_follows = spec.crf_follows
        # The last compute stage emits the result rows; before a CRF pool, the stream goes on, and
        # before the result-row tasks (pipeline/dag/stages.py) it goes on without images or probabilities.
        self.emit = (
            to_stream
            if spec.crf_follows
            else _without_pixels
            if spec.rows_follow
            else partial(
                result_table,
                num_classes=self.num_classes,
                model=weights.model,
                weights_sha256=self.sha256,
                run_id=spec.run_id,
            )
        )
        self.mean, self.std = normalisation(weights.mean, weights.std, self.device)
        self.budget = image_budget(spec.actor_memory_mib)  # measured now that the model is loaded
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.metrics = stage_metrics("infer")
        # Refine in this actor, right after inference (no CRF pool follows).
        self.crf = None if spec.crf is None else self._fused(spec.crf, spec.crf_backend)

    def _fused(self, params: CRFParams, backend: str) -> FusedCRF:
        how = Refinement(
            params=params, encoding=self.inference.probs_encoding, num_classes=self.num_classes, node_id=self.node_id
        )
        return FusedCRF(how, backend=backend, device=self.device)

    def __call__(self, batch: dict[str, np.ndarray]):
        return self._segment(self.decoder(batch) if self.decoder is not None else batch)

    def failed(self, batch: dict[str, np.ndarray]):
        """The stage's rows for inputs that arrive failed (``pipeline.rows.flight``): passed through,
        nothing read or run."""
        return self._segment(self.decoder.failed(batch) if self.decoder is not None else batch)

    def probe(self, stage: str, key: str) -> bool | None:
        """The decode step's probe (``Decoder.probe``) when this actor decodes its own images."""
        return self.decoder.probe(stage, key) if self.decoder is not None else None

    def _segment(self, batch: dict[str, np.ndarray]):
        if self.device.type == "cpu":
            # Per call, not once in __init__: Ray Data calls this from another thread than the
            # constructor, and OpenMP's thread count is per thread. oneDNN's convolutions read it
            # there and ran on one core (Ray starts workers with OMP_NUM_THREADS=1), while
            # torch.get_num_threads() still said 2 — half the CPU fallback's throughput.
            torch.set_num_threads(self.threads)
        rows = Rows.of(batch, "infer")
        rows.fill(infer_node=[self.node_id] * len(rows))
        todo = rows.pending()
        images = [
            np.frombuffer(batch["image"][i], dtype=np.uint8).reshape(int(batch["height"][i]), int(batch["width"][i]), 3)
            for i in todo
        ]
        flight.record("infer", [rows["key"][i] for i in todo])
        results = self._infer(rows, todo, images)
        refine: list[ToRefine] = []  # for the fused CRF
        for j, (i, image) in enumerate(zip(todo, images, strict=True)):
            result, results[j] = results[j], None  # each image's outputs go once they are in its row
            if result is None:
                continue
            rows.set(i, mask_pre=result.mask, probs=result.encoded, infer_ms=result.seconds * 1000.0, **result.summary)
            self.metrics.ok(result.seconds)
            on_device, result = result.on_device, None  # the row holds the outputs now, the CRF the rest
            if self.crf is not None:
                budget = crf_budget(self.budget, *image.shape[:2], self.num_classes)
                refine.append(ToRefine(i, image, on_device, budget))
                if not self.crf.batched:  # one image at a time: each one's probabilities go as it is refined
                    self._refine(rows, refine)
                    refine = []
        if refine and self.crf is not None:
            self._refine(rows, refine)
        flight.record("infer", rows["key"])
        return self.emit(rows.columns)

    def _refine(self, rows: Rows, refine: list[ToRefine]) -> None:
        assert self.crf is not None
        flight.record("crf", [rows["key"][item.row] for item in refine])
        self.crf(rows, refine)

    def _infer(self, rows: Rows, todo: list[int], images: list[np.ndarray]) -> list[Inferred | None]:
        """Each image's ``Inferred``, or None where it failed (that row's error).

        An image whose whole-image inference would exceed the actor's memory share runs tiled
        (``infer_tile``), as every image does with ``--tile``."""
        results: list[Inferred | None] = [None] * len(images)
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
            rows.set(todo[j], infer_tile=config.tile)
            results[j] = self._tiled(rows, todo[j], image, config, encoding)
        done = self._whole(rows, [todo[j] for j in whole], [images[j] for j in whole], encoding)
        for j, result in zip(whole, done, strict=True):
            results[j] = result
        return results

    def _tiled(
        self, rows: Rows, i: int, image: np.ndarray, config: InferenceConfig, encoding: str | None
    ) -> Inferred | None:
        start = time.perf_counter()
        try:
            tiled = tiled_outputs(self.model, image, mean=self.mean, std=self.std, config=config, encoding=encoding)
        except Exception as exc:
            rows.fail(i, "infer", exc, f"inference failed: {exc}")
            return None
        release_freed()
        encoded: np.ndarray | bytes = b"" if tiled.encoded is None else tiled.encoded
        if tiled.encoded is not None and self.crf_follows:
            encoded = tiled.encoded.tobytes()  # the CRF pool's batch column holds bytes; the fused CRF reads the array
        return Inferred(tiled.mask.tobytes(), tiled.summary, encoded, None, time.perf_counter() - start)

    def _whole(
        self, rows: Rows, indices: list[int], images: list[np.ndarray], encoding: str | None
    ) -> list[Inferred | None]:
        """Whole-image inference of ``images`` (rows ``indices``): each one's ``Inferred``, or None
        where it failed (that row's error)."""
        inf = self.inference
        times: list[float] = []
        try:
            probs: list[torch.Tensor | None] = list(
                infer_batch(self.model, images, mean=self.mean, std=self.std, config=inf, seconds=times)
            )
        except Exception:
            # Find the image that fails (e.g. out of memory on a huge one) without losing the others.
            probs, times = [], []
            for i, image in zip(indices, images, strict=True):
                one: list[float] = []
                try:
                    probs.append(
                        infer_batch(self.model, [image], mean=self.mean, std=self.std, config=inf, seconds=one)[0]
                    )
                except Exception as exc:
                    rows.fail(i, "infer", exc, f"inference failed: {exc}")
                    probs.append(None)
                times.append(one[0] if one else 0.0)
        on_device = self.crf is not None and self.crf.backend == "torch"  # refined where they are
        results: list[Inferred | None] = []
        for k in range(len(images)):
            p, probs[k] = probs[k], None  # the full-size probabilities go as soon as they are encoded
            if p is None:
                results.append(None)
                continue
            top, mask = top_class(p)
            results.append(
                Inferred(
                    mask.cpu().numpy().tobytes(),
                    uncertainty(p, inf.low_conf_threshold, top=top),
                    encode_probs(p, encoding) if encoding and not on_device else b"",
                    p if on_device else None,
                    times[k],
                )
            )
        return results


def _without_pixels(out: dict[str, list]) -> dict[str, np.ndarray]:
    """The stream for the result rows: labels, masks and statistics, not the image nor its probabilities."""
    return to_stream({k: v for k, v in out.items() if k not in ("image", "probs")})
