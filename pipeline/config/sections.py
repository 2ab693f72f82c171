"""Frozen configuration of a run: what to read, which model, inference, CRF, compute, outputs."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import ClassVar

from pipeline.config.flags import check_fields, json_object, option, parse_range, parse_scales, section
from pipeline.io.credentials import public_uri, redact
from pipeline.models import MODEL_BUILDERS
from pipeline.rows.probs import ENCODINGS

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CRF_BACKENDS = ("auto", "pydensecrf", "torch")
MIN_ACTOR_MEMORY_MIB = 256


@dataclass(frozen=True)
class CRFParams:
    """Fully connected CRF (Krähenbühl & Koltun 2011) as used by DeepLab.

    Defaults are DeepLab v2's published PASCAL VOC values for ResNet-101 (Chen et al., TPAMI 2018,
    Sec. 4.1 and the released ``test.prototxt`` dense-CRF layer): bilateral ``w1=4, θα=67,
    θβ=3``; Gaussian ``w2=3, θγ=3``; 10 mean-field iterations. DeepLab v1 reports the search
    ranges w1 ∈ [3, 6], θα ∈ [30, 100], θβ ∈ [3, 10]; ``jobs/tune_crf.py``-style tuning on a
    labelled subset is how a new domain should pick them.
    """

    FLAG_PREFIX: ClassVar[str] = "crf-"
    FLAG_GROUP: ClassVar[str] = "crf"
    FLAG_LABEL: ClassVar[str] = "CRF "

    iterations: int = option(10, type=int, lo=1, help="mean-field iterations")
    gaussian_sxy: float = option(3.0, type=float, above=0, help="smoothness kernel θγ (pixels)")
    gaussian_compat: float = option(3.0, type=float, help="smoothness weight w2")
    bilateral_sxy: float = option(67.0, type=float, above=0, help="appearance kernel θα (pixels)")
    bilateral_srgb: float = option(3.0, type=float, above=0, help="appearance kernel θβ (colour)")
    bilateral_compat: float = option(4.0, type=float, help="appearance weight w1")
    min_prob: float = option(1e-6, type=float, above=0, below=1, help="unary = -log(max(p, MIN_PROB)): never log(0)")
    max_pixels: int = option(
        1_000_000,
        type=int,
        lo=0,
        metavar="PIXELS",
        note=" (0: no limit)",
        help="refine larger images at a reduced resolution (masks.crf_scale), which bounds CRF seconds per image "
        "(docs/benchmarks.md); 0: no limit",
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class InferenceConfig:
    """Multi-scale (+flip) inference; predictions are averaged at full resolution."""

    FLAG_GROUP: ClassVar[str] = "inference"

    scales: tuple[float, ...] = option(
        (1.0,),
        type=parse_scales,
        help="comma-separated input scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75 (DeepLab's eval set)",
    )
    flip: bool = option(False, help="also run horizontally flipped inputs and average")
    output_stride: int | None = option(
        None, type=int, choices=(8, 16), help="backbone output stride (default: model's)"
    )
    average: str = option(
        "probs",
        choices=("probs", "logits"),
        help="average softmax probabilities (DeepLab v3) or logits over scales/flips",
    )
    tile: int | None = option(
        None,
        type=int,
        lo=32,
        metavar="PIXELS",
        note=" pixels",
        help="sliding-window inference on PIXELS x PIXELS tiles (very large images, fixed memory)",
    )
    tile_overlap: int = option(128, type=int, metavar="PIXELS", help="overlap between neighbouring tiles")
    max_pixels: int = option(
        50_000_000, type=int, lo=1, help="images declaring more pixels become error rows before decoding, unless --tile"
    )
    precision: str = option(
        "fp32", choices=("fp32", "fp16", "bf16"), help="autocast precision for GPU inference (CPU runs fp32)"
    )
    batching: str = option(
        "bucket",
        choices=("bucket", "pad"),
        help="bucket: batch same-size images (exact); pad: zero-pad a batch to its largest image",
    )
    max_batch_pixels: int = option(
        4 * 1024 * 1024,
        type=int,
        lo=1,
        metavar="PIXELS",
        help="at most this many (padded) pixels per forward pass; a batch runs as several if needed",
    )
    # uint8 is a quarter of float32's bytes for the same CRF labels in practice (benchmarks/crf.py).
    probs_encoding: str = option(
        "uint8", choices=ENCODINGS, help="precision of the probabilities sent to the CRF stage"
    )
    low_conf_threshold: float = option(
        0.5, type=float, above=0, hi=1, help="pixels whose top-class probability is below this count as low-confidence"
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive numbers, got {self.scales}")
        if self.tile is not None and not 0 <= self.tile_overlap < self.tile:
            raise ValueError(f"tile overlap must be in [0, tile), got {self.tile_overlap} for tile {self.tile}")


@dataclass(frozen=True)
class ComputeConfig:
    """Actor pools and resources. Ranges are (min, max) so Ray Data can autoscale the pools."""

    FLAG_GROUP: ClassVar[str] = "compute"

    infer_actors: tuple[int, int] | None = option(
        None,
        type=parse_range,
        metavar="MIN-MAX",
        help="inference actor pool size; a range lets Ray autoscale it (default: from one per GPU in the cluster, or "
        "without GPUs one single-threaded actor per core, up to what the autoscaler's nodes hold at their most, "
        "or with no most where it publishes none: docs/kubernetes.md)",
    )
    crf_actors: tuple[int, int] | None = option(
        None,
        type=parse_range,
        metavar="MIN-MAX",
        help="CPU CRF actor pool size on GPU clusters (asking for it makes --crf-backend auto pydensecrf; default: 1 "
        "up to every CPU the inference actors leave on the nodes that may run it; without GPUs or with --crf-backend "
        "torch the CRF runs in the inference actors)",
    )
    batch_size: int = option(
        16,
        type=int,
        lo=1,
        help="images per Ray batch (larger amortises Ray's per-batch cost; --max-batch-pixels bounds memory)",
    )
    infer_cpus: float | None = option(
        None,
        type=float,
        above=0,
        help="CPUs (= torch threads) per inference actor (default: 1 with GPUs, else the cores left after decoding "
        "divided between the actors)",
    )
    crf_cpus: float = option(1.0, type=float, above=0, help="CPUs per CRF actor")
    decode_cpus: float = option(0.25, type=float, above=0, help="CPUs per read + decode actor (GPU plans' pool)")
    use_gpu: bool | None = option(None, flag="--gpu", help="run inference on GPUs (default: when the cluster has GPUs)")
    # Ray Data's default (half the object store) lets decoding run far ahead for nothing (docs/benchmarks.md).
    object_store_mib: int | None = option(
        None,
        type=int,
        lo=1,
        metavar="MIB",
        help="object-store memory Ray Data may fill with blocks in flight (default: 256 per GPU inference actor, 64 "
        "per CPU inference or CRF actor)",
    )
    infer_resources: dict = option(
        factory=dict,
        type=json_object,
        metavar="JSON",
        help="custom Ray resources each inference actor needs, e.g. '{\"gpu_node\": 1}'",
    )
    crf_resources: dict = option(
        factory=dict,
        type=json_object,
        metavar="JSON",
        help="custom Ray resources each CRF actor needs, e.g. '{\"crf_node\": 1}'",
    )
    crf_backend: str = option(
        "auto",
        choices=CRF_BACKENDS,
        group="crf",
        help="pydensecrf (CPU) or torch (pipeline/crf/torch_port.py: the same labels, on the inference device); "
        "auto: torch "
        "inside the GPU inference actors when inference runs on GPUs (no CPU CRF pool), else pydensecrf, the faster "
        "one on a CPU core",
    )
    actor_memory_mib: int = option(
        2048,
        type=int,
        metavar="MIB",
        help="memory each inference and CRF actor may use: an image that would exceed it runs tiled (masks.infer_tile) "
        "and its CRF at a reduced resolution (masks.crf_scale); 0: no budget",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("infer_actors", "crf_actors"):
            if getattr(self, name) is None:
                continue
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be MIN-MAX with 1 <= MIN <= MAX, got {lo}-{hi}")
        if self.actor_memory_mib != 0 and not MIN_ACTOR_MEMORY_MIB <= self.actor_memory_mib <= 2**20:
            raise ValueError(
                f"actor memory must be 0 (no budget) or {MIN_ACTOR_MEMORY_MIB}..{2**20} MiB, got "
                f"{self.actor_memory_mib} (an inference actor holds ~1 GiB before its first image)"
            )


@dataclass(frozen=True)
class JobConfig:
    FLAG_GROUP: ClassVar[str] = "run"

    input_uri: str = option(
        flag="input",
        group="",
        metavar="INPUT_URI",
        help="images to segment: any fsspec URI or path, listed recursively (default: the bundled demo bucket)",
    )
    output_uri: str = option(
        flag="--output",
        group="",
        metavar="URI",
        help="where run=<run_id>/ is written (default for the demo: ./outputs)",
    )
    labels_uri: str | None = option(
        flag="--labels", group="", metavar="URI", help="label PNGs paired by key (extension → .png); 255 = ignore"
    )
    model: str = option(
        flag="--model",
        group="model",
        choices=MODEL_BUILDERS,
        check_choices=False,
        help="model architecture (default: the bundled demo model, deeplabv3plus_demo)",
    )
    # None: the model's default weight set (pipeline.models.weights.default_weights).
    weights_uri: str | None = option(
        flag="--weights",
        group="model",
        metavar="URI",
        help="checkpoint URI (safetensors or torch), optionally 'URI#sha256=<hex>' (default: the model's published "
        "weights; the bundled checkpoint for deeplabv3plus_demo)",
    )
    run_id: str = option(help="run partition name (default: UTC timestamp like 2026-11-24T02-00-00Z)")
    inference: InferenceConfig = section(InferenceConfig)
    crf: CRFParams | None = section(CRFParams, toggle="refine masks with dense CRF", group="crf")
    compute: ComputeConfig = section(ComputeConfig)
    num_classes: int | None = option(
        None, type=int, lo=1, group="model", help="classes in the checkpoint (default: read from the checkpoint)"
    )
    limit: int | None = option(None, type=int, lo=1, help="segment at most N images (after sorting keys)")
    resume: bool = option(False, help="continue run --run-id: skip keys it already holds")
    overwrite: bool = option(False, help="replace an existing run with the same id")
    incremental: bool = option(
        False,
        help="carry the rows of inputs whose image and label are unchanged since the latest committed run under "
        "--output with the same model, weights and settings; segment the rest (docs/kubernetes.md)",
    )
    dry_run: bool = option(
        False,
        help="check everything a run checks first (flags, weights, listing, what --resume skips, the resource plan "
        "against the cluster), print the plan as one JSON line and exit 0, writing nothing",
    )
    storage_options: dict = option(
        factory=dict,
        type=json_object,
        metavar="JSON",
        help='fsspec storage options, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    )
    rows_per_file: int = option(
        1000,
        type=int,
        lo=1,
        metavar="N",
        help="rows per part file, written by the workers as they finish them; a killed run loses at most the part "
        "files in flight",
    )
    pushgateway: str | None = option(None, metavar="URL", help="push the run summary to this Prometheus Pushgateway")
    compare_previous: bool = option(
        False,
        help="compare with the previous committed run under --output: comparison*.parquet and comparison.json in this "
        "run, a report section, a printed table (docs/uncertainty.md)",
    )
    fail_on_regression: float | None = option(
        None,
        type=float,
        lo=0,
        metavar="DELTA",
        help="with --compare-previous: exit 3 after committing when the mIoU or any class IoU dropped by more than "
        "DELTA (e.g. 0.02)",
    )
    ray_address: str | None = option(
        None, group="compute", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)"
    )

    def __post_init__(self) -> None:
        # The id names the folder OUTPUT/run=<id>/: a '/' or '..' would put outputs elsewhere.
        if not _RUN_ID.fullmatch(self.run_id) or ".." in self.run_id:
            raise ValueError(
                f"run id {self.run_id!r} must be 1-128 letters, digits, '.', '_' or '-', start with a "
                f"letter or digit and not contain '..' (it names the folder run=<id>)"
            )
        check_fields(self)
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        if self.fail_on_regression is not None and not self.compare_previous:
            raise ValueError("--fail-on-regression needs --compare-previous")

    def to_public_dict(self) -> dict:
        """The config as JSON-able data with anything that looks like a credential redacted."""
        data = asdict(self)
        data["storage_options"] = redact(self.storage_options)
        for name in ("input_uri", "output_uri", "labels_uri", "weights_uri", "pushgateway", "ray_address"):
            data[name] = public_uri(data[name])  # no userinfo, no presigned query string
        return data
