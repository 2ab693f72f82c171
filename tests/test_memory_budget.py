"""Memory budgets and per-image times through the real actor code (Segmenter with the fused CRF,
CRFRefiner), real torch and real pydensecrf; the end-to-end run goes through the CLI and Ray."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config.memory import BUDGET_TILE, MIN_IMAGE_BYTES, crf_scale
from pipeline.config.sections import ComputeConfig, CRFParams, InferenceConfig
from pipeline.crf.densecrf import dense_crf, reduced_crf
from pipeline.demo.synthetic import SceneSpec, encode_jpeg, make_scene
from pipeline.io.palette import mask_to_png
from pipeline.models.deeplabv3plus import DEMO_WEIGHTS as W
from tests.conftest import demo_segmenter, run_job


def test_crf_scale_fits_the_budget_and_the_pixel_cap():
    assert crf_scale(100, 100, 6, budget=10**9, max_pixels=1_000_000) == 1.0
    assert crf_scale(4000, 3000, 6, budget=None, max_pixels=0) == 1.0  # no budget, no cap
    capped = crf_scale(4000, 3000, 6, budget=None, max_pixels=1_000_000)
    assert 4000 * 3000 * capped**2 <= 1_000_000 < 4000 * 3000 * (capped + 0.002) ** 2
    from pipeline.config.memory import crf_bytes

    tight = crf_scale(4000, 3000, 6, budget=200 * 2**20, max_pixels=0)
    assert crf_bytes(round(4000 * tight), round(3000 * tight), 6) <= 200 * 2**20 < crf_bytes(4000, 3000, 6)


def test_bad_budget_fails_with_what_to_fix():
    with pytest.raises(ValueError, match="0 \\(no budget\\) or 256"):
        ComputeConfig(actor_memory_mib=100)
    with pytest.raises(ValueError, match="CRF max pixels must be >= 0"):
        CRFParams(max_pixels=-1)


def test_reduced_crf_keeps_full_size_and_agrees_with_the_full_crf():
    image, label = make_scene(1_000_003, SceneSpec(height=360, width=480))
    truth = np.where(label == 255, 0, label)
    rng = np.random.default_rng(0)
    probs = np.full((6, *truth.shape), 0.05, np.float32)
    np.put_along_axis(probs, truth[None].astype(np.int64), 0.5, axis=0)
    probs += rng.random(probs.shape, dtype=np.float32) * 0.4
    probs /= probs.sum(0)
    encoded = np.round(probs * 255).astype(np.uint8)
    full = dense_crf(image, encoded.astype(np.float32) / 255.0)
    half = reduced_crf(image, encoded.tobytes(), "uint8", 6, 0.5, CRFParams())
    assert half.shape == truth.shape and half.dtype == np.uint8
    assert (half == full).mean() > 0.95


def _segmenter(**kwargs):

    return demo_segmenter(**kwargs)


def _batch(tmp_path, scenes: dict[str, tuple[int, int]]):
    from pipeline.io.decode import decode_batch

    uris, label_uris = [], []
    for key, (h, w) in scenes.items():
        image, label = make_scene(1_000_000 + len(uris), SceneSpec(height=h, width=w))
        (tmp_path / f"{key}.jpg").write_bytes(encode_jpeg(image))
        (tmp_path / f"{key}.png").write_bytes(mask_to_png(label))
        uris.append(str(tmp_path / f"{key}.jpg"))
        label_uris.append(str(tmp_path / f"{key}.png"))
    return decode_batch(
        {"key": np.array(list(scenes)), "uri": np.array(uris), "label_uri": np.array(label_uris)},
        storage_options={},
        num_classes=len(W.categories),
        max_pixels=None,
    )


def test_an_image_over_a_tiny_budget_is_tiled_and_refined_reduced_at_full_size(tmp_path):
    seg = _segmenter(inference=InferenceConfig(), crf=CRFParams(), actor_memory_mib=256)
    assert seg.budget == MIN_IMAGE_BYTES  # torch and the model alone hold more than 256 MiB
    rows = {r["key"]: r for r in seg(_batch(tmp_path, {"big": (1200, 1600), "small": (120, 160)})).to_pylist()}
    big, small = rows["big"], rows["small"]
    assert big["error_stage"] is None and small["error_stage"] is None
    assert big["infer_tile"] == BUDGET_TILE and 0 < big["crf_scale"] < 1
    mask = np.asarray(Image.open(io.BytesIO(big["mask"])))
    pre = np.asarray(Image.open(io.BytesIO(big["mask_pre_crf"])))
    assert mask.shape == pre.shape == (1200, 1600)
    assert (mask == pre).mean() > 0.9 and big["miou"] > 0.5  # a real segmentation, not a blank
    assert small["infer_tile"] is None and small["crf_scale"] == 1.0
    # Without a budget (and without the CRF's pixel cap) the same image runs whole and full-size.
    seg = _segmenter(inference=InferenceConfig(), crf=CRFParams(max_pixels=0), actor_memory_mib=0)
    row = seg(_batch(tmp_path, {"big": (600, 800)})).to_pylist()[0]
    assert row["infer_tile"] is None and row["crf_scale"] == 1.0


def test_each_image_reports_its_own_inference_time(tmp_path):
    seg = _segmenter(inference=InferenceConfig(), crf=None, actor_memory_mib=0)
    seg(_batch(tmp_path, {"warm": (64, 64)}))  # first forwards pay oneDNN's setup
    sizes = {"a": (96, 128), "b": (96, 128), "c": (96, 128), "huge": (1000, 1400)}
    rows = {r["key"]: r for r in seg(_batch(tmp_path, sizes)).to_pylist()}
    assert all(rows[k]["infer_tile"] is None for k in sizes)
    for key in "abc":
        assert 0 < rows[key]["infer_ms"] < rows["huge"]["infer_ms"] / 10, {k: r["infer_ms"] for k, r in rows.items()}


@pytest.mark.slow
def test_job_with_a_tiny_budget_tiles_and_reduces_only_the_big_image(tmp_path):
    images, labels = tmp_path / "bucket" / "images", tmp_path / "bucket" / "labels"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for key, (h, w) in {"big": (1500, 2000), "small": (240, 320)}.items():
        image, label = make_scene(1_000_010 + h, SceneSpec(height=h, width=w))
        (images / f"{key}.jpg").write_bytes(encode_jpeg(image))
        (labels / f"{key}.png").write_bytes(mask_to_png(label))
    args = [str(images), "--labels", str(labels), "--output", str(tmp_path / "out"), "--run-id", "m"]
    proc = run_job(*args, "--actor-memory-mib", "256", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    masks = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "run=m" / "masks").to_pylist()}
    assert set(masks) == {"big.jpg", "small.jpg"}
    big, small = masks["big.jpg"], masks["small.jpg"]
    assert big["infer_tile"] == BUDGET_TILE and 0 < big["crf_scale"] < 1
    assert np.asarray(Image.open(io.BytesIO(big["mask"]))).shape == (1500, 2000) == (big["height"], big["width"])
    assert small["infer_tile"] is None and small["crf_scale"] == 1.0
    assert "reduced-resolution CRF: 1" in proc.stdout


def _sliding_window_reference(model, image, *, tile: int, overlap: int, scales, flip: bool):
    """The obvious sliding window: every window's multi-scale probabilities summed into a full-size
    float array and divided by each pixel's window count (what the banded ``tiled_outputs`` must equal)."""
    import torch

    from pipeline.inference.multiscale import multiscale_probs, tile_starts

    height, width = image.shape[-2:]
    stride = max(1, tile - overlap)
    total = count = None
    for top in tile_starts(height, tile, stride):
        for left in tile_starts(width, tile, stride):
            probs = multiscale_probs(model, image[..., top : top + tile, left : left + tile], scales, flip).cpu()
            if total is None:
                total = torch.zeros(image.shape[0], probs.shape[1], height, width)
                count = torch.zeros(1, 1, height, width)
            total[..., top : top + tile, left : left + tile] += probs
            count[..., top : top + tile, left : left + tile] += 1
    return total / count


def test_banded_tiled_outputs_equal_sliding_window_inference():
    import torch

    from pipeline.evaluation.metrics import uncertainty
    from pipeline.inference.multiscale import class_map, load_model
    from pipeline.inference.tiling import tiled_outputs
    from pipeline.models.weights import normalisation
    from pipeline.rows.probs import encode_probs

    model, _, _ = load_model(W.model, None)
    mean, std = normalisation(W.mean, W.std, torch.device("cpu"))
    image, _ = make_scene(1_000_020, SceneSpec(height=230, width=310))
    config = InferenceConfig(tile=96, tile_overlap=32, scales=(0.75, 1.0), flip=True)
    mask, summary, encoded = tiled_outputs(model, image, mean=mean, std=std, config=config, encoding="uint8")
    x = (torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0 - mean) / std
    with torch.inference_mode():
        probs = _sliding_window_reference(model, x, tile=96, overlap=32, scales=config.scales, flip=True)[0]
    assert np.array_equal(mask, class_map(probs).numpy())
    assert encoded.tobytes() == encode_probs(probs, "uint8")
    assert summary == pytest.approx(uncertainty(probs), rel=1e-5)
