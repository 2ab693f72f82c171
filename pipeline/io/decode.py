"""Read + decode stage: bytes from any fsspec URI to RGB pixels and validated labels.

On GPU plans it runs in its own small actor pool (``Decoder``), so this module stays free of torch:
a decode worker that imported torch paid seconds and a GB of RSS before its first image
(docs/benchmarks.md). Without GPUs each inference actor runs a ``Decoder`` on its own batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.io.images import (
    IMAGE_FORMATS,
    MAX_IMAGE_BYTES,
    MAX_LABEL_BYTES,
    Refused,
    decode_image,
    encode_thumbnail,
    thumbnail_size,
)
from pipeline.io.palette import IGNORE_INDEX, LabelMismatch, label_to_mask, mask_to_png
from pipeline.io.storage import Locator, ObjectTooLarge, read_bytes
from pipeline.observability import stage_metrics
from pipeline.rows import flight
from pipeline.rows.batch import Rows
from pipeline.rows.errors import ERROR_COLUMNS

FETCH_THREADS = 16
Reader = Callable[[], "bytes | None"]


def fetch_all(
    uris: list[str], storage_options: dict, pool: ThreadPoolExecutor | None = None, *, limit: int | None = None
) -> list[bytes | Exception | None]:
    """Every object's bytes (or the exception reading it raised; None for an empty URI), fetched
    concurrently (``fetch_each``); with ``limit``, at most that many bytes each."""
    return fetch_each([partial(read_bytes, u, storage_options, limit=limit) if u else None for u in uris], pool)


def fetch_each(readers: list[Reader | None], pool: ThreadPoolExecutor | None = None) -> list[bytes | Exception | None]:
    """Each reader's bytes (or the exception it raised; None for no reader), concurrently: one GET
    at a time would leave a fast accelerator waiting on object-store latency (tens of ms per GET),
    and a thread per request is what fsspec's sync API allows without ``fs.cat([...])``, which
    would glob-expand keys containing ``?``, ``*`` or ``[``. ``pool``: an actor's long-lived
    threads (else a pool for this call)."""

    def fetch(reader: Reader | None) -> bytes | Exception | None:
        if reader is None:
            return None
        try:
            return reader()
        except Exception as exc:  # reported per row by the caller
            return exc

    if len(readers) <= 1:
        return [fetch(r) for r in readers]
    if pool is not None:
        return list(pool.map(fetch, readers))
    with ThreadPoolExecutor(min(FETCH_THREADS, len(readers))) as own:
        return list(own.map(fetch, readers))


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    storage_options: dict,
    num_classes: int,
    max_pixels: int | None,
    pool: ThreadPoolExecutor | None = None,
    locator: Locator | None = None,
) -> dict[str, np.ndarray]:
    """Read and decode images and labels; any failure becomes that row's error. With ``locator``
    each object is read at the key's exact path (``Locator.read_*``), else from the batch's URIs."""
    n = len(batch["key"])
    keys = [str(k) for k in batch["key"]]
    rows = Rows.of({"key": keys}, "decode")
    rows.fill(uri=list(batch["uri"]))
    uris, label_uris = [str(u) for u in batch["uri"]], [str(u) for u in batch["label_uri"]]
    start = time.perf_counter()
    if locator is not None:
        readers: list[Reader | None] = [partial(locator.read_image, k, MAX_IMAGE_BYTES) for k in keys]
        readers += [
            partial(locator.read_label, k, MAX_LABEL_BYTES) if u else None
            for k, u in zip(keys, label_uris, strict=True)
        ]
        fetched = fetch_each(readers, pool)
    else:
        fetched = fetch_all(uris, storage_options, pool, limit=MAX_IMAGE_BYTES)
        fetched += fetch_all(label_uris, storage_options, pool, limit=MAX_LABEL_BYTES)
    images, labels = fetched[:n], fetched[n:]
    fetch_seconds = (time.perf_counter() - start) / max(1, n)  # each image's share, in its decode time
    for i in range(n):
        flight.record("decode", [keys[i]])  # a decoder that crashes on this one's bytes names it
        uri, label_uri = uris[i], label_uris[i]
        start = time.perf_counter() - fetch_seconds
        decoded = _decoded(rows, i, uri, images[i], max_pixels)
        images[i] = None  # the encoded bytes go as soon as the pixels exist
        if decoded is None:
            continue
        stage_metrics("decode").ok(time.perf_counter() - start)
        h, w = decoded.rgb.shape[:2]
        rows.set(
            i,
            image=decoded.rgb.tobytes(),
            height=h,
            width=w,
            exif_orientation=decoded.exif_orientation or 0,
            thumbnail=encode_thumbnail(decoded.rgb),
        )
        if not label_uri:
            continue
        label, problem = check_label(labels[i], label_uri, (h, w), num_classes)
        labels[i] = None
        if problem:  # a QA artefact: the image is still segmented, its label is not scored
            rows.set(i, label_error=problem[:1000])
            stage_metrics("label").error()
        elif label is not None:
            thumb = mask_to_png(_nearest(label, thumbnail_size(label.shape)))
            rows.set(i, label=label.tobytes(), has_label=True, label_thumbnail=thumb)
    return rows.stream()


def _decoded(rows: Rows, i: int, uri: str, data: bytes | Exception | None, max_pixels: int | None):
    """Row ``i``'s decoded image, or None with the row's read or decode error marked."""
    if isinstance(data, ObjectTooLarge):
        rows.fail(i, "decode", data, str(data))
        return None
    if isinstance(data, Exception):
        rows.fail(i, "read", data, f"cannot read {uri}: {data}")
        return None
    if data is None:  # no reader: nothing to decode
        rows.fail(i, "read", None, f"cannot read {uri}: no object")
        return None
    try:
        return decode_image(data, max_pixels=max_pixels)
    except Refused as exc:
        rows.fail(i, "decode", exc, f"refused before decoding: {exc}")
    except UnidentifiedImageError as exc:
        shown = f"{len(data)} bytes starting {data[:12]!r}"
        rows.fail(
            i,
            "decode",
            exc,
            f"not a readable image: {shown} are in none of the accepted formats ({', '.join(IMAGE_FORMATS)})",
        )
    except Image.DecompressionBombError as exc:  # Pillow's own guard, during decoding
        rows.fail(i, "decode", exc, f"refused while decoding: over Pillow's bomb limit: {exc}")
    except Exception as exc:
        rows.fail(i, "decode", exc, f"cannot decode image ({len(data)} bytes): {exc}")
    return None


def _nearest(ids: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Class ids resampled to ``shape`` by nearest neighbour (ids are labels, never blended)."""
    rows = (np.arange(shape[0]) * ids.shape[0] // shape[0]).clip(0, ids.shape[0] - 1)
    cols = (np.arange(shape[1]) * ids.shape[1] // shape[1]).clip(0, ids.shape[1] - 1)
    return ids[rows[:, None], cols[None, :]]


def check_label(
    data: bytes | Exception | None, uri: str, shape: tuple[int, int], num_classes: int
) -> tuple[np.ndarray | None, str]:
    """(label, "") for a usable label, (None, "") for none, (None, why) for one that cannot be scored.
    The label is decoded only after its header matched the image's size (``palette.label_to_mask``)."""
    if data is None or isinstance(data, FileNotFoundError):
        return None, ""  # images without a label are still segmented
    if isinstance(data, ObjectTooLarge):
        return None, f"label {data}"
    if isinstance(data, Exception):
        return None, f"cannot read label {uri}: {type(data).__name__}: {data}"
    try:
        label = label_to_mask(data, shape)
    except LabelMismatch as exc:
        return None, str(exc)
    except (Refused, Image.DecompressionBombError) as exc:
        return None, f"label refused before decoding: {exc}"
    except UnidentifiedImageError:
        return None, f"cannot decode label {uri}: {len(data)} bytes starting {data[:12]!r} are not a PNG"
    except Exception as exc:
        return None, f"cannot decode label {uri}: {exc}"
    bad = np.unique(label[(label >= num_classes) & (label != IGNORE_INDEX)])
    if bad.size:
        return None, (
            f"label has class ids {bad[:10].tolist()} outside 0..{num_classes - 1} (and {IGNORE_INDEX} = ignore)"
        )
    return label, ""


@dataclass(frozen=True, kw_only=True)
class DecodeSpec:
    """What a ``Decoder`` needs: where the keys' objects are, how to reach them, the classes a label
    may hold and the pixel guard (None: tiled inference bounds memory instead)."""

    locator: Locator
    storage_options: dict
    num_classes: int
    max_pixels: int | None


class Decoder:
    """Ray Data callable class running ``decode_batch`` (or, without GPUs, the ``Segmenter``'s first step).

    An actor pool rather than tasks: decode tasks wait (backpressured) while inference catches
    up, and Ray ends a worker that idles beyond its soft limit of one worker per CPU, which the
    inference actors already hold, so each next decode task started a new Python worker (slower
    and larger: docs/benchmarks.md, "Design choices"). An actor stays up for the whole run.
    """

    def __init__(self, spec: DecodeSpec) -> None:
        self.spec = spec
        # One set of fetch threads for the actor's life: a pool per batch started 16 threads a call.
        self.pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="deeplab-fetch")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]  # URIs are derived here: the driver ships keys only
        locator = self.spec.locator
        batch = {
            "key": batch["key"],
            "uri": np.array([locator.image_uri(k) for k in keys], dtype=object),
            "label_uri": np.array([locator.label_uri(k) for k in keys], dtype=object),
        }
        return decode_batch(
            batch,
            storage_options=self.spec.storage_options,
            num_classes=self.spec.num_classes,
            max_pixels=self.spec.max_pixels,
            pool=self.pool,
            locator=locator,
        )

    def failed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The stage's rows for inputs that arrive failed (``pipeline.rows.flight``): nothing is read."""
        keys = [str(k) for k in batch["key"]]
        rows = Rows.of({"key": keys}, "decode")
        rows.fill(uri=[self.spec.locator.image_uri(k) for k in keys])
        rows.fill(**{name: [str(v) for v in batch[name]] for name in ERROR_COLUMNS})
        return rows.stream()

    def probe(self, stage: str, key: str) -> bool | None:
        """Whether decoding ``key`` alone kills a throwaway process too (a Ray task on this node): True
        if it does, False if not, None for a step other than decoding or no answer."""
        if stage != "decode":
            return None
        import ray
        from ray.exceptions import OutOfMemoryError, WorkerCrashedError
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        task = _decode_alone_task().options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True))
        try:
            ray.get(task.remote(self.spec, key))
        except (WorkerCrashedError, OutOfMemoryError):
            return True
        except Exception:  # the probe could not run: the stage runs the key alone instead
            return None
        return False


class DecodeApart:
    """The decode step of an inference actor that decodes its own images, moved into an actor of its
    own once an input killed the inference actor while decoding (``pipeline.rows.flight``): the
    next input that crashes a decoder costs a restart of that small actor (no torch, no model), which
    isolates it as the decode pool's actors do, not one of the inference actor. Decoded batches then
    cross the object store, as on GPU plans."""

    def __init__(self, decoder: Decoder) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.local = decoder  # failed rows and probes need no other process
        node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        # No CPU of its own: the inference actor waits for it. Owned by that actor, it ends with it.
        remote = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=flight.RETRIES)(_ApartDecoder)
        self.actor: Any = remote.options(scheduling_strategy=node).remote(decoder.spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        return ray.get(self.actor.decode.remote({"key": batch["key"]}))

    def failed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.local.failed(batch)

    def probe(self, stage: str, key: str) -> bool | None:
        return self.local.probe(stage, key)


class _ApartDecoder:
    """``DecodeApart``'s actor: a ``Decoder`` whose calls run through its own flight recorder."""

    def __init__(self, spec: DecodeSpec) -> None:
        self.decoder = flight.isolating(Decoder, "decode")(spec)

    def decode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.decoder(batch)


_DECODE_ALONE = None


def _decode_alone_task():
    """``decode_alone`` as a Ray task: no CPU of its own (its caller waits for it), never retried."""
    global _DECODE_ALONE
    if _DECODE_ALONE is None:
        import ray

        _DECODE_ALONE = ray.remote(num_cpus=0, max_retries=0)(decode_alone)
    return _DECODE_ALONE


def decode_alone(spec: DecodeSpec, key: str) -> None:
    """Read and decode one key as a ``Decoder`` with ``spec`` would, keeping nothing."""
    Decoder(spec)({"key": np.array([key], dtype=object)})
