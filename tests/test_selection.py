"""Selective mechanism: the confidence and centroid rules, the cap, and a trained selector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import toys as toy
from histodiff.augment.selection import (cap_by_score, centroid_rule, class_centroids, confidence_rule,
                                         export_selector, load_selector, train_selector)
from histodiff.storage import Store
from histodiff.data.shards import to_model_range


def test_confidence_rule_numbers():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    target = torch.tensor([0, 1, 2, 2])
    accepted, score = confidence_rule(probs, target, 0.6)
    assert accepted.tolist() == [True, False, True, False]
    torch.testing.assert_close(score, torch.tensor([0.7, 0.4, 0.8, 0.4]))
    assert confidence_rule(probs, target, 0.0)[0].tolist() == [True, False, True, True]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            confidence_rule(probs, target, bad)


def test_centroid_rule_and_cap():
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.1], [1.0, 0.2]])
    labels = torch.tensor([0, 1, 1, 0])
    cents = class_centroids(feats, labels, 2)
    torch.testing.assert_close(cents.norm(dim=1), torch.ones(2))
    accepted, score = centroid_rule(torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.0]]), torch.tensor([0, 0, 1]), cents)
    assert accepted.tolist() == [True, False, False]
    assert score[0] > score[1]  # the cosine similarity ranks tiles by their distance to the target centroid
    capped = cap_by_score(torch.tensor([True, True, False, True]), torch.tensor([0.2, 0.9, 1.0, 0.5]), 2)
    assert capped.tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="no tiles"):
        class_centroids(feats, torch.zeros(4, dtype=torch.long), 2)


@pytest.fixture(scope="module")
def selector():
    tx, ty_names = toy.toy_tiles(10, seed=0)
    vx, vy_names = toy.toy_tiles(4, seed=1)
    ids = {c: i for i, c in enumerate(toy.TOY_CLASS_NAMES)}
    selector, val_bacc = train_selector(
        to_model_range(tx), torch.tensor([ids[c] for c in ty_names]), to_model_range(vx),
        torch.tensor([ids[c] for c in vy_names]), toy.TOY_CLASS_NAMES, backbone="test_resnet", epochs=6, lr=1e-2,
        weight_decay=0.05, batch_size=8, augment="dihedral", seed=0)
    assert 0.0 <= val_bacc <= 1.0
    return selector


def check_set(n: int = 240, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (images, target, true class): blends of two class tints, the true class the dominant one.

    Targets are wrong for a third of the tiles, as a generator's misses would be.
    """
    rng = np.random.default_rng(seed)
    tiles, true, target = [], [], []
    for _ in range(n):
        a, b = rng.choice(3, size=2, replace=False)
        w = rng.uniform(0.5, 1.0)
        t = rng.integers(40, 120, size=(8, 8, 3)).astype(np.float64)
        t[..., a] += 120 * w
        t[..., b] += 120 * (1 - w)
        tiles.append(t.clip(0, 255).astype(np.uint8))
        true.append(a)
        target.append(a if rng.uniform() < 2 / 3 else b)
    return to_model_range(np.stack(tiles)), torch.tensor(target), torch.tensor(true)


def test_raising_tau_never_lowers_precision(selector):
    images, target, true = check_set()
    precisions, counts = [], []
    for tau in (0.0, 0.3, 0.4, 0.45, 0.5, 0.55):
        accepted, _ = selector.select(images, target, "confidence", tau)
        counts.append(int(accepted.sum()))
        precisions.append(float((true[accepted] == target[accepted]).float().mean()))
    assert counts[0] > counts[-1] > 0  # the thresholds really filter
    assert all(b >= a - 1e-12 for a, b in zip(precisions, precisions[1:])), precisions
    assert precisions[-1] > 2 / 3 + 0.15  # better than keeping everything (2/3 of targets are right)
    assert precisions[-1] > precisions[0]


def test_none_mode_keeps_everything_and_scores_it(selector):
    images, target, true = check_set(60)
    kept, score = selector.select(images, target, "none", 0.9)
    assert bool(kept.all())  # the unfiltered control: no tile is judged away
    _, conf_score = selector.select(images, target, "confidence", 0.9)
    torch.testing.assert_close(score, conf_score)  # the lineage still records p(target)
    with pytest.raises(ValueError, match="unknown selection mode 'best'"):
        selector.select(images, target, "best", 0.9)


def test_selector_round_trip(selector, tmp_path):
    images, _, _ = check_set(12)
    sha = export_selector(selector, str(tmp_path / "sel"), {"note": "x"}, Store())
    loaded, meta = load_selector(str(tmp_path / "sel"), Store())
    assert meta["sha256"] == sha == loaded.sha256 and meta["classes"] == toy.TOY_CLASS_NAMES
    p0, f0 = selector.judge(images)
    p1, f1 = loaded.judge(images)
    torch.testing.assert_close(p0, p1)
    torch.testing.assert_close(loaded.centroids, selector.centroids)
    with pytest.raises(FileNotFoundError, match="no complete selector"):
        load_selector(str(tmp_path / "nothing"), Store())
