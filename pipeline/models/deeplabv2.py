"""DeepLab v2 (Chen et al., TPAMI 2017, "DeepLab: Semantic Image Segmentation with Deep
Convolutional Nets, Atrous Convolution, and Fully Connected CRFs").

ResNet-101 at output stride 8 (torchvision ``resnet101`` with ``layer3``/``layer4`` dilated by
2 and 4) and ASPP-L: four parallel 3x3 classifiers with rates 6, 12, 18 and 24 whose logits are
summed. Unlike v3's ASPP there is no BN, no image pooling and no concatenation: each branch
predicts classes directly from its own field of view.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models import resnet101
from torchvision.models._utils import IntermediateLayerGetter

from pipeline.models._utils import SimpleSegmentationModel
from pipeline.models.deeplabv3 import resnet_backbone


class ASPPSum(nn.ModuleList):
    """ASPP-L: one 3x3 atrous classifier per rate, outputs summed (the paper's fusion)."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__(nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate) for rate in atrous_rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self)


class DeepLabV2(SimpleSegmentationModel):
    """ResNet-101 → ASPP-L → logits at input size."""


def deeplabv2_resnet101(*, num_classes: int = 21, output_stride: int = 8) -> DeepLabV2:
    """DeepLab v2 ASPP-L. ``output_stride=16`` (not in the paper) halves the rates to 3/6/9/12."""
    resnet = resnet_backbone(resnet101, output_stride=output_stride)
    backbone = IntermediateLayerGetter(resnet, return_layers={"layer4": "out"})
    rates = tuple(r * 8 // output_stride for r in (6, 12, 18, 24))
    return DeepLabV2(backbone, ASPPSum(2048, num_classes, rates), output_stride=output_stride)
