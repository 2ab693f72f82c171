"""DeepLab v3 (Chen et al. 2017, "Rethinking Atrous Convolution for Semantic Image Segmentation").

Module names, shapes and defaults follow ``torchvision.models.segmentation.deeplabv3``, so a
torchvision checkpoint loads with ``strict=True`` and gives the same logits. Two paper options
come on top: ``output_stride=16`` (ASPP rates 6/12/18; torchvision always runs ResNets at output
stride 8 with 12/24/36) and ``multi_grid`` unit rates for the three blocks of ResNet ``layer4``.
Neither option changes a parameter, so torchvision weights load into every variant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models._utils import SimpleSegmentationModel, check_output_stride
from pipeline.models.weights import VOC_CLASSES, Weights

# torchvision (which imports torch._dynamo) is imported by the builders, when a model is built:
# the driver reads this module's weight records without building one (pipeline/job.py).
if TYPE_CHECKING:
    from torchvision.models.resnet import ResNet


def _coco_with_voc_labels(model: str, file: str, sha256: str, *, held_out_miou: float, num_params: int) -> Weights:
    """torchvision's ``DeepLabV3_*_Weights.COCO_WITH_VOC_LABELS_V1`` of ``model``: trained on COCO with
    the 20 PASCAL VOC categories, evaluated at shorter side 520; mIoU on COCO val2017 with VOC labels."""
    uri = f"https://download.pytorch.org/models/{file}"
    return Weights(model, uri, sha256, VOC_CLASSES, held_out_miou=held_out_miou, resize_size=520, num_params=num_params)


DEEPLABV3_RESNET50_COCO_WITH_VOC_LABELS_V1 = _coco_with_voc_labels(
    "deeplabv3_resnet50",
    "deeplabv3_resnet50_coco-cd0a2569.pth",
    "cd0a25694c4a0f7106b38f4938bf90a874f2f241cc410b8f63c7024399538f06",
    held_out_miou=0.664,
    num_params=42_004_074,
)
DEEPLABV3_RESNET101_COCO_WITH_VOC_LABELS_V1 = _coco_with_voc_labels(
    "deeplabv3_resnet101",
    "deeplabv3_resnet101_coco-586e9e4e.pth",
    "586e9e4e203fcbf17e1ad45533d8d33ab133fc762bf03101c5dd743995c08c0d",
    held_out_miou=0.674,
    num_params=60_996_202,
)
DEEPLABV3_MOBILENET_V3_LARGE_COCO_WITH_VOC_LABELS_V1 = _coco_with_voc_labels(
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large-fc3c493d.pth",
    "fc3c493d68e89cc31ef488c803d5d7dd2f3190fb570598faa49fef69be8e5e70",
    held_out_miou=0.603,
    num_params=11_029_328,
)

# The weight set each model here stands for when none is given (read by pipeline.models).
DEFAULT_WEIGHTS = {
    w.model: w
    for w in (
        DEEPLABV3_RESNET50_COCO_WITH_VOC_LABELS_V1,
        DEEPLABV3_RESNET101_COCO_WITH_VOC_LABELS_V1,
        DEEPLABV3_MOBILENET_V3_LARGE_COCO_WITH_VOC_LABELS_V1,
    )
}


class ConvBNReLU(nn.Sequential):
    """Conv (no bias: BN follows) + BN + ReLU; ``dilation`` pads so the output keeps the input's size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> None:
        padding = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ASPPConv(ConvBNReLU):
    """torchvision's atrous branch: a 3x3 conv with the branch's rate."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(in_channels, out_channels, 3, dilation)


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise 3x3 (dilated) + BN + ReLU, then pointwise 1x1 + BN + ReLU (v3+'s separable branch)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=dilation, dilation=dilation, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ASPPPooling(nn.Sequential):
    """Image-level features: the paper's fix for rates so large that most taps fall on padding."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(super().forward(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """1x1 conv, one 3x3 atrous conv per rate and image pooling, concatenated and projected by 1x1.

    ``separable=True`` is v3+'s variant: depthwise-separable atrous branches. Each variant keeps
    the names of the checkpoints made with it: torchvision's v3 (``convs.N``, ``project.{0,1}``)
    and the v3+ demo (``branches.N``, ``project.0.{0,1}``).
    """

    def __init__(
        self,
        in_channels: int,
        atrous_rates: Sequence[int],
        out_channels: int = 256,
        *,
        separable: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.rates = tuple(atrous_rates)
        ASPPConvModule = SeparableConvBNReLU if separable else ASPPConv
        branches: list[nn.Module] = [ConvBNReLU(in_channels, out_channels, 1)]
        branches += [ASPPConvModule(in_channels, out_channels, rate) for rate in self.rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self._branches = "branches" if separable else "convs"
        setattr(self, self._branches, nn.ModuleList(branches))
        projection = ConvBNReLU(len(branches) * out_channels, out_channels, 1)
        self.project = nn.Sequential(*([projection] if separable else projection), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in getattr(self, self._branches)], dim=1))


class DeepLabHead(nn.Sequential):
    """ASPP, then torchvision's extra 3x3 conv (kept for checkpoint compatibility), then the classifier."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (12, 24, 36)) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Conv2d(256, num_classes, 1),
        )


class DeepLabV3(SimpleSegmentationModel):
    """Backbone → DeepLabHead (→ FCNHead on an earlier stage when ``aux_loss``) → logits at input size."""


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """The paper's rates: 6/12/18 at output stride 16, doubled at 8 so the field of view stays the same."""
    check_output_stride(output_stride)
    return (6, 12, 18) if output_stride == 16 else (12, 24, 36)


def _set_dilation(conv: nn.Conv2d, dilation: int) -> None:
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation * (conv.kernel_size[0] // 2),) * 2


def resnet_backbone(
    arch: Callable[..., ResNet], *, output_stride: int, multi_grid: Sequence[int] | None = None
) -> ResNet:
    """A torchvision ResNet whose last stages trade stride for dilation; optional multi-grid in ``layer4``."""
    check_output_stride(output_stride)
    dilate = [False, True, True] if output_stride == 8 else [False, False, True]
    backbone = arch(weights=None, replace_stride_with_dilation=dilate)
    if multi_grid is not None:
        blocks = list(backbone.layer4)
        if len(multi_grid) != len(blocks):
            raise ValueError(
                f"multi_grid needs one unit rate per layer4 block ({len(blocks)}), got {tuple(multi_grid)}"
            )
        # The last block already runs at layer4's rate (torchvision gives the first block the
        # previous stage's rate); multi-grid multiplies that rate per block (paper, Sec. 3.2.1).
        base = blocks[-1].conv2.dilation[0]
        for block, unit in zip(blocks, multi_grid, strict=True):
            _set_dilation(block.conv2, base * unit)
    return backbone


def _deeplabv3_resnet(
    arch: Callable[..., ResNet],
    *,
    num_classes: int,
    aux_loss: bool,
    output_stride: int,
    multi_grid: Sequence[int] | None,
) -> DeepLabV3:
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.fcn import FCNHead

    resnet = resnet_backbone(arch, output_stride=output_stride, multi_grid=multi_grid)
    return_layers = {"layer4": "out"}
    if aux_loss:
        return_layers["layer3"] = "aux"
    backbone = IntermediateLayerGetter(resnet, return_layers=return_layers)
    aux_classifier = FCNHead(1024, num_classes) if aux_loss else None
    classifier = DeepLabHead(2048, num_classes, aspp_rates(output_stride))
    return DeepLabV3(backbone, classifier, aux_classifier, output_stride=output_stride)


def deeplabv3_resnet50(
    *, num_classes: int = 21, aux_loss: bool = False, output_stride: int = 8, multi_grid: Sequence[int] | None = None
) -> DeepLabV3:
    """DeepLab v3 on ResNet-50; the defaults are torchvision's ``deeplabv3_resnet50`` exactly.

    ``multi_grid=(1, 2, 4)`` is the paper's best setting for the three ``layer4`` blocks.
    """
    from torchvision.models import resnet50

    return _deeplabv3_resnet(
        resnet50, num_classes=num_classes, aux_loss=aux_loss, output_stride=output_stride, multi_grid=multi_grid
    )


def deeplabv3_resnet101(
    *, num_classes: int = 21, aux_loss: bool = False, output_stride: int = 8, multi_grid: Sequence[int] | None = None
) -> DeepLabV3:
    """DeepLab v3 on ResNet-101 (the paper's backbone); the defaults are torchvision's exactly."""
    from torchvision.models import resnet101

    return _deeplabv3_resnet(
        resnet101, num_classes=num_classes, aux_loss=aux_loss, output_stride=output_stride, multi_grid=multi_grid
    )


def _dilate_from(features: nn.Sequential, start: int) -> None:
    """Output stride 16 → 8: the block at ``start`` keeps stride 1 and every later spatial conv doubles its rate."""
    for block in features[start:]:
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size[0] > 1:
                conv.stride = (1, 1)
                _set_dilation(conv, 2 * conv.dilation[0])


def deeplabv3_mobilenet_v3_large(
    *, num_classes: int = 21, aux_loss: bool = False, output_stride: int | None = None
) -> DeepLabV3:
    """DeepLab v3 on MobileNetV3-Large.

    ``output_stride=None`` is torchvision's configuration: output stride 16 with ASPP rates
    12/24/36 (what its published weights were trained with). ``output_stride=16`` or ``8`` use
    the paper's rates for that stride instead.
    """
    from torchvision.models import mobilenet_v3_large
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.fcn import FCNHead

    rates = (12, 24, 36) if output_stride is None else aspp_rates(output_stride)
    output_stride = output_stride or 16
    features = mobilenet_v3_large(weights=None, dilated=True).features
    # Stage boundaries: the stem, every block that downsamples (C1..C4) and the last conv (C5).
    stages = [0] + [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)] + [len(features) - 1]
    if output_stride == 8:
        _dilate_from(features, stages[-3])  # the first block of the stride-16 stage
    out_pos, aux_pos = stages[-1], stages[-4]  # C5, and C2 at stride 8 for the aux head as torchvision
    return_layers = {str(out_pos): "out"}
    if aux_loss:
        return_layers[str(aux_pos)] = "aux"
    backbone = IntermediateLayerGetter(features, return_layers=return_layers)
    aux_classifier = FCNHead(features[aux_pos].out_channels, num_classes) if aux_loss else None
    classifier = DeepLabHead(features[out_pos].out_channels, num_classes, rates)
    return DeepLabV3(backbone, classifier, aux_classifier, output_stride=output_stride)
