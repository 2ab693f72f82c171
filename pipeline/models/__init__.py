"""DeepLab models by name (torchvision-style keyword-only builders).

Every model's ``forward`` takes a normalised float batch (N, 3, H, W) and returns logits
(N, num_classes, H, W) at the input resolution, and has an ``output_stride`` attribute (input
size / size of the feature map the head sees). One module per DeepLab generation: v1 (VGG-16
LargeFOV), v2 (ResNet-101 ASPP-L), v3 (torchvision-compatible), v3+ (encoder-decoder).

Adding a model: its builder (a keyword-only function named after the model) in a module here,
with its published ``pipeline.models.weights.Weights`` in that module's ``DEFAULT_WEIGHTS`` dict (model
name → weight set) if it has any, plus one ``_MODULES`` line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING

from pipeline.models.protocol import SegmentationModel as SegmentationModel  # the public contract
from pipeline.models.weights import Weights, WeightsError

if TYPE_CHECKING:
    from torch import nn

# The job's --model default; a plain string so the CLI can name it without importing torch.
DEFAULT_MODEL = "deeplabv3plus_demo"

# One line per model: its name and the module holding its builder of the same name. Imported on
# first use, so naming a model (the CLI's --model choices) does not import torch.
_MODULES = {
    "deeplabv1_vgg16": "deeplabv1",
    "deeplabv2_resnet101": "deeplabv2",
    "deeplabv3_resnet50": "deeplabv3",
    "deeplabv3_resnet101": "deeplabv3",
    "deeplabv3_mobilenet_v3_large": "deeplabv3",
    "deeplabv3plus_resnet101": "deeplabv3plus",
    "deeplabv3plus_xception65": "deeplabv3plus",
    "deeplabv3plus_demo": "deeplabv3plus",
}


def _module(name: str) -> ModuleType:
    """The module holding model ``name``'s builder and weights; KeyError for an unknown name."""
    return import_module(f"{__name__}.{_MODULES[name]}")


class _Builders(Mapping):
    """Model name → builder; the builder's module is imported when it is looked up."""

    def __getitem__(self, name: str) -> Callable[..., nn.Module]:
        return getattr(_module(name), name)

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)


MODEL_BUILDERS: Mapping[str, Callable[..., nn.Module]] = _Builders()


class _DefaultWeights(Mapping):
    """Model name → the weight set it stands for when none is given, for the models that have one.

    Read from the ``DEFAULT_WEIGHTS`` dict beside the builder (a module without one publishes
    none); looking a name up imports its module, iterating imports them all.
    """

    def __getitem__(self, name: str) -> Weights:
        return getattr(_module(name), "DEFAULT_WEIGHTS", {})[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name in _MODULES if name in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


DEFAULT_WEIGHTS: Mapping[str, Weights] = _DefaultWeights()


def default_weights(model: str) -> Weights:
    """The weight set a model name stands for when no --weights is given (imports its builder's module)."""
    try:
        return DEFAULT_WEIGHTS[model]
    except KeyError:
        raise WeightsError(f"no published weights are known for {model}; pass --weights URI") from None


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
