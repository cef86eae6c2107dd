"""Metrics against brute-force definitions."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_ai_node.train.data import Samples, stratified_split
from dicom_ai_node.train.metrics import metrics, roc_auc, roc_points, youden_threshold


def test_roc_auc_equals_pairwise_probability_with_ties():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200) + 0.4 * truth, 1).astype(np.float64)  # many ties
    pos, neg = scores[truth == 1], scores[truth == 0]
    expected = (np.sum(pos[:, None] > neg) + 0.5 * np.sum(pos[:, None] == neg)) / (
        len(pos) * len(neg)
    )
    assert roc_auc(truth, scores) == pytest.approx(expected)
    fpr, tpr = roc_points(truth, scores)
    assert np.trapezoid(tpr, fpr) == pytest.approx(expected)


def test_threshold_metrics_and_youden():
    truth = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.35, 0.3, 0.8, 0.9])
    m = metrics(truth, scores, 0.5)
    assert (m["sensitivity"], m["specificity"], m["precision"]) == (2 / 3, 1.0, 1.0)
    assert m["accuracy"] == pytest.approx(5 / 6) and m["f1"] == pytest.approx(0.8)
    # 0.25 and 0.5 both give sensitivity + specificity 5/3: the one nearer 0.5 wins.
    assert youden_threshold(truth, scores) == pytest.approx(0.5)
    separable = youden_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4]))
    assert separable == pytest.approx(0.25)


def test_stratified_split_keeps_series_together():
    groups = [f"s{i // 3}" for i in range(60)]  # 20 series of 3 slices
    labels = np.array([(i // 3) % 2 for i in range(60)])
    samples = Samples(
        np.zeros((60, 2, 2, 1), np.float32), labels, groups, [str(i) for i in range(60)]
    )
    splits = stratified_split(samples, seed=1)
    seen = [set(part.groups) for part in (splits.train, splits.val, splits.test)]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    for part in (splits.val, splits.test):
        assert set(part.labels.tolist()) == {0, 1}
    assert sum(map(len, (splits.train, splits.val, splits.test))) == 60
