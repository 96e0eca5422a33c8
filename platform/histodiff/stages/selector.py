"""Stage ``selector``: the auxiliary pixel classifier that judges synthetic tiles (the selective mechanism).

It trains a timm classifier on the labeled train split (validation-selected, with the
downstream classifier's label-safe augmentation: on a few labels per class an unaugmented
selector overfits), stores class centroids of its features, and exports both. ``synthesize``
and the sweep only load it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch

from histodiff.augment.selection import export_selector, train_selector
from histodiff.config import HistodiffConfig
from histodiff.data.shards import to_model_range
from histodiff.data.splits import SplitSpec, labeled_splits, split_spec
from histodiff.runner import Context, Spec as StageSpec, StageResult
from histodiff.runtime import device_for
from histodiff.storage import Store

log = logging.getLogger(__name__)

VERSION = 1
MODELS = {"selector": "selector_uri"}


class Spec(StageSpec):
    """The selector's recipe and the labeled split it learns from."""

    backbone: str
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    augment: Literal["dihedral", "shift", "none"]
    seed: int
    split: SplitSpec


@dataclass
class Result(StageResult):
    """Where the selector went, its hash, its classes and its validation balanced accuracy."""

    selector_uri: str
    sha256: str
    classes: list[str]
    val_balanced_accuracy: float


def spec(cfg: HistodiffConfig, store: Store) -> Spec:
    """Return the selector spec (``synthesis.selector.*``; weight decay and augmentation of ``evaluation``)."""
    sel = cfg.synthesis.selector
    return Spec(output_uri=cfg.paths.selector, backbone=sel.backbone, epochs=sel.epochs, lr=sel.lr,
                weight_decay=cfg.evaluation.weight_decay, batch_size=sel.batch_size, augment=cfg.evaluation.augment,
                seed=cfg.seed, split=split_spec(cfg, store))


def work(spec: Spec, ctx: Context) -> Result:
    """Train the selector on the labeled train split, select it on validation, export it."""
    splits = labeled_splits(spec.split, ctx.store)
    (tx, ty, classes), (vx, vy, _) = splits["train"], splits["val"]
    selector, val_bacc = train_selector(
        to_model_range(tx), torch.from_numpy(ty), to_model_range(vx), torch.from_numpy(vy), classes,
        backbone=spec.backbone, epochs=spec.epochs, lr=spec.lr, weight_decay=spec.weight_decay,
        batch_size=spec.batch_size, augment=spec.augment, seed=spec.seed, device=device_for(ctx.ray.use_gpu))
    sha = export_selector(selector, spec.output_uri, {"val_balanced_accuracy": val_bacc}, ctx.store)
    ctx.tracker.log_metrics({"val_balanced_accuracy": val_bacc})
    return Result(spec.output_uri, sha, list(classes), val_bacc)
