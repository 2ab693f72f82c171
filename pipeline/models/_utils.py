"""The backbone → classifier → upsample skeleton shared by DeepLab v1, v2 and v3."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def check_input(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a float batch of shape (N, 3, H, W), got {tuple(x.shape)}")


def upsample_to(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class SimpleSegmentationModel(nn.Module):
    """torchvision's ``_SimpleSegmentationModel`` layout (``backbone``, ``classifier``, ``aux_classifier``).

    The backbone returns a dict with ``"out"`` (and ``"aux"`` when there is an auxiliary head).
    ``forward`` returns only the main logits tensor, the contract of every pipeline stage; the
    auxiliary head exists for training losses and torchvision checkpoint compatibility and is
    reached through ``forward_with_aux``.
    """

    def __init__(
        self, backbone: nn.Module, classifier: nn.Module, aux_classifier: nn.Module | None = None, *, output_stride: int
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x)
        return upsample_to(self.classifier(self.backbone(x)["out"]), x)

    def forward_with_aux(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """torchvision's output dict: ``{"out": logits, "aux": aux logits}`` (no ``"aux"`` without the head)."""
        check_input(x)
        features = self.backbone(x)
        result = {"out": upsample_to(self.classifier(features["out"]), x)}
        if self.aux_classifier is not None:
            result["aux"] = upsample_to(self.aux_classifier(features["aux"]), x)
        return result


def check_output_stride(output_stride: int) -> None:
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
