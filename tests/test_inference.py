"""Multi-scale + flip inference against straightforward reference code, tiling, batching, codecs."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config.sections import InferenceConfig
from pipeline.evaluation.metrics import uncertainty
from pipeline.inference.multiscale import class_map, forward_groups, infer_batch, multiscale_probs
from pipeline.inference.tiling import tiled_outputs
from pipeline.models import build_model
from pipeline.models.weights import normalisation
from pipeline.rows.probs import decode_probs, encode_probs

SCALES = (0.5, 1.0, 1.75)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("deeplabv3plus_demo", num_classes=4).eval()


def reference(model, x, scales, flip):
    """The obvious loop: every scale and flip separately, upsample, softmax, average."""
    h, w = x.shape[-2:]
    outs = []
    for s in scales:
        xs = F.interpolate(x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            inp = xs.flip(-1) if flipped else xs
            logits = model(inp)
            if flipped:
                logits = logits.flip(-1)
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            outs.append(logits.softmax(1))
    return torch.stack(outs).mean(0)


@torch.no_grad()
def test_multiscale_flip_equals_reference_loop(model):
    x = torch.randn(2, 3, 75, 97)
    ours = multiscale_probs(model, x, SCALES, True)
    np.testing.assert_allclose(ours.numpy(), reference(model, x, SCALES, True).numpy(), atol=1e-5)
    assert ours.shape == (2, 4, 75, 97)
    np.testing.assert_allclose(ours.sum(1).numpy(), 1.0, atol=1e-5)


class PixelwiseProbe(nn.Module):
    """Per-pixel logits from the red channel: flip-equivariant, so a correctly un-flipped mirror
    pass equals the plain pass, while a missing un-flip mirrors the prediction."""

    def forward(self, x):
        return torch.cat([x[:, :1] * 5, -x[:, :1] * 5], dim=1)


@torch.no_grad()
def test_flip_is_undone_before_averaging():
    x = torch.full((1, 3, 8, 16), -1.0)
    x[..., :5] = 1.0  # asymmetric: only the left third is "class 0"
    plain = multiscale_probs(PixelwiseProbe(), x, (1.0,), False)
    flipped = multiscale_probs(PixelwiseProbe(), x, (1.0,), True)
    assert plain[0, 0, 0, 0] > 0.99 and plain[0, 0, 0, -1] < 0.01
    np.testing.assert_allclose(flipped.numpy(), plain.numpy(), atol=1e-6)
    mirrored_pass = PixelwiseProbe()(x.flip(-1)).softmax(1)  # what averaging without un-flipping would use
    assert not torch.allclose((plain + mirrored_pass) / 2, flipped)


@torch.no_grad()
def test_logit_averaging_option(model):
    x = torch.randn(1, 3, 40, 52)
    probs = multiscale_probs(model, x, (0.5, 1.0), False, average="logits")
    logits = [
        F.interpolate(
            model(F.interpolate(x, size=(round(40 * s), round(52 * s)), mode="bilinear", align_corners=False)),
            size=(40, 52),
            mode="bilinear",
            align_corners=False,
        )
        for s in (0.5, 1.0)
    ]
    np.testing.assert_allclose(probs.numpy(), torch.stack(logits).mean(0).softmax(1).numpy(), atol=1e-5)


class LocalNet(nn.Module):
    """A fully convolutional net with a 7-pixel receptive field: tiles must agree with whole images
    wherever a pixel's receptive field lies inside its tiles."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 5, 3, padding=1),
        )

    def forward(self, x):
        return self.body(x)


def _tiled_probs(net, image: np.ndarray, *, tile: int, overlap: int, flip: bool) -> torch.Tensor:
    """(1, C, H, W) probabilities of the production tiled path (``tiled_outputs``, float32 encoding)."""
    mean, std = normalisation()
    config = InferenceConfig(tile=tile, tile_overlap=overlap, scales=(1.0,), flip=flip)
    encoded = tiled_outputs(net, image, mean=mean, std=std, config=config, encoding="float32").encoded
    return torch.from_numpy(encoded)[None]


def _normalised(image: np.ndarray) -> torch.Tensor:
    mean, std = normalisation()
    return (torch.from_numpy(image).permute(2, 0, 1)[None].float().div_(255.0) - mean) / std


@torch.no_grad()
def test_tiled_equals_whole_image_away_from_tile_borders():
    image = np.random.default_rng(0).integers(0, 256, (150, 210, 3), dtype=np.uint8)
    whole = multiscale_probs(LocalNet(), _normalised(image), (1.0,), True)
    tiled = _tiled_probs(LocalNet(), image, tile=64, overlap=24, flip=True)
    assert tiled.shape == whole.shape
    # With 24 px overlap every pixel is >= 12 px from the border of at least one window; pixels in
    # several windows average predictions that each equal the whole-image one once the 3-pixel
    # receptive-field margin is inside, so only a thin band near window edges may differ.
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    diff = (tiled - whole).abs()[inner]
    assert float((diff < 1e-5).float().mean()) > 0.75
    np.testing.assert_allclose(tiled[..., 70:80, 100:110].numpy(), whole[..., 70:80, 100:110].numpy(), atol=0.2)


@torch.no_grad()
def test_single_window_tiling_is_exact(model):
    image = np.random.default_rng(1).integers(0, 256, (60, 60, 3), dtype=np.uint8)
    np.testing.assert_allclose(
        _tiled_probs(model, image, tile=64, overlap=16, flip=False).numpy(),
        multiscale_probs(model, _normalised(image), (1.0,), False).numpy(),
        atol=1e-6,
    )


def test_bucket_batching_is_exact_and_pad_batching_keeps_sizes(model):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3)).astype(np.uint8) for h, w in ((40, 50), (33, 47), (40, 50))]
    mean, std = normalisation()
    bucket = infer_batch(model, images, mean=mean, std=std, config=InferenceConfig(scales=(1.0, 1.5)))
    single = [
        infer_batch(model, [im], mean=mean, std=std, config=InferenceConfig(scales=(1.0, 1.5)))[0] for im in images
    ]
    for b, s in zip(bucket, single, strict=True):
        np.testing.assert_allclose(b.numpy(), s.numpy(), atol=1e-5)
    padded = infer_batch(model, images, mean=mean, std=std, config=InferenceConfig(batching="pad"))
    assert [tuple(p.shape) for p in padded] == [(4, 40, 50), (4, 33, 47), (4, 40, 50)]


def test_pixel_budget_splits_forwards_without_changing_results(model):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (40, 50, 3)).astype(np.uint8) for _ in range(5)]
    mean, std = normalisation()
    whole = infer_batch(model, images, mean=mean, std=std, config=InferenceConfig())
    split_config = InferenceConfig(max_batch_pixels=2 * 40 * 50)
    assert forward_groups([im.shape[:2] for im in images], split_config) == [[0, 1], [2, 3], [4]]
    split = infer_batch(model, images, mean=mean, std=std, config=split_config)
    for a, b in zip(whole, split, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_forward_groups():
    sizes = [(10, 10), (20, 10), (10, 10), (10, 10), (30, 30)]
    bucket = InferenceConfig(max_batch_pixels=250)
    assert forward_groups(sizes, bucket) == [[0, 2], [3], [1], [4]]  # same size, in order, <= 250 px
    pad = InferenceConfig(batching="pad", max_batch_pixels=600)
    # padded to the group's largest image: 2 x (20x10) fits, a third would make 3 x 200 = 600 -> fits
    assert forward_groups(sizes, pad) == [[0, 1, 2], [3], [4]]
    assert forward_groups(sizes, InferenceConfig(tile=64, tile_overlap=16)) == [[0], [1], [2], [3], [4]]
    assert forward_groups(sizes, InferenceConfig()) == [[0, 2, 3], [1], [4]]


def test_class_map_is_argmax_with_first_index_on_ties():
    probs = torch.softmax(torch.randn(6, 31, 37), 0)
    probs[:, 0, 0] = torch.tensor([0.1, 0.3, 0.3, 0.1, 0.1, 0.1])  # tie between classes 1 and 2
    labels = class_map(probs)
    assert labels.dtype == torch.uint8
    np.testing.assert_array_equal(labels.numpy(), probs.numpy().argmax(0))
    assert labels[0, 0] == 1


def test_probability_codecs_roundtrip():
    probs = torch.softmax(torch.randn(5, 9, 11), 0)
    for encoding, tol in (("float32", 0), ("float16", 1e-3), ("uint8", 1 / 510 + 1e-6)):
        data = encode_probs(probs, encoding)
        assert len(data) == probs.numel() * {"float32": 4, "float16": 2, "uint8": 1}[encoding]
        np.testing.assert_allclose(decode_probs(data, encoding, (5, 9, 11)), probs.numpy(), atol=tol)


def test_uncertainty_matches_numpy():
    rng = np.random.default_rng(3)
    p = rng.random((4, 6, 7))
    p /= p.sum(0)
    got = uncertainty(torch.from_numpy(p), 0.5)
    top = p.max(0)
    entropy = -(p * np.log(p)).sum(0)
    assert got["mean_max_prob"] == pytest.approx(top.mean())
    assert got["mean_entropy"] == pytest.approx(entropy.mean())
    assert got["mean_entropy_norm"] == pytest.approx(entropy.mean() / np.log(4))
    assert got["low_conf_fraction"] == pytest.approx((top < 0.5).mean())
    assert 0 <= got["mean_entropy_norm"] <= 1
