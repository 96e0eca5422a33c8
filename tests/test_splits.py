"""Stratified splits with a label budget, and labeled_splits over real shard directories."""

from __future__ import annotations

import numpy as np
import pytest

from histodiff.config import load_config
from histodiff.data import shards
from histodiff.data.splits import labeled_splits, split_labeled, split_spec
from histodiff.storage import Store

LABELS = ["a"] * 50 + ["b"] * 30 + ["c"] * 20


def _per_class(idx: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(np.asarray(LABELS)[idx], return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def test_stratified_fractions_are_disjoint_and_cover_everything():
    s = split_labeled(LABELS, seed=0, val_fraction=0.2, test_fraction=0.1)
    assert _per_class(s["test"]) == {"a": 5, "b": 3, "c": 2}
    assert _per_class(s["val"]) == {"a": 10, "b": 6, "c": 4}
    assert _per_class(s["train"]) == {"a": 35, "b": 21, "c": 14}
    together = np.concatenate([s["train"], s["val"], s["test"]])
    assert len(np.unique(together)) == len(together) == 100


def test_same_seed_same_split_other_seed_other_split():
    a = split_labeled(LABELS, seed=3, val_fraction=0.2, test_fraction=0.2)
    b = split_labeled(LABELS, seed=3, val_fraction=0.2, test_fraction=0.2)
    c = split_labeled(LABELS, seed=4, val_fraction=0.2, test_fraction=0.2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def test_label_budgets_shrink_train_only_and_nest():
    full = split_labeled(LABELS, seed=1, val_fraction=0.2, test_fraction=0.2)
    per5 = split_labeled(LABELS, seed=1, val_fraction=0.2, test_fraction=0.2, labels_per_class=5)
    per2 = split_labeled(LABELS, seed=1, val_fraction=0.2, test_fraction=0.2, labels_per_class=2)
    frac = split_labeled(LABELS, seed=1, val_fraction=0.2, test_fraction=0.2, label_fraction=0.05)
    assert _per_class(per5["train"]) == {"a": 5, "b": 5, "c": 5}
    assert _per_class(frac["train"]) == {"a": 2, "b": 1, "c": 1}  # 5% of 30/18/12, at least one
    assert set(per2["train"]) <= set(per5["train"]) <= set(full["train"])
    for budget in (per5, per2, frac):
        assert np.array_equal(budget["val"], full["val"]) and np.array_equal(budget["test"], full["test"])
    huge = split_labeled(LABELS, seed=1, val_fraction=0.2, test_fraction=0.2, labels_per_class=1000)
    assert np.array_equal(huge["train"], full["train"])


def test_tiny_classes_keep_a_train_tile_and_bad_arguments_fail():
    s = split_labeled(["x", "y", "y"], seed=0, val_fraction=0.4, test_fraction=0.4)
    assert sorted(np.asarray(["x", "y", "y"])[s["train"]].tolist()).count("x") == 1
    with pytest.raises(ValueError, match="at most one"):
        split_labeled(LABELS, 0, 0.2, 0.2, label_fraction=0.1, labels_per_class=3)
    with pytest.raises(ValueError, match="sum to less than 1"):
        split_labeled(LABELS, 0, 0.6, 0.5)


def _write(uri: str, labels: list[str], offset: int) -> None:
    tiles = [np.full((8, 8, 3), offset + i, np.uint8) for i in range(len(labels))]
    table = shards.tiles_table(tiles, labels, "t", [f"t{offset + i}" for i in range(len(labels))])
    shards.write_table(table, f"{uri}/part-00000.parquet", Store())
    shards.write_manifest(shards.Manifest(uri=uri, shards=["part-00000.parquet"], num_tiles=len(labels),
                                          classes=sorted(set(labels)), tile_size=8), Store())


def test_labeled_splits_uses_test_shards_when_present(tmp_path):
    root = str(tmp_path)
    _write(f"{root}/shards/labeled", ["TUM"] * 10 + ["STR"] * 10, 0)
    cfg = load_config("tiny", [f"paths.root={root}", "data.labels_per_class=3", "data.val_fraction=0.2",
                               "data.test_fraction=0.2"])
    no_test = labeled_splits(split_spec(cfg, Store()), Store())
    assert {k: len(v[1]) for k, v in no_test.items()} == {"train": 6, "val": 4, "test": 4}
    tiles, ids, classes = no_test["train"]
    assert classes == ["STR", "TUM"] and tiles.shape == (6, 8, 8, 3) and tiles.dtype == np.uint8
    assert np.bincount(ids).tolist() == [3, 3]
    # tile i of the source has every pixel == i, and the first ten are TUM (id 1)
    assert all((i < 10) == (label == 1) for i, label in zip(tiles[:, 0, 0, 0], ids))

    _write(f"{root}/shards/labeled_test", ["STR"] * 3 + ["TUM"] * 2, 100)
    with_test = labeled_splits(split_spec(cfg, Store()), Store())
    test_tiles, test_ids, _ = with_test["test"]
    assert test_tiles[:, 0, 0, 0].tolist() == [100, 101, 102, 103, 104] and test_ids.tolist() == [0, 0, 0, 1, 1]
    assert len(with_test["val"][1]) == 4 and len(with_test["train"][1]) == 6  # no test carved out anymore

    _write(f"{root}/shards/labeled_test", ["MUC"], 200)
    with pytest.raises(ValueError, match=r"labels \['MUC'\] outside the training classes"):
        labeled_splits(split_spec(cfg, Store()), Store())
    with pytest.raises(FileNotFoundError, match="run `histodiff run ingest` first"):
        split_spec(load_config("tiny", [f"paths.root={root}/elsewhere"]), Store())
