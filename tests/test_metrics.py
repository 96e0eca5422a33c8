"""Metrics and the paired gain with its t-interval, on hand-made predictions."""

from __future__ import annotations

import math

import pytest
import torch

from histodiff.evaluate.metrics import classification_metrics, paired_gain, summarise


def test_metrics_on_hand_made_predictions():
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 2, 0])
    m = classification_metrics(pred, target, 3)
    assert m["accuracy"] == pytest.approx(6 / 8)
    # recalls 3/4, 2/2, 1/2 -> balanced accuracy 0.75
    assert m["sensitivity"] == pytest.approx([0.75, 1.0, 0.5])
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    # specificity of class 0: negatives are 4 tiles, 1 predicted 0 -> 3/4
    assert m["specificity"] == pytest.approx([0.75, 5 / 6, 1.0])
    # F1: class0 p=3/4 r=3/4 -> .75; class1 p=2/3 r=1 -> .8; class2 p=1 r=.5 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.75 + 0.8 + 2 / 3) / 3)
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_paired_gain_and_t_interval():
    g = paired_gain([0.80, 0.70, 0.75], [0.85, 0.78, 0.79])
    # diffs .05 .08 .04: mean .056667, sd .020817, t(0.975, 2) = 4.302653
    half = 4.302653 * 0.0208167 / math.sqrt(3)
    assert g.mean == pytest.approx(0.0566667, abs=1e-6)
    assert g.ci_low == pytest.approx(0.0566667 - half, abs=1e-5)
    assert g.ci_high == pytest.approx(0.0566667 + half, abs=1e-5)
    assert g.per_seed == pytest.approx((0.05, 0.08, 0.04))
    one = paired_gain([0.5], [0.6])
    assert one.mean == pytest.approx(0.1) and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    with pytest.raises(ValueError, match="one baseline per augmented"):
        paired_gain([0.1, 0.2], [0.3])


def test_summarise_pairs_by_seed():
    from types import SimpleNamespace as NS

    def o(arm, seed, acc):
        return NS(arm=arm, seed=seed, test={"accuracy": acc, "balanced_accuracy": acc, "macro_f1": acc})

    # listed out of seed order: pairing must follow the seed, not the position
    outs = [o("baseline", 1, 0.6), o("baseline", 0, 0.5), o("augmented", 0, 0.7), o("augmented", 1, 0.7)]
    summary, gains = summarise(outs)
    assert summary["baseline"]["accuracy"][0] == pytest.approx(0.55)
    assert gains["augmented"]["accuracy"]["per_seed"] == pytest.approx([0.2, 0.1])


def test_the_interval_is_over_draws_of_seed_averaged_gains():
    from histodiff.evaluate.metrics import draw_gain

    # three draws, three seeds each: the seed-averaged gains are 0.02, 0.08 and 0.05
    per_draw = [[0.01, 0.02, 0.03], [0.07, 0.08, 0.09], [0.05, 0.05, 0.05]]
    g = draw_gain(per_draw)
    # mean .05, sd over draws .03, t(0.975, 2) = 4.302653: half width 4.302653 * .03 / sqrt(3)
    half = 4.302653 * 0.03 / math.sqrt(3)
    assert g.n == 3 and g.mean == pytest.approx(0.05) and g.std == pytest.approx(0.03)
    assert (g.ci_low, g.ci_high) == (pytest.approx(0.05 - half, abs=1e-6), pytest.approx(0.05 + half, abs=1e-6))
    # the 9 seeds are not 9 samples: pooling them would claim a much narrower interval
    pooled = paired_gain([0.0] * 9, [v for d in per_draw for v in d])
    assert pooled.ci_high - pooled.ci_low < (g.ci_high - g.ci_low) / 2
    with pytest.raises(ValueError, match="every draw"):
        draw_gain([[0.1], []])


def test_holm_adjusts_in_order_and_keeps_nan():
    from histodiff.evaluate.metrics import holm, t_test_p

    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = holm([0.2, float("nan"), 0.01])
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    assert t_test_p([0.05, 0.06, 0.04]) < 0.05 and math.isnan(t_test_p([0.1]))
