"""Metrics against hand-computed answers."""
import math

import numpy as np
import pytest
import torch

from medexplore.models.metrics import (
    classification_metrics,
    detection_metrics,
    dice_per_class,
    ordinal_probabilities,
    ordinal_rank,
    regression_metrics,
    roc_auc,
)


def test_auc_known_answers():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    # 3 positives x 2 negatives; won: 0.7>0.4, 0.7>0.6, 0.5>0.4, 0.6>0.4; tie 0.6=0.6 counts half -> 4.5 / 6
    assert roc_auc([1, 1, 1, 0, 0], [0.7, 0.5, 0.6, 0.4, 0.6]) == pytest.approx(4.5 / 6)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_medmnist_binary_and_multiclass_definitions():
    m = classification_metrics("binary", np.array([0, 1, 1, 0]), np.array([0.2, 0.6, 0.4, 0.7]))
    assert m["acc"] == 0.5 and m["auc"] == 0.5 and m["recall_per_class"] == [0.5, 0.5]
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    m = classification_metrics("multiclass", np.array([0, 1, 2, 1]), scores)
    assert m["acc"] == 0.75 and m["recall_per_class"] == [1.0, 0.5, 1.0]
    assert m["f1_per_class"][0] == pytest.approx(2 / 3)
    ml = classification_metrics("multilabel", np.array([[1, 0], [0, 1]]), np.array([[0.9, 0.6], [0.1, 0.7]]))
    assert ml["acc"] == 0.75 and ml["auc"] == 1.0


def test_ordinal_probabilities_sum_to_one():
    p = ordinal_probabilities(torch.tensor([[3.0, 0.0, -3.0], [-5.0, -6.0, -7.0]]))
    assert torch.allclose(p.sum(1), torch.ones(2)) and p.shape == (2, 4)
    assert p[1].argmax() == 0 and p[0].argmax() in (1, 2)


def test_ordinal_grade_is_the_coral_rank_not_the_argmax():
    # P(y > k) = 0.6, 0.55, 0.5, 0.45: grade 2 by CORAL's rule (two thresholds above 0.5), while the class
    # probabilities (0.4, 0.05, 0.05, 0.05, 0.45) have their maximum at the extreme grade 4
    cumulative = torch.logit(torch.tensor([[0.6, 0.55, 0.5, 0.45], [0.9, 0.8, 0.3, 0.1]]))
    p = ordinal_probabilities(cumulative)
    assert p[0].argmax() == 4 and ordinal_rank(p).tolist() == [2, 2]
    assert ordinal_rank(p.numpy()).tolist() == [2, 2]
    m = classification_metrics("ordinal", np.array([2, 2]), p.numpy())
    assert m["acc"] == 1.0 and m["acc_argmax"] == 0.5 and m["mae_grade"] == 0.0


def test_dice_regression_and_detection():
    a = torch.tensor([[0, 1], [1, 1]])
    b = torch.tensor([[0, 1], [0, 1]])
    assert dice_per_class(a, b, 3)[1] == pytest.approx(2 * 2 / 5) and math.isnan(dice_per_class(a, b, 3)[2])
    r = regression_metrics(np.array([[1.0, np.nan], [3.0, 2.0]]), np.array([[2.0, 5.0], [3.0, 4.0]]))
    assert r["mae"] == pytest.approx(1.0) and r["mae_per_output"] == [0.5, 2.0]
    t = [torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[5.0, 5, 9, 9]])]
    perfect = [(torch.tensor([[0.0, 0, 10, 10], [20, 20, 22, 22]]), torch.tensor([0.9, 0.1])),
               (torch.tensor([[5.0, 5, 9, 9]]), torch.tensor([0.8]))]
    m = detection_metrics(perfect, t)
    assert m["map@0.5"] == pytest.approx(1.0) and m["mean_iou"] == pytest.approx(1.0)
    shifted = [(torch.tensor([[0.0, 0, 10, 5]]), torch.tensor([0.9])), (torch.zeros(0, 4), torch.zeros(0))]
    m = detection_metrics(shifted, t)
    # IoU 50/100 = 0.5 for the first target, none for the second: AP 0.5 up to IoU 0.5, 0 above
    assert m["mean_iou"] == pytest.approx(0.25) and m["map@0.5"] == pytest.approx(0.5) and m["map@0.75"] == 0.0
