"""Labeled splits: stratified train / validation / test with a label budget, from a fixed seed.

:func:`labeled_splits` is the one place every later stage gets its labeled data from, so
that the classifier, the selector and the downstream evaluation all see the same split.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from pydantic import BaseModel, ConfigDict

from histodiff.config import HistodiffConfig
from histodiff.data import shards
from histodiff.storage import Store, join

log = logging.getLogger(__name__)


def split_labeled(labels: Sequence[str | int], seed: int, val_fraction: float, test_fraction: float,
                  label_fraction: float | None = None, labels_per_class: int | None = None,
                  draw: int = 0) -> dict[str, np.ndarray]:
    """Return sorted index arrays ``train``, ``val``, ``test``, stratified per class.

    Per class (in sorted class order, one seeded generator), the indices are permuted once;
    the first ``round(test_fraction * n)`` go to test, the next ``round(val_fraction * n)``
    to validation, and the train budget is drawn from the front of the rest: all of it, a
    ``label_fraction`` of it, or ``labels_per_class``. So val/test do not depend on the budget
    or the draw, and within one draw a smaller budget's train set is a subset of a larger one's.
    ``draw`` > 0 reorders the rest with its own generator first: another labeled draw from the
    same pool, with the same validation and test tiles. Every class keeps at least one train tile.
    """
    if label_fraction is not None and labels_per_class is not None:
        raise ValueError("set at most one of label_fraction and labels_per_class")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) "
                         "and sum to less than 1")
    labels = np.asarray(list(labels), dtype=object)
    rng = np.random.default_rng(seed)
    draw_rng = np.random.default_rng([seed, draw])
    out: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for cls in sorted(set(labels.tolist()), key=str):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n = len(idx)
        n_test = min(int(round(test_fraction * n)), n - 1)
        n_val = min(int(round(val_fraction * n)), n - 1 - n_test)
        pool = idx[n_test + n_val :]
        if draw:
            pool = draw_rng.permutation(pool)
        if label_fraction is not None:
            budget = max(1, int(round(label_fraction * len(pool))))
        elif labels_per_class is not None:
            budget = labels_per_class
        else:
            budget = len(pool)
        out["test"].append(idx[:n_test])
        out["val"].append(idx[n_test : n_test + n_val])
        out["train"].append(pool[:budget])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, np.int64) for k, v in out.items()}


def _ids(labels: list[str | None], classes: list[str], uri: str) -> np.ndarray:
    unknown = sorted({str(lab) for lab in labels if lab not in classes})
    if unknown:
        raise ValueError(f"tiles at {uri!r} carry labels {unknown} outside the training classes {classes}; "
                         "ingest train and test with the same class folders")
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[lab] for lab in labels], dtype=np.int64)


class SplitSpec(BaseModel):
    """Which labeled tiles a stage sees: the shards (with their fingerprints) and the split settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    labeled_uri: str
    labeled_fingerprint: str
    test_uri: str | None
    test_fingerprint: str | None
    seed: int
    draw: int = 0
    val_fraction: float
    test_fraction: float
    label_fraction: float | None
    labels_per_class: int | None


def split_spec(cfg: HistodiffConfig, store: Store) -> SplitSpec:
    """Return the labeled split named by the config, with the fingerprints of its shards (read here)."""
    data, paths = cfg.data, cfg.paths
    labeled = shards.read_manifest(paths.labeled_shards, store)
    test_uri = paths.labeled_test_shards
    test = shards.read_manifest(test_uri, store) if test_uri and store.exists(join(test_uri, shards.MANIFEST)) \
        else None
    return SplitSpec(labeled_uri=paths.labeled_shards, labeled_fingerprint=labeled.fingerprint or str(labeled.num_tiles),
                     test_uri=test_uri if test else None,
                     test_fingerprint=(test.fingerprint or str(test.num_tiles)) if test else None,
                     seed=cfg.seed, draw=data.label_draw, val_fraction=data.val_fraction,
                     test_fraction=data.test_fraction, label_fraction=data.label_fraction,
                     labels_per_class=data.labels_per_class)


def labeled_splits(spec: SplitSpec, store: Store) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Return ``{"train" | "val" | "test": (uint8 NHWC tiles, int64 label ids, class names)}``.

    Train and val come from the labeled shards (the label budget applies to train only). Test
    comes from the labeled test shards when the spec names them, else from a ``test_fraction``
    split of the labeled shards. Class ids index the sorted class names of the labeled shards.
    """
    uri = spec.labeled_uri
    tiles, labels = shards.load_tiles(uri, store)
    classes = shards.read_manifest(uri, store).classes or sorted({str(x) for x in labels if x is not None})
    if not classes:
        raise ValueError(f"tile shards at {uri!r} are unlabeled; ingest a one-folder-per-class source "
                         "as paths.labeled_source")
    ids = _ids(labels, classes, uri)
    has_test = spec.test_uri is not None
    idx = split_labeled(ids, spec.seed, spec.val_fraction, 0.0 if has_test else spec.test_fraction,
                        spec.label_fraction, spec.labels_per_class, spec.draw)
    out = {k: (tiles[v], ids[v], list(classes)) for k, v in idx.items()}
    if has_test:
        test_tiles, test_labels = shards.load_tiles(spec.test_uri, store)
        out["test"] = (test_tiles, _ids(test_labels, classes, spec.test_uri), list(classes))
    log.info("labeled splits from %s: train %d, val %d, test %d (%s)", uri, len(out["train"][1]),
             len(out["val"][1]), len(out["test"][1]), "test shards" if has_test else "test_fraction split")
    return out
