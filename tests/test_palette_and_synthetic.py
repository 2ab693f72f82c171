import io

import numpy as np
from PIL import Image

from pipeline.demo.synthetic import CLASS_NAMES, SceneSpec, make_scene
from pipeline.io.palette import IGNORE_INDEX, mask_to_png, png_to_mask, voc_palette


def test_mask_png_is_mode_p_with_voc_palette_and_roundtrips():
    mask = np.random.default_rng(0).integers(0, 21, (17, 23)).astype(np.uint8)
    mask[0, 0] = IGNORE_INDEX
    data = mask_to_png(mask)
    image = Image.open(io.BytesIO(data))
    assert image.mode == "P"
    assert image.getpalette()[3:6] == [128, 0, 0]  # VOC class 1 (aeroplane) is dark red
    np.testing.assert_array_equal(np.array(image), mask)
    np.testing.assert_array_equal(png_to_mask(data), mask)


def test_voc_palette_known_entries():
    pal = voc_palette()
    assert pal[0].tolist() == [0, 0, 0] and pal[15].tolist() == [192, 128, 128]  # person


def test_scenes_are_deterministic_and_voc_like():
    a_img, a_lab = make_scene(7)
    b_img, b_lab = make_scene(7)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert a_img.shape == (SceneSpec().height, SceneSpec().width, 3) and a_img.dtype == np.uint8
    values = set(np.unique(a_lab).tolist())
    assert IGNORE_INDEX in values  # ignore band along object borders
    assert values - {IGNORE_INDEX} <= set(range(len(CLASS_NAMES)))
    assert not np.array_equal(make_scene(8)[0], a_img)


def test_scenes_cover_every_class_with_varied_sizes():
    seen, sizes = set(), []
    for seed in range(40):
        _, label = make_scene(seed)
        for c in range(1, len(CLASS_NAMES)):
            area = int((label == c).sum())
            if area:
                seen.add(c)
                sizes.append(area)
    assert seen == set(range(1, len(CLASS_NAMES)))
    assert min(sizes) < 400 and max(sizes) > 8000  # small and large objects
