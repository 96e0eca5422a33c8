"""Cheap baselines: kNN / linear probe on frozen features."""

from __future__ import annotations

import pytest
import torch

from histodiff.evaluate.baselines import knn_predict, linear_probe, probe_baselines
from test_downstream import make_splits


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
