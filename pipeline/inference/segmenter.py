"""The Ray Data actor that segments images: model loaded once, multi-scale inference per image,
tiled when an image would exceed the actor's memory share, and the CRF fused in where the plan
says so (pipeline/dag/stages.py)."""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial

import numpy as np
import ray
import torch

from pipeline.config.memory import BUDGET_TILE, crf_budget, image_budget, infer_bytes, release_freed
from pipeline.config.sections import CRFParams, InferenceConfig
from pipeline.crf.fused import FusedCRF
from pipeline.evaluation.metrics import uncertainty
from pipeline.evaluation.per_image import result_table
from pipeline.inference.multiscale import infer_batch, load_model, top_class
from pipeline.inference.tiling import tiled_outputs
from pipeline.io.decode import DecodeApart, Decoder
from pipeline.models.weights import normalisation
from pipeline.observability import stage_metrics
from pipeline.rows import flight
from pipeline.rows.errors import mark_error
from pipeline.rows.probs import encode_probs
from pipeline.rows.schema import add_columns, to_stream


class Segmenter:
    """Ray Data callable class: model loaded once per actor, multi-scale inference per image.

    Emits per image the pre-CRF argmax mask, confidence summaries and, when a CRF stage follows,
    the averaged probabilities in ``inference.probs_encoding`` (see pipeline/rows/probs.py). With
    ``crf`` it refines each image itself, with ``crf_backend`` (the torch one on the actor's
    device), and emits the result rows: the probabilities never cross the object store. With
    ``decode`` (a ``Decoder``'s arguments) it reads and decodes its batch of keys itself.
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
        rows_follow: bool = False,
        run_id: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        crf: CRFParams | None = None,
        crf_backend: str = "pydensecrf",
        actor_memory_mib: int = 0,
        decode: dict | None = None,
        weights_data: ray.ObjectRef | bytes | None = None,
    ) -> None:
        self.decoder: Decoder | DecodeApart | None = None if decode is None else Decoder(**decode)
        recorder = flight.current()
        if self.decoder is not None and recorder is not None and "decode" in recorder.died_in:
            self.decoder = DecodeApart(self.decoder)  # an input killed this actor while decoding
        if isinstance(weights_data, ray.ObjectRef):  # the driver's copy: no download per actor and restart
            weights_data = ray.get(weights_data)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.threads = max(1, threads)
        self.model, self.sha256, categories = load_model(
            model,
            weights_uri,
            storage_options=storage_options,
            output_stride=inference.output_stride,
            num_classes=num_classes,
            expected_sha256=weights_sha256,
            data=weights_data,
        )
        del weights_data
        self.model.to(self.device)
        self.num_classes = len(categories)
        self.inference = inference
        self.crf_follows = crf_follows
        # The last compute stage emits the result rows; before a CRF pool, the stream goes on, and
        # before the result-row tasks (pipeline/dag/stages.py) it goes on without images or probabilities.
        self.emit = (
            to_stream
            if crf_follows
            else _without_pixels
            if rows_follow
            else partial(
                result_table, num_classes=self.num_classes, model=model, weights_sha256=self.sha256, run_id=run_id
            )
        )
        self.mean, self.std = normalisation(mean, std, self.device)
        self.budget = image_budget(actor_memory_mib)  # measured now that the model is loaded
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.metrics = stage_metrics("infer")
        # Refine in this actor, right after inference (no CRF pool follows).
        self.crf = None if crf is None else self._fused(crf, crf_backend)

    def _fused(self, params: CRFParams, backend: str) -> FusedCRF:
        encoding = self.inference.probs_encoding
        return FusedCRF(
            params,
            backend=backend,
            encoding=encoding,
            num_classes=self.num_classes,
            node_id=self.node_id,
            device=self.device,
        )

    def __call__(self, batch: dict[str, np.ndarray]):
        return self._segment(self.decoder(batch) if self.decoder is not None else batch)

    def failed(self, batch: dict[str, np.ndarray]):
        """The stage's rows for inputs that arrive failed (``pipeline.rows.flight``): passed through,
        nothing read or run."""
        return self._segment(self.decoder.failed(batch) if self.decoder is not None else batch)

    def _segment(self, batch: dict[str, np.ndarray]):
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
        flight.record("infer", [out["key"][i] for i in todo])
        results, seconds = self._infer(out, todo, images)
        refine = []  # (row, image, probabilities on the device or None, memory budget) for the fused CRF
        for j, (i, image) in enumerate(zip(todo, images, strict=True)):
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
                    self._refine(out, refine)
                    refine = []
        if refine and self.crf is not None:
            self._refine(out, refine)
        flight.record("infer", out["key"])
        return self.emit(out)

    def _refine(self, out: dict[str, list], refine: list) -> None:
        assert self.crf is not None
        flight.record("crf", [out["key"][i] for i, *_ in refine])
        self.crf(out, refine)

    def probe(self, stage: str, key: str) -> bool | None:
        """The decode step's probe (``Decoder.probe``) when this actor decodes its own images."""
        return self.decoder.probe(stage, key) if self.decoder is not None else None

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
        encoded: np.ndarray | bytes | None
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
            probs: list[torch.Tensor | None] = list(
                infer_batch(
                    self.model, [images[j] for j in whole], mean=self.mean, std=self.std, config=inf, seconds=times
                )
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
                top, mask = top_class(p)
                results[j] = (
                    mask.cpu().numpy().tobytes(),
                    uncertainty(p, inf.low_conf_threshold, top=top),
                    encode_probs(p, encoding) if encoding and not on_device else b"",
                    p if on_device else None,
                )
                seconds[j] = times[k]


def _without_pixels(out: dict[str, list]) -> dict[str, np.ndarray]:
    """The stream for the result rows: labels, masks and statistics, not the image nor its probabilities."""
    return to_stream({k: v for k, v in out.items() if k not in ("image", "probs")})
