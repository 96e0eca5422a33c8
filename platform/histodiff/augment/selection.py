"""The selective mechanism: an auxiliary pixel classifier (the selector) judges each synthetic tile.

Two rules (METHOD.md "selection"), and ``none`` (keep everything: the unfiltered control):
- ``confidence``: keep a tile when argmax == target and p(target) >= tau (tau is swept);
- ``centroid``: the reference code's rule: keep a tile when its nearest class centroid in the
  selector's L2-normalised pre-logit space is the target class; rank kept tiles by distance.
The rules are pure tensor functions; :func:`train_selector` trains the selector with the shared
timm trainer (:func:`histodiff.train.backbone.fit_classifier`); the ``selector`` stage
(:mod:`histodiff.stages.selector`) runs it and exports it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from histodiff.models.backbone import create_backbone, embed
from histodiff.storage import Store, join, sha256_bytes
from histodiff.train.backbone import fit_classifier, resize

log = logging.getLogger(__name__)

SELECTOR_META = "histodiff.json"
SELECTOR_WEIGHTS = "selector.safetensors"


def confidence_rule(probs: torch.Tensor, target: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (accepted bool (N,), score = p(target) (N,)) for the confidence rule."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"selection threshold must lie in [0, 1], got {threshold}")
    target = target.to(probs.device).long()
    score = probs.gather(1, target[:, None])[:, 0]
    accepted = (probs.argmax(-1) == target) & (score >= threshold)
    return accepted, score


def class_centroids(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return (K, D) unit-norm class centroids of L2-normalised features."""
    feats = F.normalize(features.float(), dim=-1)
    out = torch.zeros(num_classes, feats.shape[1])
    for k in range(num_classes):
        sel = labels == k
        if not sel.any():
            raise ValueError(f"class index {k} has no tiles to form a centroid; every class needs labeled tiles")
        out[k] = feats[sel].mean(0)
    return F.normalize(out, dim=-1)


def centroid_rule(features: torch.Tensor, target: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (accepted bool (N,), score = cosine similarity to the target centroid (N,)).

    On unit vectors, |f - c|^2 = 2 - 2 cos(f, c): the nearest centroid is the most similar one,
    and ranking by similarity is ranking by distance.
    """
    sims = F.normalize(features.float(), dim=-1) @ centroids.float().T
    target = target.long()
    score = sims.gather(1, target[:, None])[:, 0]
    return sims.argmax(-1) == target, score


def cap_by_score(accepted: torch.Tensor, score: torch.Tensor, cap: int | None) -> torch.Tensor:
    """Return ``accepted`` limited to the ``cap`` highest-scoring accepted entries (ties: earliest first)."""
    if cap is None or int(accepted.sum()) <= cap:
        return accepted.clone()
    idx = torch.nonzero(accepted)[:, 0]
    order = torch.argsort(-score[idx], stable=True)[:cap]
    out = torch.zeros_like(accepted)
    out[idx[order]] = True
    return out


@dataclass
class Selector:
    """A trained selector: timm model, class names, input size, feature centroids, weights hash."""

    model: nn.Module
    classes: list[str]
    image_size: int
    backbone: str
    centroids: torch.Tensor
    sha256: str = ""

    @torch.no_grad()
    def judge(self, images: torch.Tensor, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (softmax probs (N, K), pre-logit features (N, D)) for images in [-1, 1] NCHW."""
        self.model.eval()
        device = next(self.model.parameters()).device
        probs, feats = [], []
        for i in range(0, len(images), batch_size):
            x = resize(images[i : i + batch_size].to(device).float(), self.image_size)
            f = embed(self.model, x)
            probs.append(self.model.get_classifier()(f).float().softmax(-1).cpu())
            feats.append(f.float().cpu())
        return torch.cat(probs), torch.cat(feats)

    def select(self, images: torch.Tensor, target: torch.Tensor, mode: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (passes the rule (N,), score (N,)) for generated images of class ``target``."""
        probs, feats = self.judge(images)
        if mode == "confidence":
            return confidence_rule(probs, target, threshold)
        if mode == "centroid":
            return centroid_rule(feats, target, self.centroids)
        if mode == "none":  # the unfiltered control: keep every tile, still record p(target)
            _, score = confidence_rule(probs, target, 0.0)
            return torch.ones_like(score, dtype=torch.bool), score
        raise ValueError(f"unknown selection mode {mode!r}; choose 'confidence', 'centroid' or 'none'")


def train_selector(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                   classes: list[str], *, backbone: str, epochs: int, lr: float, weight_decay: float,
                   batch_size: int, augment: str, seed: int, device: torch.device | str = "cpu",
                   extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[Selector, float]:
    """Return (selector trained on the labeled train split, validation-selected; its val balanced accuracy).

    ``extra`` = (tiles, label ids, weights) joins training class by class, half of the rows (pseudo-labeled pool tiles).
    """
    image_size = int(train_x.shape[-1])
    more = {} if extra is None or not len(extra[0]) else {
        "extra_x": extra[0], "extra_y": extra[1], "extra_weight": extra[2], "extra_fraction": 0.5}
    fit = fit_classifier(train_x, train_y, val_x, val_y, backbone=backbone, num_classes=len(classes),
                         image_size=image_size, epochs=epochs, lr=lr, weight_decay=weight_decay,
                         batch_size=batch_size, seed=seed, device=device, augment=augment, **more)
    log.info("selector %s: best val balanced accuracy %.3f at epoch %d", backbone, fit.best_val_balanced_accuracy,
             fit.best_epoch)
    selector = Selector(fit.model, list(classes), image_size, backbone, torch.zeros(0))
    _, feats = selector.judge(train_x)
    selector.centroids = class_centroids(feats, train_y, len(classes))
    return selector, fit.best_val_balanced_accuracy


def export_selector(selector: Selector, uri: str, meta: dict[str, Any], store: Store) -> str:
    """Write selector weights (safetensors) and meta (written last) to ``uri``; return the weights' sha256."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, SELECTOR_WEIGHTS)
        tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in selector.model.state_dict().items()}
        tensors["centroids"] = selector.centroids.contiguous()
        save_file(tensors, path)
        data = open(path, "rb").read()
    digest = sha256_bytes(data)
    store.write_bytes(join(uri, SELECTOR_WEIGHTS), data)
    full = {**meta, "kind": "selector", "classes": selector.classes, "image_size": selector.image_size,
            "backbone": selector.backbone, "sha256": digest}
    store.write_json(join(uri, SELECTOR_META), full)
    selector.sha256 = digest
    return digest


def load_selector(uri: str, store: Store, device: torch.device | str = "cpu") -> tuple[Selector, dict]:
    """Return (selector, meta) exported by :func:`export_selector` (safetensors only)."""
    meta_uri = join(uri, SELECTOR_META)
    if not store.exists(meta_uri):
        raise FileNotFoundError(f"no complete selector at {uri!r} (missing {SELECTOR_META}); run "
                                "`histodiff run selector` first")
    meta = store.read_json(meta_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, SELECTOR_WEIGHTS)
        with open(path, "wb") as f:
            f.write(store.read_bytes(join(uri, SELECTOR_WEIGHTS)))
        tensors = load_file(path)
    model = create_backbone(meta["backbone"], len(meta["classes"]), meta["image_size"])
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    model.to(device).eval()
    return Selector(model, meta["classes"], meta["image_size"], meta["backbone"], tensors["centroids"], meta["sha256"]), meta
