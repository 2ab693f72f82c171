"""Weights: one description object per published weight set, and loading from any fsspec URI.

A weights URI may carry its expected checksum as a fragment: ``s3://b/ckpt.pth#sha256=<hex>``.
Both safetensors and ``torch.save`` files are read (the latter with ``weights_only=True``, so a
checkpoint cannot run code); common wrappers (``{"state_dict": ...}``, ``{"model": ...}``,
DataParallel's ``module.`` prefix) are unwrapped.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch
from safetensors.torch import load as load_safetensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

_ASSETS = Path(__file__).resolve().parent / "assets"


class WeightsError(ValueError):
    """A checkpoint could not be used; the message says what to fix."""


@dataclass(frozen=True)
class Weights:
    """Everything needed to use a weight set: where it is, its checksum, classes and transforms."""

    model: str
    uri: str
    sha256: str | None
    categories: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    held_out_miou: float | None = None

    @property
    def num_classes(self) -> int:
        return len(self.categories)


DEMO_WEIGHTS = Weights(
    model="deeplabv3plus_demo",
    uri=str(_ASSETS / "deeplabv3plus_demo.safetensors"),
    sha256=None,
    categories=("background", "disc", "box", "triangle", "ring", "bar"),
)


def split_checksum(uri: str) -> tuple[str, str | None]:
    """``"s3://b/k.pth#sha256=ab12"`` → ``("s3://b/k.pth", "ab12")``."""
    if "#sha256=" in uri:
        path, digest = uri.rsplit("#sha256=", 1)
        digest = digest.strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise WeightsError(f"bad checksum in weights URI: '#sha256=' must be followed by 64 hex digits, got {digest!r}")
        return path, digest
    return uri, None


@dataclass(frozen=True)
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    sha256: str
    metadata: dict[str, str]


def read_checkpoint(uri: str, *, expected_sha256: str | None = None, storage_options: dict | None = None) -> LoadedCheckpoint:
    """Read a checkpoint from any fsspec URI, verify its sha256 and return its state dict."""
    path, fragment_digest = split_checksum(uri)
    expected = expected_sha256 or fragment_digest
    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError:
        raise WeightsError(f"weights not found: {path}") from None
    except Exception as exc:  # any backend error: permissions, endpoint, DNS
        raise WeightsError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected and digest != expected:
        raise WeightsError(f"checksum mismatch for {path}: expected sha256 {expected}, file has {digest}")
    metadata: dict[str, str] = {}
    if data[:1] == b"{" or _looks_like_safetensors(data):
        try:
            state = load_safetensors(data)
            metadata = _safetensors_metadata(data)
        except Exception as exc:
            raise WeightsError(f"cannot parse {path} as safetensors: {exc}") from None
    else:
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise WeightsError(f"cannot parse {path} as a torch checkpoint: {type(exc).__name__}: {exc}") from None
    return LoadedCheckpoint(_unwrap(state, path), digest, metadata)


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 9:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len < len(data) and data[8:9] == b"{"


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__", {}))


def _unwrap(state: object, path: str) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_into(model: torch.nn.Module, checkpoint: LoadedCheckpoint, uri: str) -> None:
    """Load strictly; on mismatch raise one line naming the missing/unexpected keys and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(checkpoint.state_dict))
    unexpected = sorted(set(checkpoint.state_dict) - set(own))
    shape_errors = [
        f"{k} {tuple(checkpoint.state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(checkpoint.state_dict))
        if own[k].shape != checkpoint.state_dict[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if shape_errors:
        problems.append(f"shape mismatch {_few(shape_errors)}")
    if problems:
        raise WeightsError(f"weights {uri} do not fit the model: " + "; ".join(problems))
    model.load_state_dict(checkpoint.state_dict, strict=True)


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")


def categories_from(metadata: dict[str, str], num_classes: int) -> tuple[str, ...]:
    """Class names: the checkpoint's own, else VOC's for 21 classes, else class_<i>."""
    if "categories" in metadata:
        names = tuple(json.loads(metadata["categories"]))
        if len(names) == num_classes:
            return names
    if num_classes == len(VOC_CLASSES):
        return VOC_CLASSES
    return tuple(f"class_{i}" for i in range(num_classes))
