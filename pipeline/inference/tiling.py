"""Tiled inference of one large image, band by band: what the inference actor keeps of it (the class
map, the uncertainty summaries, the encoded probabilities) without the full-size float arrays."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch

from pipeline.config.sections import InferenceConfig
from pipeline.evaluation.metrics import uncertainty_summary
from pipeline.inference.multiscale import autocast, class_map, multiscale_probs, tile_starts
from pipeline.rows.probs import encode_probs

_BAND_ROWS = 64


class _Bands:
    """The outputs of tiled inference, filled a band of finished rows at a time: the class map, the
    uncertainty sums and (``encoding``) the encoded probabilities."""

    def __init__(self, height: int, width: int, encoding: str | None, low_conf_threshold: float) -> None:
        self.mask = np.empty((height, width), dtype=np.uint8)
        self.encoding, self.threshold = encoding, low_conf_threshold
        self.encoded: np.ndarray | None = None
        self.top_sum = self.entropy_sum = self.low = 0.0

    def add(self, band: torch.Tensor, row: int) -> None:
        """(C, rows, W) averaged probabilities of the image rows from ``row`` on."""
        end = row + band.shape[1]
        self.mask[row:end] = class_map(band).numpy()
        best = band.max(dim=0).values
        self.top_sum += float(best.double().sum())
        self.entropy_sum += float(-(band * band.clamp_min(1e-12).log()).sum(dim=0).double().sum())
        self.low += float((best < self.threshold).sum())
        if self.encoding:
            if self.encoded is None:
                self.encoded = np.empty((band.shape[0], *self.mask.shape), dtype=np.dtype(self.encoding))
            self.encoded[:, row:end] = np.frombuffer(
                encode_probs(band, self.encoding), dtype=self.encoded.dtype
            ).reshape(band.shape)

    def summary(self, num_classes: int) -> dict[str, float]:
        pixels = self.mask.size
        return uncertainty_summary(self.top_sum / pixels, self.entropy_sum / pixels, self.low / pixels, num_classes)


def _coverage(length: int, starts: list[int], tile: int) -> torch.Tensor:
    """How many windows cover each row (or column)."""
    count = torch.zeros(length)
    for start in starts:
        count[start : start + tile] += 1
    return count


def _window(
    model: torch.nn.Module, window: torch.Tensor, *, mean: torch.Tensor, std: torch.Tensor, config: InferenceConfig
) -> torch.Tensor:
    """(C, h, w) probabilities on the host of one (h, w, 3) uint8 window."""
    device = mean.device
    x = window.to(device).permute(2, 0, 1)[None].float().div_(255.0)
    x = (x - mean) / std
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, config.precision):
        return multiscale_probs(model, x, config.scales, config.flip, config.average)[0].float().cpu()


class TiledOutputs(NamedTuple):
    """What tiled inference keeps of one image."""

    mask: np.ndarray  # (H, W) uint8 pre-CRF class map
    summary: dict[str, float]  # the uncertainty summaries (``metrics.uncertainty_summary``)
    encoded: np.ndarray | None  # (C, H, W) probabilities in ``encoding``; None without one


def tiled_outputs(
    model: torch.nn.Module,
    rgb: np.ndarray,
    *,
    mean: torch.Tensor,
    std: torch.Tensor,
    config: InferenceConfig,
    encoding: str | None,
) -> TiledOutputs:
    """What ``Segmenter`` keeps of sliding-window inference on one RGB uint8 image — the pre-CRF
    class map, the uncertainty summaries and (``encoding``) the encoded probabilities — computed
    band by band: each pixel's probabilities are the average over the overlapping ``tile`` x ``tile``
    windows that cover it, but neither the normalised image nor the probabilities ever exist at full
    size in float32, so memory is the image, the outputs and two tile rows of probabilities."""
    height, width = rgb.shape[:2]
    assert config.tile, "tiled_outputs runs with a tile size"
    tile, stride = config.tile, max(1, config.tile - config.tile_overlap)
    tops, lefts = tile_starts(height, tile, stride), tile_starts(width, tile, stride)
    rows, cols = _coverage(height, tops, tile), _coverage(width, lefts, tile)
    with warnings.catch_warnings():  # the batch's image buffer is read-only; windows are only read
        warnings.simplefilter("ignore", UserWarning)
        host = torch.from_numpy(rgb)
    out = _Bands(height, width, encoding, config.low_conf_threshold)
    acc: torch.Tensor | None = None  # rows top..top+tile of the probabilities summed over windows
    with torch.inference_mode():
        for n, top in enumerate(tops):
            bottom = min(top + tile, height)
            for left in lefts:
                p = _window(model, host[top:bottom, left : left + tile], mean=mean, std=std, config=config)
                if acc is None:
                    acc = torch.zeros(p.shape[0], min(tile, height), width)
                acc[:, : bottom - top, left : left + p.shape[2]] += p
            assert acc is not None  # tile_starts gives at least one window
            done = (tops[n + 1] if n + 1 < len(tops) else height) - top  # rows no later window touches
            for r0 in range(0, done, _BAND_ROWS):  # a few rows at a time keeps the temporaries small
                r1 = min(done, r0 + _BAND_ROWS)
                out.add(acc[:, r0:r1] / (rows[top + r0 : top + r1, None] * cols[None, :]), top + r0)
            keep = bottom - top - done  # rows the next tile row adds to, moved to the top of acc
            acc[:, :keep] = acc[:, done : done + keep].clone()
            acc[:, keep:] = 0
    assert acc is not None
    # The encoded probabilities stay an array, not bytes: bytes() would copy C bytes a pixel once more.
    return TiledOutputs(out.mask, out.summary(acc.shape[0]), out.encoded)
