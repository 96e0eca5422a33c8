"""Control arms: extra training tiles that isolate what the synthetic tiles add (issue 14).

Every control gets the same per-class volume as the arm under test (``counts[c]`` tiles of class
``c``), and then the same mixing (each real row swapped for an extra tile of its class with
probability ``synthetic_fraction``) and the same optimizer steps in training, so a difference in accuracy is the difference in *what* the extra tiles are:
- ``unfiltered``: a random subset of every generated tile (no selector, no ranking);
- ``unguided_selected``: guidance scale 0, then the same selection (bench/validation builds it);
- ``duplicated_real``: the real tiles repeated (is it just more steps on real data?);
- ``classical_aug``: the real tiles, strongly augmented (affine + elastic, or HED/colour jitter);
- ``pseudo_label``: pool tiles labeled by each seed's baseline, the most confident per class;
- ``oracle``: pool tiles with their true labels (the ceiling; never shown to the method).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from histodiff.augment.classical import kind_for, strong_augment
from histodiff.evaluate.downstream import Extra, Recipe, Splits, _tensors
from histodiff.train.backbone import class_ids

CONTROLS = ("unfiltered", "unguided_selected", "duplicated_real", "classical_aug", "pseudo_label", "oracle")


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Return the number of items per class id (hard labels, or the argmax of soft ones)."""
    return np.bincount(class_ids(labels).astype(np.int64), minlength=num_classes)


def random_per_class(x: np.ndarray, y: np.ndarray, counts: np.ndarray, seed: int) -> Extra:
    """Return ``counts[c]`` tiles of each class ``c`` drawn at random (no ranking) from (x, y) with ``seed``."""
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(y == c))[:n] for c, n in enumerate(counts)]
    idx = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    return Extra(x[idx], y[idx].astype(np.int64))


def _repeat_real(splits: Splits, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the real train tiles of each class cycled to ``counts[c]`` tiles (class ids alongside)."""
    xs, ys = [], []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(splits.train_y == c)
        if n and len(idx):
            take = np.resize(idx, n)
            xs.append(splits.train_x[take])
            ys.append(np.full(n, c, np.int64))
    if not xs:
        return np.zeros((0, *splits.train_x.shape[1:]), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def duplicated_real(splits: Splits, counts: np.ndarray) -> Extra:
    """Return the real tiles repeated to the volume (the same batches' share, nothing new in them)."""
    return Extra(*_repeat_real(splits, counts))


def classical_aug(splits: Splits, counts: np.ndarray, augment: str, seed: int) -> Extra:
    """Return the real tiles repeated to the volume, each copy strongly augmented (a fixed, seeded set)."""
    x, y = _repeat_real(splits, counts)
    return Extra(strong_augment(x, kind_for(augment), seed), y)


def most_confident(probs: torch.Tensor, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (indices, predicted ids): per predicted class ``c``, its ``counts[c]`` most confident rows."""
    conf, label = probs.max(1)
    picked = []
    for c, n in enumerate(counts):
        idx = torch.nonzero(label == c).flatten()
        picked.append(idx[conf[idx].argsort(descending=True)[:n]])
    idx = torch.cat(picked).sort().values if picked else torch.zeros(0, dtype=torch.long)
    return idx.numpy(), label[idx].numpy().astype(np.int64)


def baseline_proba(recipe: Recipe, num_classes: int, baseline_state: dict, tiles: np.ndarray) -> torch.Tensor:
    """Return the class probabilities a seed's baseline (its weights ``baseline_state``) gives ``tiles``."""
    from histodiff.models.backbone import create_backbone
    from histodiff.runtime import device_for
    from histodiff.train.backbone import predict_proba

    device = device_for(recipe.use_gpu)
    model = create_backbone(recipe.backbone, num_classes, recipe.image_size)
    model.load_state_dict(baseline_state)
    return predict_proba(model.to(device), _tensors(tiles), recipe.image_size, device=device)


def pseudo_label(pool_x: np.ndarray, recipe: Recipe, counts: np.ndarray,
                 num_classes: int) -> Callable[[int, dict], Extra]:
    """Return the arm builder: each seed's baseline labels the pool; the most confident per class are kept."""
    def build(seed: int, baseline_state: dict) -> Extra:
        idx, labels = most_confident(baseline_proba(recipe, num_classes, baseline_state, pool_x), counts)
        return Extra(pool_x[idx], labels)

    return build
