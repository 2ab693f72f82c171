"""How averaged probabilities travel from the inference actors to the CRF actors.

They are the largest thing in the object store (C x H x W per image), so they travel at the
smallest precision that leaves the CRF's result unchanged in practice: ``benchmarks/crf.py``
measures bytes per image and CRF label agreement for each encoding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # CRF actors import this for decode_probs; torch would cost them time and RSS
    import torch

ENCODINGS = ("float32", "float16", "uint8")


def encode_probs(probs: torch.Tensor, encoding: str) -> bytes:
    """(C, H, W) probabilities → bytes. uint8 stores round(255 p): 1 byte per class and pixel."""
    if encoding == "uint8":
        return (probs.clamp(0, 1) * 255).round_().byte().cpu().numpy().tobytes()
    return (probs.half() if encoding == "float16" else probs.float()).cpu().numpy().tobytes()


def decode_probs(data: bytes, encoding: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Bytes → (C, H, W) float32 probabilities (uint8 zeros stay zero; the CRF clips them)."""
    if encoding == "uint8":
        return np.frombuffer(data, dtype=np.uint8).reshape(shape).astype(np.float32) / 255.0
    return np.frombuffer(data, dtype=np.dtype(encoding)).reshape(shape).astype(np.float32)


def quantise_probs(probs: torch.Tensor, encoding: str) -> torch.Tensor:
    """decode_probs(encode_probs(probs)) as float32 on probs' device: the CRF's input in every plan, so
    the fused torch backend on a GPU refines what the CRF pool would get, without a copy to the host."""
    import torch

    if encoding == "uint8":
        levels = (probs.clamp(0, 1) * 255).round_().byte().float()
        # Divide by a tensor: CUDA turns division by a Python scalar into a (differently rounded) multiply.
        return levels / torch.tensor(255.0, device=probs.device)
    return probs.half().float() if encoding == "float16" else probs.float()
