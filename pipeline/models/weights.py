"""Weights: one description object per published weight set (loading is ``pipeline.models.checkpoints``).

Each model's records live beside its builder in ``pipeline.models`` (its module's
``DEFAULT_WEIGHTS``); ``default_weights(model)`` (``pipeline.models``) finds them through the registry.

A weights URI may carry its expected checksum as a fragment: ``s3://b/ckpt.pth#sha256=<hex>``,
the full 64-hex digest: a prefix (torch.hub puts 8 hex digits in its file names, e.g.
``deeplabv3_resnet50_coco-cd0a2569.pth``) is refused, since a file forged to match 32 bits is
feasible. A checkpoint's ``categories`` must be unique strings of at most ``MAX_CATEGORY_CHARS``.
Both safetensors and ``torch.save`` files
are read (the latter with ``weights_only=True``, so a checkpoint cannot run code); common
wrappers (``{"state_dict": ...}``, ``{"model": ...}``, DataParallel's ``module.`` prefix) are
unwrapped.

Key layouts:
- ``load_into`` (what ``pipeline.inference.multiscale.load_model`` uses) takes a whole-model state dict in
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
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.io.credentials import public_text, public_uri

if TYPE_CHECKING:  # torch only for hints: the CLI imports this module without torch
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


class WeightsError(ValueError):
    """A checkpoint could not be used; the message says what to fix."""


@dataclass(frozen=True)
class Weights:
    """Everything needed to use a weight set: where it is, its checksum, classes and transforms.

    ``uri`` is any fsspec URI; to use a mirror, ``dataclasses.replace(w, uri="s3://...")`` keeps
    the checksum. ``sha256`` is the file's full digest (torch.hub's 8-digit prefix in a file name
    identifies no file). Inputs are
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


def normalisation(
    mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) mean and std tensors on ``device``, as ``infer_batch`` takes them."""
    import torch  # here, not at the top: the driver reads weight records without torch

    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


_DIGEST = re.compile(r"[0-9a-f]{64}")
MAX_CATEGORY_CHARS = 64


def checked_digest(digest: str) -> str:
    digest = digest.strip().lower()
    if not _DIGEST.fullmatch(digest):
        shown = digest if len(digest) <= 80 else digest[:80] + "..."
        raise WeightsError(
            f"bad sha256 {shown!r}: expected the full 64-hex-digit digest (a prefix identifies no file: "
            f"one forged to match it is feasible); `sha256sum FILE` prints it"
        )
    return digest


def split_checksum(uri: str) -> tuple[str, str | None]:
    """``"s3://b/k.pth#sha256=ab12cd34"`` → ``("s3://b/k.pth", "ab12cd34")``."""
    if "#sha256=" in uri:
        path, digest = uri.rsplit("#sha256=", 1)
        return path, checked_digest(digest)
    return uri, None


def read_verified(
    uri: str, *, expected_sha256: str | None = None, storage_options: dict | None = None
) -> tuple[bytes, str]:
    """(the file's bytes, its sha256) from any fsspec URI, checked against ``expected_sha256`` or
    the URI's ``#sha256=`` fragment."""
    from pipeline.io.storage import read_bytes

    path, fragment_digest = split_checksum(uri)
    expected = checked_digest(expected_sha256) if expected_sha256 else fragment_digest
    try:
        data = read_bytes(path, storage_options)  # the same S3 retry policy as image reads
    except FileNotFoundError:
        raise WeightsError(f"weights not found: {public_uri(path)}") from None
    except Exception as exc:  # any backend error: permissions, endpoint, DNS
        shown = public_text(f"{type(exc).__name__}: {exc}", [path])
        raise WeightsError(f"cannot read weights {public_uri(path)}: {shown}") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected and digest != expected:
        raise WeightsError(f"checksum mismatch for {public_uri(path)}: expected sha256 {expected}, file has {digest}")
    return data, digest


def categories_from(metadata: dict[str, str], num_classes: int) -> tuple[str, ...]:
    """Class names: the checkpoint's own, else VOC's for 21 classes, else class_<i>. The checkpoint's
    own must be unique non-empty strings of at most MAX_CATEGORY_CHARS (WeightsError before any work)."""
    if "categories" in metadata:
        names = checked_categories(metadata["categories"])
        if len(names) == num_classes:
            return names
    if num_classes == len(VOC_CLASSES):
        return VOC_CLASSES
    return tuple(f"class_{i}" for i in range(num_classes))


def checked_categories(text: str) -> tuple[str, ...]:
    """A checkpoint's ``categories`` metadata (a JSON list) as class names, or WeightsError."""
    try:
        names = json.loads(text)
    except (ValueError, TypeError, RecursionError) as exc:
        raise WeightsError(f"checkpoint metadata 'categories' is not JSON: {str(exc)[:200]}") from None
    if not isinstance(names, list):
        raise WeightsError(f"checkpoint metadata 'categories' must be a JSON list of names, not {type(names).__name__}")
    bad = [n for n in names if not isinstance(n, str) or not n.strip() or len(n) > MAX_CATEGORY_CHARS]
    if bad:
        shown = ", ".join(repr(n)[:40] for n in bad[:5])
        raise WeightsError(
            f"checkpoint metadata 'categories' must hold non-empty strings of at most {MAX_CATEGORY_CHARS} "
            f"characters; {len(bad)} are not: {shown}"
        )
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise WeightsError(f"checkpoint metadata 'categories' names a class twice: {', '.join(duplicates[:5])[:300]}")
    return tuple(names)
