"""DeepLab models by name (torchvision-style keyword-only builders).

Every model's ``forward`` takes a normalised float batch (N, 3, H, W) and returns logits
(N, num_classes, H, W) at the input resolution.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.models.deeplabv3plus import deeplabv3plus_demo

MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
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
