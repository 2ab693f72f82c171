"""What every registered model provides; the pipeline relies on nothing else.

- ``forward(x)``: a normalised float batch (N, 3, H, W) → logits (N, C, H, W) at input size.
- ``output_stride``: input size / size of the feature map the head sees (an int).
- ``backbone``: the feature extractor, the part ``pipeline.models.checkpoints.load_backbone`` fills.
- a main classifier: ``pipeline.models.checkpoints.num_classes_in`` takes the output channels of the
  last 4-d ``*weight`` in the state dict whose key contains ``classifier`` and not ``aux``.
- where weights are published, ``pipeline.models.weights.default_weights(name)`` describes them
  (v1, v2 and the v3+ ResNet-101/Xception-65 models have none yet).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor, nn


@runtime_checkable
class SegmentationModel(Protocol):
    """Structural type of a DeepLab model (attributes are checked by ``isinstance``)."""

    output_stride: int
    backbone: nn.Module

    def forward(self, x: Tensor) -> Tensor: ...
