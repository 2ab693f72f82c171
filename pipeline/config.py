"""Frozen configuration of a run: what to read, which model, inference, CRF, compute, outputs."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

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

    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    min_prob: float = 1e-6  # unary = -log(max(p, min_prob)): never log(0)
    # Larger images are refined at a reduced resolution (masks.crf_scale), which bounds CRF time
    # (docs/benchmarks.md); 0: no limit.
    max_pixels: int = 1_000_000

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"CRF iterations must be >= 1, got {self.iterations}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CRF {name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.min_prob < 1:
            raise ValueError(f"CRF min_prob must be in (0, 1), got {self.min_prob}")
        if self.max_pixels < 0:
            raise ValueError(f"CRF max pixels must be >= 0 (0: no limit), got {self.max_pixels}")


@dataclass(frozen=True)
class InferenceConfig:
    """Multi-scale (+flip) inference; predictions are averaged at full resolution."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    output_stride: int | None = None
    average: str = "probs"  # "probs" (DeepLab v3) or "logits"
    tile: int | None = None  # sliding-window tile size; None runs whole images
    tile_overlap: int = 128
    max_pixels: int = 50_000_000  # decompression-bomb guard for whole-image inference
    precision: str = "fp32"  # autocast on GPU: "fp16" or "bf16"
    batching: str = "bucket"  # "bucket" (same-size images batched, exact) or "pad"
    max_batch_pixels: int = 4 * 1024 * 1024  # pixels in one forward pass (16 images of 512x512)
    # How probabilities travel to the CRF stage (pipeline/probs.py): uint8 is a quarter of float32's
    # bytes and changed 0.003 % of CRF labels in benchmarks/crf.py (the budget is 0.1 %).
    probs_encoding: str = "uint8"
    low_conf_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be positive numbers, got {self.scales}")
        if self.output_stride not in (None, 8, 16):
            raise ValueError(f"output stride must be 8 or 16, got {self.output_stride}")
        choices = {"average": ("probs", "logits"), "precision": ("fp32", "fp16", "bf16"),
                   "batching": ("bucket", "pad"), "probs_encoding": ("float32", "float16", "uint8")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.tile is not None and not 0 <= self.tile_overlap < self.tile:
            raise ValueError(f"tile overlap must be in [0, tile), got {self.tile_overlap} for tile {self.tile}")
        if self.tile is not None and self.tile < 32:
            raise ValueError(f"tile must be >= 32 pixels, got {self.tile}")
        if self.max_pixels < 1:
            raise ValueError(f"max pixels must be >= 1, got {self.max_pixels}")
        if self.max_batch_pixels < 1:
            raise ValueError(f"max batch pixels must be >= 1, got {self.max_batch_pixels}")
        if not 0 < self.low_conf_threshold <= 1:
            raise ValueError(f"low-confidence threshold must be in (0, 1], got {self.low_conf_threshold}")


@dataclass(frozen=True)
class ComputeConfig:
    """Actor pools and resources. Ranges are (min, max) so Ray Data can autoscale the pools."""

    # None: one actor per GPU in the cluster, or without GPUs one single-threaded actor per core
    # left after the CRF pool and decode actor (pipeline.stages.Resources.resolve).
    infer_actors: tuple[int, int] | None = None
    # None: 1 up to every CPU the inference actors leave on the nodes that may run CRF actors
    # (GPU clusters; without GPUs the CRF runs inside the inference actors).
    crf_actors: tuple[int, int] | None = None
    # Images per Ray batch. Ray Data costs ~10 ms per batch and actor call (measured on 2 cores);
    # at 16 that is under 1 ms per image. InferenceConfig.max_batch_pixels bounds the forward passes.
    batch_size: int = 16
    infer_cpus: float | None = None  # None: derived from the cluster when it has no GPU
    crf_cpus: float = 1.0
    decode_cpus: float = 0.25
    use_gpu: bool | None = None  # None: auto-detect from cluster resources
    # Object-store memory Ray Data may fill with blocks in flight (MiB). None: 256 MiB per GPU
    # inference actor, 64 per CPU one and per CRF actor. Ray Data's own default (half the
    # cluster's object store) lets fast decoding run far ahead of inference: 760 MiB of decoded
    # images queued for 4800 demo images, with no gain in images/s. On 2 cores 128 MiB instead of
    # 512 kept the same images/s and made peak memory of 9600 images that of 960 (1.015x instead
    # of 1.20x: the small run never filled 512 MiB; benchmarks/pipeline_vs_loop.py).
    object_store_mib: int | None = None
    # Custom Ray resources per actor, e.g. {"crf_node": 1} to pin CRF actors to CPU-only CRF nodes.
    infer_resources: dict = field(default_factory=dict, hash=False)
    crf_resources: dict = field(default_factory=dict, hash=False)
    # Which dense CRF runs (pipeline.stages.Resources.resolve): "auto" is pydensecrf without GPUs
    # (faster on a CPU core, docs/benchmarks.md) and the torch backend inside the GPU inference actors.
    crf_backend: str = "auto"
    # Memory each inference and CRF actor may use (MiB); an image that would take it past this
    # runs tiled / with a reduced-resolution CRF (pipeline/memory.py). 0: no budget.
    actor_memory_mib: int = 2048

    def __post_init__(self) -> None:
        if self.crf_backend not in CRF_BACKENDS:
            raise ValueError(f"crf_backend must be one of {', '.join(CRF_BACKENDS)}, got {self.crf_backend!r}")
        for name in ("infer_actors", "crf_actors"):
            if getattr(self, name) is None:
                continue
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be MIN-MAX with 1 <= MIN <= MAX, got {lo}-{hi}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.object_store_mib is not None and self.object_store_mib < 1:
            raise ValueError(f"object store budget must be >= 1 MiB, got {self.object_store_mib}")
        if self.actor_memory_mib != 0 and not MIN_ACTOR_MEMORY_MIB <= self.actor_memory_mib <= 2**20:
            raise ValueError(f"actor memory must be 0 (no budget) or {MIN_ACTOR_MEMORY_MIB}..{2**20} MiB, got "
                             f"{self.actor_memory_mib} (an inference actor holds ~1 GiB before its first image)")


@dataclass(frozen=True)
class JobConfig:
    input_uri: str
    output_uri: str
    labels_uri: str | None
    model: str
    weights_uri: str | None  # None: the model's default weight set (pipeline.weights.DEFAULT_WEIGHTS)
    run_id: str
    inference: InferenceConfig = InferenceConfig()
    crf: CRFParams | None = CRFParams()
    compute: ComputeConfig = ComputeConfig()
    num_classes: int | None = None
    limit: int | None = None
    resume: bool = False
    overwrite: bool = False
    storage_options: dict = field(default_factory=dict, hash=False)
    rows_per_file: int = 1000  # rows per part file: the unit a write worker publishes (and a kill can lose)
    pushgateway: str | None = None
    compare_previous: bool = False  # compare with the previous committed run under output_uri
    fail_on_regression: float | None = None  # exit 3 when the mIoU or a class IoU drops by more than this

    def __post_init__(self) -> None:
        # The id names the folder OUTPUT/run=<id>/: a '/' or '..' would put outputs elsewhere.
        if not _RUN_ID.fullmatch(self.run_id) or ".." in self.run_id:
            raise ValueError(f"run id {self.run_id!r} must be 1-128 letters, digits, '.', '_' or '-', start with a "
                             f"letter or digit and not contain '..' (it names the folder run=<id>)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.rows_per_file < 1:
            raise ValueError(f"rows per file must be >= 1, got {self.rows_per_file}")

    def to_public_dict(self) -> dict:
        """The config as JSON-able data with anything that looks like a credential redacted."""
        data = asdict(self)
        data["storage_options"] = redact(self.storage_options)
        return data


_SECRET_WORDS = ("secret", "key", "token", "password", "credential", "session")


# fsspec/s3fs/gcsfs/adlfs option names that carry a credential (compared case-insensitively).
CREDENTIAL_OPTIONS = frozenset({
    "key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
    "access_key", "secret_key", "session_token", "client_secret", "account_key", "sas_token", "credentials",
})


def credential_options(options: dict, prefix: str = "") -> list[str]:
    """Dotted names of the credential-carrying entries in ``options``, recursively."""
    found = []
    for k, v in options.items():
        if isinstance(v, dict):
            found += credential_options(v, f"{prefix}{k}.")
        elif k.lower() in CREDENTIAL_OPTIONS:
            found.append(prefix + k)
    return found


def redact(options: dict) -> dict:
    """Copy of ``options`` with credential-looking values replaced, recursively."""
    out = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(word in k.lower() for word in _SECRET_WORDS):
            out[k] = "***"
        else:
            out[k] = v
    return out
