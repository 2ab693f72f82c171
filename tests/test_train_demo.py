"""jobs/train_demo.py's crops: DeepLab's random-scale augmentation, and reproducibility without it."""

import importlib.util

import numpy as np
import pytest

from pipeline.demo.synthetic import SceneSpec, make_scene
from pipeline.io.palette import IGNORE_INDEX
from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("train_demo", REPO / "jobs" / "train_demo.py")
train_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_demo)


def scenes():
    return [make_scene(seed, SceneSpec(height=200, width=240)) for seed in (11, 12)]


def test_without_scale_augmentation_crops_are_plain_slices_of_the_scenes():
    # Each pixel holds its own (row, column), so a crop tells where it was cut from.
    rows, cols = np.mgrid[0:200, 0:240]
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
    label = (rows % 6).astype(np.uint8)
    x, y = train_demo.random_crops([(image, label)], np.random.default_rng(3), 8, 160)
    assert x.shape == (8, 160, 160, 3) and y.shape == (8, 160, 160) and x.dtype == np.uint8
    for crop, crop_label in zip(x, y, strict=True):
        top, left = int(crop[0, 0, 0]), int(min(crop[0, 0, 1], crop[0, -1, 1]))
        expected = image[top : top + 160, left : left + 160]
        mirrored = crop[0, 0, 1] > crop[0, -1, 1]
        assert np.array_equal(crop, expected[:, ::-1] if mirrored else expected)
        assert np.array_equal(crop_label, label[top : top + 160, left : left + 160])  # rows only: flip-invariant


def test_downscaled_scenes_are_padded_with_ignore_and_the_mean_colour():
    x, y = train_demo.random_crops(scenes(), np.random.default_rng(0), 4, 160, (0.5, 0.5))
    # 200x240 at 0.5 is 100x120: every crop is that scene plus padding, labels ignored there.
    for _crop, label in zip(x, y, strict=True):
        assert (label == IGNORE_INDEX).mean() > 1 - (100 * 120) / 160**2 - 1e-9
        padded = label == IGNORE_INDEX
        assert set(np.unique(label[~padded])) <= set(range(6))
    mean_rgb = np.round(np.array(train_demo.IMAGENET_MEAN) * 255).astype(np.uint8)
    assert (x[:, 150:, 150:] == mean_rgb).all()  # bottom-right corner is always padding


def test_upscaled_scenes_show_objects_larger():
    data = [make_scene(seed, SceneSpec(height=200, width=240)) for seed in range(20, 30)]
    rng = np.random.default_rng(5)
    _, plain = train_demo.random_crops(data, rng, 64, 160)
    _, doubled = train_demo.random_crops(data, np.random.default_rng(5), 64, 160, (2.0, 2.0))

    def boundary_fraction(labels):
        # Doubling the scene halves the density of class boundaries in a crop of the same size.
        edges = labels[:, 1:, :] != labels[:, :-1, :]
        return edges.mean()

    assert boundary_fraction(doubled) < 0.7 * boundary_fraction(plain)


def test_bad_scale_range_fails_before_training(capsys):
    for bad in (["--scale-min", "2", "--scale-max", "1"], ["--scale-min", "0"]):
        with pytest.raises(SystemExit):
            train_demo.main(bad)
        assert "0 < MIN <= MAX" in capsys.readouterr().err
