"""Cheap baselines: kNN / linear probe on frozen features, pseudo-labeling the pool."""

from __future__ import annotations

import pytest
import torch

from histodiff.evaluate.baselines import (confident_balanced, knn_predict, linear_probe, probe_baselines,
                                          pseudo_label_outcomes)
from histodiff.evaluate.downstream import evaluate_arms
from test_downstream import RECIPE, make_splits


pytestmark = pytest.mark.usefixtures("one_thread")


def test_knn_votes_by_distance():
    train = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1])
    query = torch.tensor([[4.9, 5.0], [0.05, 0.0]])
    # k=3: for the first query the single near neighbour (class 1) outweighs two far ones
    assert knn_predict(train, labels, query, k=3, num_classes=2).tolist() == [1, 0]


def test_linear_probe_separates_and_probe_baselines_score():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(40, 5, generator=g)
    y = (f[:, 0] > 0).long()
    head = linear_probe(f[:20], y[:20], f[20:], y[20:], num_classes=2, seed=0, steps=100)
    assert float((head(f[20:]).argmax(1) == y[20:]).float().mean()) >= 0.85
    splits = make_splits(n=8)
    # the mean brightness separates the two classes: a perfect 1-d "latent"
    out = probe_baselines(splits, lambda x: torch.from_numpy(x.reshape(len(x), -1).mean(1, keepdims=True)).float(),
                          k=3, seeds=[0, 1])
    assert out["latent_knn"][0]["accuracy"] == 1.0
    assert [m["accuracy"] for m in out["latent_linear"]] == [1.0, 1.0]


def test_confident_balanced_keeps_equal_counts():
    probs = torch.tensor([[0.95, 0.05], [0.99, 0.01], [0.2, 0.8], [0.05, 0.95], [0.6, 0.4], [0.93, 0.07]])
    idx, labels = confident_balanced(probs, threshold=0.9)
    # class 0 passes 3 times (0.95, 0.99, 0.93), class 1 once (0.95): one each, the most confident
    assert idx.tolist() == [1, 3] and labels.tolist() == [0, 1]
    idx, _ = confident_balanced(probs, threshold=0.99)
    assert len(idx) == 0


def test_pseudo_label_retrains_on_confident_pool_tiles():
    splits = make_splits(n=6)
    pool = make_splits(seed=9, n=10).train_x
    recipe = RECIPE.model_copy(update={"epochs": 6, "batch_size": 4})  # enough to separate dark from light
    baseline, pseudo = pseudo_label_outcomes(splits, pool, recipe, seeds=[0], threshold=0.0)
    assert pseudo.arm == "pseudo_label" and pseudo.seed == 0
    assert pseudo.num_synthetic > 0 and pseudo.num_synthetic % 2 == 0
    assert 0.0 <= pseudo.test["accuracy"] <= 1.0
    # the baseline it trained to label the pool is the paired baseline: the same as evaluate_arms' own
    (alone,), _ = evaluate_arms(splits, {}, recipe, seeds=[0])
    assert baseline.arm == "baseline" and baseline.test == alone.test and baseline.best_epoch == alone.best_epoch
