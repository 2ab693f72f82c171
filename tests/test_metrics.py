import numpy as np
import pytest

from pipeline.evaluation.metrics import DatasetSummary, image_stats, mean_iou


def numpy_reference(pairs, n):
    """Independent implementation: a confusion matrix over all valid pixels, divided once."""
    cm = np.zeros((n, n), np.int64)
    for pred, label in pairs:
        for p, t in zip(pred.ravel(), label.ravel(), strict=True):
            if t != 255:
                cm[t, p] += 1
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = [tp[c] / union[c] for c in range(n) if union[c] > 0]
    acc = tp.sum() / cm.sum()
    return np.mean(iou), acc, cm


def numpy_mean_acc_and_fwiou(cm):
    tp, label_area = np.diag(cm), cm.sum(1)
    union = cm.sum(0) + label_area - tp
    present = label_area > 0
    mean_acc = np.mean(tp[present] / label_area[present])
    freq = label_area / label_area.sum()
    fw = sum(freq[c] * tp[c] / union[c] for c in range(len(tp)) if union[c] > 0)
    return mean_acc, fw


def test_summed_statistics_match_confusion_matrix():
    rng = np.random.default_rng(0)
    n = 7  # classes 5 and 6 never appear in predictions nor labels: they must not count
    pairs = []
    for _ in range(5):
        h, w = rng.integers(5, 30, 2)
        pred = rng.integers(0, 5, (h, w)).astype(np.uint8)
        label = rng.integers(0, 5, (h, w)).astype(np.uint8)
        label[rng.random((h, w)) < 0.2] = 255
        pairs.append((pred, label))
    only_ignore = (rng.integers(0, 5, (4, 4)).astype(np.uint8), np.full((4, 4), 255, np.uint8))
    pairs.append(only_ignore)

    totals = np.zeros((3, n), np.int64)
    for pred, label in pairs:
        s = image_stats(pred, label, n)
        totals += np.stack([s.intersect, s.union, s.label_area])
    summary = DatasetSummary.from_sums(*totals)
    miou, acc, cm = numpy_reference(pairs, n)
    assert summary.miou == pytest.approx(miou)
    assert summary.pixel_acc == pytest.approx(acc)
    assert np.isnan(summary.iou[5]) and np.isnan(summary.iou[6])
    mean_acc, fw_iou = numpy_mean_acc_and_fwiou(cm)
    assert summary.mean_acc == pytest.approx(mean_acc)
    assert summary.fw_iou == pytest.approx(fw_iou)
    np.testing.assert_array_equal(totals[2], cm.sum(1))


def test_only_ignore_label_has_no_metrics():
    s = image_stats(np.zeros((3, 3), np.uint8), np.full((3, 3), 255, np.uint8), 4)
    assert s.miou is None and s.pixel_acc is None
    assert s.union.sum() == 0


def test_mean_of_image_mious_is_not_dataset_miou():
    # A tiny image with a perfect score must not pull the dataset mIoU up to its own level.
    big_pred = np.zeros((10, 10), np.uint8)
    big_label = np.zeros((10, 10), np.uint8)
    big_label[:, 5:] = 1
    small = np.ones((1, 1), np.uint8)
    stats = [image_stats(big_pred, big_label, 2), image_stats(small, small, 2)]
    per_image = np.mean([s.miou for s in stats])
    dataset = mean_iou(sum(s.intersect for s in stats), sum(s.union for s in stats))
    assert dataset != pytest.approx(per_image)
    assert dataset == pytest.approx((50 / 100 + 1 / 51) / 2)


def test_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in size"):
        image_stats(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8), 2)
