"""DeepLab v3+ (Chen et al., ECCV 2018): v3 encoder (ASPP) + a light decoder.

The decoder reduces stride-4 low-level features to 48 channels with a 1x1 conv, concatenates
them with the 4x-upsampled ASPP output and refines with two 3x3 convs before the classifier.
ASPP (v3's, with ``separable=True``) and decoder convs are depthwise-separable (depthwise 3x3
with the atrous rate, BN, ReLU, pointwise 1x1, BN, ReLU), as in the paper's "DeepLabv3+ with
separable convs" variant.
Backbones come from timm (``features_only`` with ``output_stride``), which returns the
stride-4 and the deepest feature maps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.demo import ASSETS
from pipeline.models.deeplabv3 import ASPP, ConvBNReLU, SeparableConvBNReLU, aspp_rates
from pipeline.models.weights import Weights

if TYPE_CHECKING:
    from timm.models import FeatureInfo

# Made by `python jobs/train_demo.py` (3000 steps, seed 0), which prints the sha256 and mIoU to
# paste here: held-out mIoU on 200 synthetic scenes (seeds 1_000_000+, disjoint from training and
# from the demo bucket).
DEMO_WEIGHTS = Weights(
    model="deeplabv3plus_demo",
    uri=str(ASSETS / "deeplabv3plus_demo.safetensors"),
    sha256="f3f5e9db0021fc9c81b240e0e7e66504d675d74974b02976bbe4a97f937c9cb1",
    categories=("background", "disc", "box", "triangle", "ring", "bar"),
    held_out_miou=0.8462,
)

# The weight set each model here stands for when none is given (read by pipeline.models).
DEFAULT_WEIGHTS = {DEMO_WEIGHTS.model: DEMO_WEIGHTS}


class DeepLabV3PlusDecoder(nn.Module):
    """v3+ decoder: low-level 1x1 → 48 ch, concat with upsampled ASPP, two separable 3x3, classifier."""

    def __init__(
        self, low_level_channels: int, aspp_channels: int, num_classes: int, low_level_reduced: int = 48
    ) -> None:
        super().__init__()
        self.reduce = ConvBNReLU(low_level_channels, low_level_reduced, 1)
        self.refine = nn.Sequential(
            SeparableConvBNReLU(aspp_channels + low_level_reduced, aspp_channels),
            SeparableConvBNReLU(aspp_channels, aspp_channels),
        )
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)

    def forward(self, low_level: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        encoded = F.interpolate(encoded, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.refine(torch.cat([self.reduce(low_level), encoded], dim=1)))


class DeepLabV3Plus(nn.Module):
    """Backbone returning (stride-4 features, stride-OS features) → ASPP → decoder → logits at input size."""

    def __init__(
        self,
        backbone: nn.Module,
        low_level_channels: int,
        high_level_channels: int,
        *,
        num_classes: int,
        output_stride: int,
        aspp_channels: int = 256,
    ) -> None:
        super().__init__()
        rates = aspp_rates(output_stride)  # also refuses a stride other than 8 or 16
        self.output_stride = output_stride
        self.backbone = backbone
        self.aspp = ASPP(high_level_channels, rates, aspp_channels, separable=True, dropout=0.1)
        self.decoder = DeepLabV3PlusDecoder(low_level_channels, aspp_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a float batch of shape (N, 3, H, W), got {tuple(x.shape)}")
        low_level, high_level = self.backbone(x)
        logits = self.decoder(low_level, self.aspp(high_level))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def timm_backbone(name: str, output_stride: int) -> tuple[nn.Module, int, int]:
    """A timm features-only backbone returning the stride-4 and the deepest feature maps."""
    import timm  # here, not at the top: the driver reads DEMO_WEIGHTS without building a model

    probe = timm.create_model(name, features_only=True, pretrained=False)
    reductions = cast("FeatureInfo", probe.feature_info).reduction()
    low_index = reductions.index(4)
    backbone = timm.create_model(
        name,
        features_only=True,
        pretrained=False,
        output_stride=output_stride,
        out_indices=(low_index, len(reductions) - 1),
    )
    low_channels, high_channels = cast("FeatureInfo", backbone.feature_info).channels()
    return backbone, low_channels, high_channels


def deeplabv3plus_demo(*, num_classes: int = 6, output_stride: int = 16) -> DeepLabV3Plus:
    """The small demo model: v3+ on a width-0.5 MobileNetV2 with 96-channel ASPP/decoder.

    Trained from scratch by ``jobs/train_demo.py`` on the synthetic dataset; small enough to
    train on a 2-core CPU in minutes and to ship with the repository.
    """
    backbone, low, high = timm_backbone("mobilenetv2_050", output_stride)
    return DeepLabV3Plus(backbone, low, high, num_classes=num_classes, output_stride=output_stride, aspp_channels=96)


def deeplabv3plus_resnet101(*, num_classes: int = 21, output_stride: int = 16) -> DeepLabV3Plus:
    """v3+ on ResNet-101; the decoder's low-level input is ``layer1`` (stride 4, 256 channels).

    timm's ``resnet101`` has torchvision's module names, so ImageNet ResNet-101 weights from
    either library load into ``backbone`` (see ``pipeline.models.checkpoints.load_backbone``).
    """
    backbone, low, high = timm_backbone("resnet101", output_stride)
    return DeepLabV3Plus(backbone, low, high, num_classes=num_classes, output_stride=output_stride)


def deeplabv3plus_xception65(*, num_classes: int = 21, output_stride: int = 16) -> DeepLabV3Plus:
    """v3+ on the paper's aligned Xception-65 (timm ``xception65``).

    timm's stride-4 tap is the second separable conv of entry-flow block 2 (256 channels), the
    tensor the reference TensorFlow implementation feeds to the decoder.
    """
    backbone, low, high = timm_backbone("xception65", output_stride)
    return DeepLabV3Plus(backbone, low, high, num_classes=num_classes, output_stride=output_stride)
