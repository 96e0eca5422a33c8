"""Cheap baselines: use the same unlabeled pool and the same labels, but generate nothing.

Synthetic augmentation has to beat what a user would try first (METHOD.md):
``latent_knn`` / ``latent_linear``: kNN and a linear probe on frozen features (the autoencoder's
posterior mean, or any other feature map), flattened and standardised, fit on the labeled train
split; the probe's weight decay is chosen on validation. Pseudo-labeling the pool is a control
arm of the downstream protocol (:mod:`histodiff.evaluate.controls`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from histodiff.evaluate.downstream import Splits, _tensors
from histodiff.evaluate.metrics import classification_metrics

log = logging.getLogger(__name__)


@torch.no_grad()
def autoencoder_features(autoencoder: Any, tiles: np.ndarray, batch_size: int = 128) -> torch.Tensor:
    """Return flattened posterior-mean latents of a diffusers AutoencoderKL for uint8 NHWC tiles."""
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    out = [autoencoder.encode(_tensors(tiles[i : i + batch_size]).to(device)).latent_dist.mean.flatten(1).float().cpu()
           for i in range(0, len(tiles), batch_size)]
    return torch.cat(out)


def standardise(train_f: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Return features centred and scaled with the train split's statistics."""
    mean = train_f.mean(0, keepdim=True)
    std = train_f.std(0, keepdim=True).clamp_min(1e-6) if len(train_f) > 1 else torch.ones_like(mean)
    return [(f - mean) / std for f in (train_f, *others)]


def knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, query_f: torch.Tensor, k: int, num_classes: int
                ) -> torch.Tensor:
    """Return the class of each query by a distance-weighted vote of its k nearest train rows."""
    k = min(k, len(train_f))
    d = torch.cdist(query_f.double(), train_f.double())
    dist, idx = d.topk(k, dim=1, largest=False)
    votes = torch.zeros(len(query_f), num_classes, dtype=torch.float64)
    votes.scatter_add_(1, train_y[idx].long(), 1.0 / (dist + 1e-8))
    return votes.argmax(1)


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, seed: int, weight_decays: tuple[float, ...] = (1e-4, 1e-2, 1e-1, 1.0),
                 steps: int = 300) -> torch.nn.Linear:
    """Return a multinomial logistic regression (full-batch Adam) whose weight decay wins on validation."""
    best: tuple[float, torch.nn.Linear | None] = (-1.0, None)
    for wd in weight_decays:
        torch.manual_seed(seed)
        head = torch.nn.Linear(train_f.shape[1], num_classes)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = F.cross_entropy(head(train_f), train_y) + wd * head.weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = float((head(val_f).argmax(1) == val_y).float().mean())
        if acc > best[0]:
            best = (acc, head)
    return best[1]


def probe_baselines(splits: Splits, encode: Callable[[np.ndarray], torch.Tensor], k: int, seeds: list[int]
                    ) -> dict[str, list[dict[str, Any]]]:
    """Return test metrics of the latent kNN (once; it has no seed) and the linear probe (per seed)."""
    c = len(splits.classes)
    tr, va, te = standardise(encode(splits.train_x), encode(splits.val_x), encode(splits.test_x))
    ty, vy, sy = (torch.from_numpy(a.astype(np.int64)) for a in (splits.train_y, splits.val_y, splits.test_y))
    out = {"latent_knn": [classification_metrics(knn_predict(tr, ty, te, k, c), sy, c)], "latent_linear": []}
    for seed in seeds:
        head = linear_probe(tr, ty, va, vy, c, seed)
        with torch.no_grad():
            out["latent_linear"].append(classification_metrics(head(te).argmax(1), sy, c))
    return out
