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

import numpy as np
import torch

from histodiff.augment.selection import export_selector, train_selector
from histodiff.config import HistodiffConfig
from histodiff.data.shards import decode_png, read_table, to_model_range
from histodiff.data.splits import SplitSpec, labeled_splits, split_spec
from histodiff.runner import Context, Spec as StageSpec, StageResult
from histodiff.stages.pseudolabel import PseudoLabelsRef, load_pseudo_labels, pseudo_labels_ref
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
    pseudo_labels: PseudoLabelsRef | None = None
    pool_uri: str | None = None


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
    pseudo = pseudo_labels_ref(cfg, store, "selector")
    return Spec(output_uri=cfg.paths.selector, backbone=sel.backbone, epochs=sel.epochs, lr=sel.lr,
                weight_decay=cfg.evaluation.weight_decay, batch_size=sel.batch_size, augment=cfg.evaluation.augment,
                seed=cfg.seed, split=split_spec(cfg, store), pseudo_labels=pseudo,
                pool_uri=cfg.paths.unlabeled_shards if pseudo else None)


def pseudo_labeled_tiles(spec: Spec, store: Store, classes: list[str]) -> tuple | None:
    """Return (tiles in [-1, 1], label ids, confidences) of the pseudo-labeled pool tiles, or None."""
    pseudo = load_pseudo_labels(spec.pseudo_labels, store, classes)
    if pseudo is None:
        return None
    table = read_table(spec.pool_uri, store, columns=["image", "sha1"])
    row = {s: i for i, s in enumerate(table.column("sha1").to_pylist())}
    images = table.column("image")
    tiles = np.stack([decode_png(images[row[s]].as_py()) for s in pseudo["sha1"]]) if pseudo["sha1"] else \
        np.zeros((0, 1, 1, 3), np.uint8)
    return (to_model_range(tiles), torch.tensor(pseudo["label_ids"], dtype=torch.long),
            torch.tensor(pseudo["confidence"], dtype=torch.float32))


def work(spec: Spec, ctx: Context) -> Result:
    """Train the selector on the labeled train split, select it on validation, export it."""
    splits = labeled_splits(spec.split, ctx.store)
    (tx, ty, classes), (vx, vy, _) = splits["train"], splits["val"]
    selector, val_bacc = train_selector(
        to_model_range(tx), torch.from_numpy(ty), to_model_range(vx), torch.from_numpy(vy), classes,
        backbone=spec.backbone, epochs=spec.epochs, lr=spec.lr, weight_decay=spec.weight_decay,
        batch_size=spec.batch_size, augment=spec.augment, seed=spec.seed, device=device_for(ctx.ray.use_gpu),
        extra=pseudo_labeled_tiles(spec, ctx.store, list(classes)))
    sha = export_selector(selector, spec.output_uri, {"val_balanced_accuracy": val_bacc}, ctx.store)
    ctx.tracker.log_metrics({"val_balanced_accuracy": val_bacc})
    return Result(spec.output_uri, sha, list(classes), val_bacc)
