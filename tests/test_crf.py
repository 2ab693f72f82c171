import numpy as np
import pytest

from pipeline.config.sections import CRFParams
from pipeline.crf.densecrf import CRFRefiner, CRFSpec, dense_crf
from pipeline.models.weights import Weights


def two_colour_image(h=40, w=60):
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = (200, 40, 40)
    image[:, w // 2 :] = (40, 40, 200)
    truth = np.zeros((h, w), np.uint8)
    truth[:, w // 2 :] = 1
    return image, truth


def test_confident_unary_returns_its_argmax():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (30, 41))
    probs = np.full((3, 30, 41), 1e-4, np.float32)
    for c in range(3):
        probs[c][labels == c] = 1.0
    image = rng.integers(0, 255, (30, 41, 3)).astype(np.uint8)
    out = dense_crf(image, probs, CRFParams(gaussian_compat=0.01, bilateral_compat=0.01))
    np.testing.assert_array_equal(out, labels)


def test_noisy_unary_recovers_colour_boundary():
    image, truth = two_colour_image()
    rng = np.random.default_rng(1)
    p1 = np.clip(truth * 0.6 + 0.2 + rng.normal(0, 0.25, truth.shape), 0.01, 0.99)
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    noisy = probs.argmax(0)
    refined = dense_crf(image, probs, CRFParams(bilateral_sxy=30, bilateral_srgb=10, bilateral_compat=10))
    assert (refined == truth).mean() > (noisy == truth).mean()
    assert (refined == truth).mean() > 0.98


def test_parameters_reach_pydensecrf():
    image, truth = two_colour_image()
    rng = np.random.default_rng(2)
    p1 = np.clip(truth * 0.5 + 0.25 + rng.normal(0, 0.3, truth.shape), 0.01, 0.99)
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    a = dense_crf(image, probs, CRFParams(bilateral_srgb=1, bilateral_compat=10))
    b = dense_crf(image, probs, CRFParams(bilateral_srgb=200, bilateral_compat=10))
    assert not np.array_equal(a, b)


def test_non_contiguous_float64_and_readonly_inputs():
    image, truth = two_colour_image(33, 47)  # odd sizes
    probs = np.stack([1.0 - truth, truth]).astype(np.float64) * 0.8 + 0.1
    expected = dense_crf(image, probs.astype(np.float32))
    # Fortran-ordered / transposed-twice views and read-only buffers must give the same answer.
    image_view = np.asfortranarray(image)
    probs_view = np.transpose(np.transpose(probs, (2, 1, 0)).copy(), (2, 1, 0))
    assert not probs_view.flags["C_CONTIGUOUS"]
    image_view.flags.writeable = False
    np.testing.assert_array_equal(dense_crf(image_view, probs_view), expected)


def test_zero_probabilities_do_not_produce_nan():
    image, truth = two_colour_image()
    probs = np.stack([1.0 - truth, truth]).astype(np.float32)  # exact zeros: log(0) must be clipped
    np.testing.assert_array_equal(dense_crf(image, probs), truth)


def test_shape_mismatch_is_rejected():
    image, _ = two_colour_image()
    with pytest.raises(ValueError, match="probs must be"):
        dense_crf(image, np.ones((2, 10, 10), np.float32))


def test_actor_records_crf_ms_and_turns_failures_into_error_rows():
    image, truth = two_colour_image(20, 30)
    probs = (np.stack([1.0 - truth, truth]) * 0.8 + 0.1).astype(np.float16)
    batch = {
        "key": np.array(["ok.jpg", "broken.jpg"]),
        "uri": np.array(["u1", "u2"]),
        "height": np.array([20, 20]),
        "width": np.array([30, 30]),
        "exif_orientation": np.array([0, 0]),
        "mean_max_prob": np.array([0.9, 0.9]),
        "mean_entropy": np.array([0.3, 0.3]),
        "mean_entropy_norm": np.array([0.4, 0.4]),
        "low_conf_fraction": np.array([0.0, 0.0]),
        "image": np.array([image.tobytes(), image.tobytes()], dtype=object),
        "label": np.array([truth.tobytes(), b""], dtype=object),
        "has_label": np.array([True, False]),
        "label_error": np.array(["", ""]),
        "mask_pre": np.array([truth.tobytes(), truth.tobytes()], dtype=object),
        "probs": np.array([probs.tobytes(), probs.tobytes()[:100]], dtype=object),  # truncated probs → failure
        "infer_ms": np.array([5.0, 5.0]),
        "infer_node": np.array(["n1", "n1"]),
        "infer_tile": np.array([0, 0]),
        "error_stage": np.array(["", ""]),
        "error_type": np.array(["", ""]),
        "error_message": np.array(["", ""]),
    }
    weights = Weights(model="m", uri="unused", sha256="0" * 64, categories=("c0", "c1"))  # 2 classes
    table = CRFRefiner(CRFSpec(params=CRFParams(), weights=weights, run_id="r", probs_encoding="float16"))(batch)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["ok.jpg"]["crf_ms"] > 0 and rows["ok.jpg"]["error_stage"] is None
    assert rows["ok.jpg"]["miou"] == pytest.approx(1.0)
    assert rows["broken.jpg"]["error_stage"] == "crf" and "dense CRF failed" in rows["broken.jpg"]["error_message"]
