"""Weights: one description object per published weight set, and loading from any fsspec URI.

A weights URI may carry its expected checksum as a fragment: ``s3://b/ckpt.pth#sha256=<hex>``,
the full digest or a prefix of at least 8 hex digits (torch.hub puts such a prefix in its file
names, e.g. ``deeplabv3_resnet50_coco-cd0a2569.pth``). Both safetensors and ``torch.save`` files
are read (the latter with ``weights_only=True``, so a checkpoint cannot run code); common
wrappers (``{"state_dict": ...}``, ``{"model": ...}``, DataParallel's ``module.`` prefix) are
unwrapped.

Key layouts:
- ``load_into`` (what ``pipeline.inference.load_model`` uses) takes a whole-model state dict in
  the model's own layout. The v3 builders have torchvision's layout, so torchvision's
  ``deeplabv3_*`` checkpoints load as they are; their training-only ``aux_classifier`` is
  dropped when the model was built without one.
- ``load_backbone`` initialises only ``model.backbone`` (for training) from an ImageNet
  classification checkpoint in torchvision or timm layout: torchvision's ``features.`` trunk
  prefix and timm's flattened feature-wrapper names (``blocks.3`` → ``blocks_3``) are mapped,
  and the classification head (``fc``, ``head``, ``classifier`` ...) is left out.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from pipeline.storage import read_bytes

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
    """Everything needed to use a weight set: where it is, its checksum, classes and transforms.

    ``uri`` is any fsspec URI; to use a mirror, ``dataclasses.replace(w, uri="s3://...")`` keeps
    the checksum. ``sha256`` is the full digest or a prefix of at least 8 hex digits. Inputs are
    RGB scaled to [0, 1] and normalised with ``mean``/``std``; ``resize_size`` is the shorter
    side the publisher resized images to for evaluation (torchvision's ``SemanticSegmentation``
    preset, bilinear), None when the weights were evaluated at native resolution.
    ``held_out_miou`` is the publisher's mIoU (0-1) on its held-out set; ``num_params`` counts
    every tensor in the file's model, auxiliary head included.
    """

    model: str
    uri: str
    sha256: str | None
    categories: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    held_out_miou: float | None = None
    resize_size: int | None = None
    num_params: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def normalisation(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``normalisation(self.mean, self.std, device)``."""
        return normalisation(self.mean, self.std, device)


def normalisation(mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) mean and std tensors on ``device``, as ``infer_batch`` takes them."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


# Made by `python jobs/train_demo.py` (3000 steps, seed 0): held-out mIoU on 200 synthetic scenes
# (seeds 1_000_000+, disjoint from training and from the demo bucket).
DEMO_WEIGHTS = Weights(
    model="deeplabv3plus_demo",
    uri=str(_ASSETS / "deeplabv3plus_demo.safetensors"),
    sha256="f3f5e9db0021fc9c81b240e0e7e66504d675d74974b02976bbe4a97f937c9cb1",
    categories=("background", "disc", "box", "triangle", "ring", "bar"),
    held_out_miou=0.8462,
)


# torchvision's weights trained on COCO with the 20 PASCAL VOC categories (torchvision
# ``DeepLabV3_*_Weights.COCO_WITH_VOC_LABELS_V1``); mIoU on COCO val2017 with VOC labels.
DEEPLABV3_RESNET50_COCO_WITH_VOC_LABELS_V1 = Weights(
    model="deeplabv3_resnet50",
    uri="https://download.pytorch.org/models/deeplabv3_resnet50_coco-cd0a2569.pth",
    sha256="cd0a2569",
    categories=VOC_CLASSES,
    held_out_miou=0.664,
    resize_size=520,
    num_params=42_004_074,
)
DEEPLABV3_RESNET101_COCO_WITH_VOC_LABELS_V1 = Weights(
    model="deeplabv3_resnet101",
    uri="https://download.pytorch.org/models/deeplabv3_resnet101_coco-586e9e4e.pth",
    sha256="586e9e4e",
    categories=VOC_CLASSES,
    held_out_miou=0.674,
    resize_size=520,
    num_params=60_996_202,
)
DEEPLABV3_MOBILENET_V3_LARGE_COCO_WITH_VOC_LABELS_V1 = Weights(
    model="deeplabv3_mobilenet_v3_large",
    uri="https://download.pytorch.org/models/deeplabv3_mobilenet_v3_large-fc3c493d.pth",
    sha256="fc3c493d",
    categories=VOC_CLASSES,
    held_out_miou=0.603,
    resize_size=520,
    num_params=11_029_328,
)

# The weight set a model name stands for when no other is given.
DEFAULT_WEIGHTS: dict[str, Weights] = {w.model: w for w in (
    DEMO_WEIGHTS,
    DEEPLABV3_RESNET50_COCO_WITH_VOC_LABELS_V1,
    DEEPLABV3_RESNET101_COCO_WITH_VOC_LABELS_V1,
    DEEPLABV3_MOBILENET_V3_LARGE_COCO_WITH_VOC_LABELS_V1,
)}


def default_weights(model: str) -> Weights:
    """The weight set a model name stands for when no --weights is given."""
    try:
        return DEFAULT_WEIGHTS[model]
    except KeyError:
        raise WeightsError(f"no published weights are known for {model}; pass --weights URI") from None


_DIGEST = re.compile(r"[0-9a-f]{8,64}")


def _checked_digest(digest: str) -> str:
    digest = digest.strip().lower()
    if not _DIGEST.fullmatch(digest):
        raise WeightsError(f"bad sha256 {digest!r}: expected 8 to 64 hex digits (the full digest or its prefix)")
    return digest


def split_checksum(uri: str) -> tuple[str, str | None]:
    """``"s3://b/k.pth#sha256=ab12cd34"`` → ``("s3://b/k.pth", "ab12cd34")``."""
    if "#sha256=" in uri:
        path, digest = uri.rsplit("#sha256=", 1)
        return path, _checked_digest(digest)
    return uri, None


@dataclass(frozen=True)
class LoadedCheckpoint:
    state_dict: dict[str, torch.Tensor]
    sha256: str
    metadata: dict[str, str]


def read_checkpoint(uri: str, *, expected_sha256: str | None = None, storage_options: dict | None = None) -> LoadedCheckpoint:
    """Read a checkpoint from any fsspec URI, verify its sha256 and return its state dict."""
    path, fragment_digest = split_checksum(uri)
    expected = _checked_digest(expected_sha256) if expected_sha256 else fragment_digest
    try:
        data = read_bytes(path, storage_options)  # the same S3 retry policy as image reads
    except FileNotFoundError:
        raise WeightsError(f"weights not found: {path}") from None
    except Exception as exc:  # any backend error: permissions, endpoint, DNS
        raise WeightsError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected and not digest.startswith(expected):
        shown = expected if len(expected) == 64 else f"starting {expected}"
        raise WeightsError(f"checksum mismatch for {path}: expected sha256 {shown}, file has {digest}")
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


def num_classes_in(state: dict[str, torch.Tensor]) -> int | None:
    """Output channels of the main classifier: the last non-aux conv weight named *classifier*."""
    keys = [k for k, v in state.items()
            if "classifier" in k and "aux" not in k and k.endswith("weight") and v.ndim == 4]
    return int(state[keys[-1]].shape[0]) if keys else None


def load_into(model: torch.nn.Module, checkpoint: LoadedCheckpoint, uri: str) -> None:
    """Load strictly; on mismatch raise one line naming the class counts, missing/unexpected keys and shapes."""
    own = model.state_dict()
    state = checkpoint.state_dict
    if not any(k.startswith("aux_classifier.") for k in own):
        # torchvision trains with an auxiliary head and ships it; inference never runs it.
        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    problems = _mismatch(own, state)
    if problems:
        expected, found = num_classes_in(own), num_classes_in(state)
        if expected is not None and found is not None and expected != found:
            problems.insert(0, f"wrong class count: the model expects {expected} classes, the checkpoint has {found}")
        if _holds_only_backbone(model, state):
            problems.append("it holds only backbone weights; pipeline.weights.load_backbone loads them for training")
        raise WeightsError(f"weights {uri} do not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _holds_only_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, torch.nn.Module):
        return False
    mapped, unknown = _backbone_state(state, backbone)
    return not unknown and not _mismatch(backbone.state_dict(), mapped)


# Top-level names of ImageNet classification heads in torchvision and timm models.
_CLASSIFICATION_HEADS = ("fc.", "head.", "classifier.", "conv_head.", "bn2.")


def _backbone_state(state: dict[str, torch.Tensor],
                    backbone: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state renamed to ``backbone``'s keys, keys that fit nowhere); classification heads are left out."""
    own = set(backbone.state_dict())
    mapped, unknown = {}, []
    for key, value in state.items():
        first, _, rest = key.partition(".")
        candidates = (key, key.removeprefix("features."), f"{first}_{rest}")
        target = next((c for c in candidates if c in own), None)
        if target is not None:
            mapped[target] = value
        elif not key.startswith(_CLASSIFICATION_HEADS):
            unknown.append(key)
    return mapped, unknown


def load_backbone(model: torch.nn.Module, uri: str, *, storage_options: dict | None = None,
                  expected_sha256: str | None = None) -> str:
    """Initialise ``model.backbone`` from a torchvision/timm classification checkpoint; returns its sha256.

    Everything but the classification head must fit, strictly: a checkpoint of another
    architecture fails with the keys that do not fit instead of half-loading.
    """
    checkpoint = read_checkpoint(uri, expected_sha256=expected_sha256, storage_options=storage_options)
    mapped, unknown = _backbone_state(checkpoint.state_dict, model.backbone)
    problems = _mismatch(model.backbone.state_dict(), mapped)
    if unknown:
        problems.insert(0, f"unknown keys {_few(sorted(unknown))}")
    if problems:
        raise WeightsError(f"weights {uri} do not fit the backbone: " + "; ".join(problems))
    model.backbone.load_state_dict(mapped, strict=True)
    return checkpoint.sha256


def _mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape_errors = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if shape_errors:
        problems.append(f"shape mismatch {_few(shape_errors)}")
    return problems


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
