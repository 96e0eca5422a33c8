"""Control arms: the same volume, the same mixing and the same optimizer steps as the arm under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histodiff.augment.classical import strong_augment
from histodiff.evaluate import controls, downstream
from histodiff.evaluate.downstream import Extra, evaluate_arms
from test_downstream import RECIPE, make_splits

pytestmark = pytest.mark.usefixtures("one_thread")


def test_random_per_class_takes_the_counts_without_ranking():
    y = np.array([0] * 10 + [1] * 10)
    x = np.arange(20)[:, None, None, None].repeat(2, 1).astype(np.uint8)
    a = controls.random_per_class(x, y, np.array([3, 2]), seed=0)
    assert controls.class_counts(a.y, 2).tolist() == [3, 2]
    assert not np.array_equal(a.x[:3, 0, 0, 0], [0, 1, 2])  # a random draw, not the first (or best) ones
    assert np.array_equal(a.x, controls.random_per_class(x, y, np.array([3, 2]), seed=0).x)


def test_duplicated_and_classically_augmented_real_tiles_match_the_volume():
    splits = make_splits(n=6)
    counts = np.array([7, 2])
    dup = controls.duplicated_real(splits, counts)
    assert controls.class_counts(dup.y, 2).tolist() == [7, 2]
    real0 = {t.tobytes() for t in splits.train_x[splits.train_y == 0]}
    assert all(t.tobytes() in real0 for t in dup.x[dup.y == 0])  # copies, nothing new
    aug = controls.classical_aug(splits, counts, "dihedral", seed=3)
    assert controls.class_counts(aug.y, 2).tolist() == [7, 2] and aug.x.shape == dup.x.shape
    assert not np.array_equal(aug.x, dup.x)
    digits = strong_augment(dup.x, "digits", seed=1)
    assert digits.dtype == np.uint8 and np.array_equal(digits, strong_augment(dup.x, "digits", seed=1))


def test_pseudo_labels_keep_the_most_confident_per_class():
    probs = torch.tensor([[0.95, 0.05], [0.99, 0.01], [0.2, 0.8], [0.05, 0.95], [0.6, 0.4], [0.93, 0.07]])
    idx, labels = controls.most_confident(probs, np.array([2, 1]))
    assert idx.tolist() == [0, 1, 3] and labels.tolist() == [0, 0, 1]


def test_every_arm_takes_the_same_steps_and_the_same_mixing(monkeypatch):
    seen: list[dict] = []
    real_fit = downstream.fit_classifier

    def spy(train_x, train_y, val_x, val_y, **kw):
        seen.append({"steps": kw["steps"], "n_real": len(train_x), "n_extra": len(kw.get("extra_x", [])),
                     "fraction": kw.get("extra_fraction"), "batch": kw["batch_size"]})
        return real_fit(train_x, train_y, val_x, val_y, **kw)

    monkeypatch.setattr(downstream, "fit_classifier", spy)
    splits = make_splits(n=6)
    recipe = RECIPE.model_copy(update={"steps": 4, "synthetic_fraction": 0.25})
    counts = np.array([3, 3])
    syn = Extra(make_splits(seed=9, n=6).train_x, make_splits(seed=9, n=6).train_y)
    pool = make_splits(seed=4, n=12).train_x
    arms = {"augmented": syn, "duplicated_real": controls.duplicated_real(splits, counts),
            "classical_aug": controls.classical_aug(splits, counts, "none", seed=0),
            "pseudo_label": controls.pseudo_label(pool, recipe, counts, 2),
            "empty": Extra(syn.x[:0], syn.y[:0])}
    outcomes, states = evaluate_arms(splits, arms, recipe, seeds=[0, 1])
    assert sorted(states) == [0, 1]
    assert {s["steps"] for s in seen} == {4} and {s["n_real"] for s in seen} == {6}
    assert {s["fraction"] for s in seen if s["n_extra"]} == {0.25}
    assert sorted(s["n_extra"] for s in seen) == [0, 0, 6, 6, 6, 6, 6, 6, 6, 6]
    by_arm = {(o.arm, o.seed): o for o in outcomes}
    assert by_arm[("pseudo_label", 1)].num_synthetic == 6
    # An arm whose selector accepted nothing is the baseline, not a second training of it.
    assert by_arm[("empty", 0)].test == by_arm[("baseline", 0)].test and by_arm[("empty", 0)].num_synthetic == 0


def test_mixed_batches_swap_rows_within_their_class_so_the_class_mix_is_the_real_one():
    from histodiff.train.backbone import extra_share, mixed_batches

    gen = torch.Generator().manual_seed(0)
    real_y = torch.tensor([0] * 50 + [1] * 50)
    # A skewed extra set: 200 tiles of class 0, none of class 1 (what a selector that fills one quota makes).
    extra_y = torch.zeros(200, dtype=torch.long)
    batches = mixed_batches(real_y, extra_y, batch_size=20, extra_fraction=0.5, generator=gen)
    classes, swapped, rows = torch.zeros(2), 0, 0
    for _ in range(200):
        real, extra = next(batches)
        assert len(real) + len(extra) == 20 and (extra_y[extra] == 0).all()
        classes += torch.bincount(torch.cat([real_y[real], extra_y[extra]]), minlength=2)
        swapped, rows = swapped + len(extra), rows + 20
    assert abs(classes[0] / classes.sum() - 0.5) < 0.01  # the real class mix, not the extra set's
    assert abs(swapped / rows - 0.25) < 0.02 and extra_share(real_y, extra_y, 0.5) == 0.25
    # Every extra tile of a class is used before any repeats.
    fresh = mixed_batches(real_y, extra_y, batch_size=20, extra_fraction=0.5, generator=gen)
    seen = torch.cat([next(fresh)[1] for _ in range(100)])
    assert len(seen) >= 200 and len(torch.unique(seen[:200])) == 200
    real, extra = next(mixed_batches(torch.tensor([0, 1, 0, 1, 0]), torch.zeros(0, dtype=torch.long), batch_size=8,
                                     extra_fraction=0.5, generator=gen))
    assert len(real) == 5 and len(extra) == 0  # no extra tiles: every row real (a set smaller than a batch)


