"""DeepLab models by name (torchvision-style keyword-only builders).

Every model's ``forward`` takes a normalised float batch (N, 3, H, W) and returns logits
(N, num_classes, H, W) at the input resolution, and has an ``output_stride`` attribute (input
size / size of the feature map the head sees). One module per DeepLab generation: v1 (VGG-16
LargeFOV), v2 (ResNet-101 ASPP-L), v3 (torchvision-compatible), v3+ (encoder-decoder).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.models.deeplabv1 import deeplabv1_vgg16
from pipeline.models.deeplabv2 import deeplabv2_resnet101
from pipeline.models.deeplabv3 import deeplabv3_mobilenet_v3_large, deeplabv3_resnet50, deeplabv3_resnet101
from pipeline.models.deeplabv3plus import deeplabv3plus_demo, deeplabv3plus_resnet101, deeplabv3plus_xception65

MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "deeplabv1_vgg16": deeplabv1_vgg16,
    "deeplabv2_resnet101": deeplabv2_resnet101,
    "deeplabv3_resnet50": deeplabv3_resnet50,
    "deeplabv3_resnet101": deeplabv3_resnet101,
    "deeplabv3_mobilenet_v3_large": deeplabv3_mobilenet_v3_large,
    "deeplabv3plus_resnet101": deeplabv3plus_resnet101,
    "deeplabv3plus_xception65": deeplabv3plus_xception65,
    "deeplabv3plus_demo": deeplabv3plus_demo,
}


def build_model(name: str, *, num_classes: int, output_stride: int | None = None) -> nn.Module:
    """Build ``name`` with ``num_classes`` outputs; ``output_stride`` None keeps the model's default."""
    try:
        builder = MODEL_BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(sorted(MODEL_BUILDERS))}") from None
    kwargs = {"num_classes": num_classes}
    if output_stride is not None:
        kwargs["output_stride"] = output_stride
    return builder(**kwargs)
