"""DeepLab v1 "LargeFOV" (Chen et al., ICLR 2015, "Semantic Image Segmentation with Deep
Convolutional Nets and Fully Connected CRFs").

VGG-16 keeps its torchvision ``features`` layout (so ImageNet VGG-16 conv weights load into
``backbone``), with the paper's changes: the last two max-pools no longer subsample and conv5
is dilated by 2, giving output stride 8; the fully connected fc6/fc7 become a 3x3 conv with
rate 12 and 1024 channels and a 1x1 conv with 1024 channels. Logits are upsampled bilinearly to
the input size (the paper's x8 interpolation); the dense CRF runs as a separate pipeline stage.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import vgg16
from torchvision.models._utils import IntermediateLayerGetter

from pipeline.models._utils import SimpleSegmentationModel, check_output_stride


class LargeFOVHead(nn.Sequential):
    """fc6 (3x3, rate 12, 1024 ch), fc7 (1x1, 1024 ch), each with ReLU and dropout, then fc8 classifier."""

    def __init__(
        self, in_channels: int, num_classes: int, dilation: int = 12, channels: int = 1024, dropout: float = 0.5
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(channels, channels, 1),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(channels, num_classes, 1),
        )


class DeepLabV1(SimpleSegmentationModel):
    """VGG-16 with atrous conv5 → LargeFOV head → logits at input size."""


def vgg16_atrous_features(*, output_stride: int = 8) -> nn.Sequential:
    check_output_stride(output_stride)
    features = vgg16(weights=None).features
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    # DeepLab's Caffe model pools with 3x3 windows and padding 1 (torchvision: 2x2), which keeps
    # ceil(H / stride) positions so odd image sizes lose no border pixels.
    for i in pools[:3]:
        features[i] = nn.MaxPool2d(3, stride=2, padding=1)
    features[pools[3]] = nn.MaxPool2d(3, stride=1 if output_stride == 8 else 2, padding=1)
    features[pools[4]] = nn.MaxPool2d(3, stride=1, padding=1)
    if output_stride == 8:
        # pool4 stopped subsampling, so conv5 dilates by 2 to keep the receptive field it was trained with.
        for conv in features[pools[3] : pools[4]]:
            if isinstance(conv, nn.Conv2d):
                conv.dilation, conv.padding = (2, 2), (2, 2)
    return features


def deeplabv1_vgg16(*, num_classes: int = 21, output_stride: int = 8) -> DeepLabV1:
    """DeepLab-LargeFOV. ``output_stride=16`` (not in the paper) keeps pool4's stride and halves fc6's rate to 6."""
    features = vgg16_atrous_features(output_stride=output_stride)
    backbone = IntermediateLayerGetter(features, return_layers={str(len(features) - 1): "out"})
    classifier = LargeFOVHead(512, num_classes, dilation=12 * 8 // output_stride)
    return DeepLabV1(backbone, classifier, output_stride=output_stride)
