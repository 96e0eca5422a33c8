"""Supervised training of a timm classifier on in-memory tiles, selected on validation only.

Plain PyTorch: the same function runs inside a Ray Train worker, a Ray task or a script.
Images are float tensors in [-1, 1], NCHW. The test split never enters this module: model
selection sees only ``val_x`` / ``val_y``.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from histodiff.models.backbone import create_backbone
from histodiff.runtime import autocast

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """A trained classifier (best validation weights) and its training history."""

    model: nn.Module
    best_epoch: int
    best_val_balanced_accuracy: float
    history: list[dict] = field(default_factory=list)


def label_safe_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Return a batch with random flips and 90-degree rotations (label-safe for tissue)."""
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    k = torch.randint(0, 4, (n,), generator=generator)
    out = x.clone()
    for r in range(1, 4):
        sel = (k == r).to(x.device)
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
    return out


def shift_augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Return a batch randomly translated by up to ``max_shift`` pixels (edge-replicated; safe for digits)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


# Label-safe augmentations by name: flips/rotations suit tissue, not digits (6 vs 9).
AUGMENTATIONS = {"dihedral": label_safe_augment, "shift": shift_augment}


def resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Return images resized to ``image_size`` (bilinear), or unchanged when already that size."""
    if x.shape[-1] == image_size and x.shape[-2] == image_size:
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)


def balanced_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Return the mean per-class recall over classes present in ``target``."""
    from torchmetrics.functional.classification import multiclass_accuracy

    return float(multiclass_accuracy(pred, target, num_classes=num_classes, average="macro"))


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, image_size: int, batch_size: int = 128,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Return softmax probabilities for images in [-1, 1] (NCHW), on the CPU."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = resize(x[i : i + batch_size].to(device), image_size)
        with autocast(torch.device(device)):
            out.append(model(xb).float().softmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def soft_targets(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Return (N, K) class-probability targets: one-hot for int labels, unchanged for probabilities."""
    return F.one_hot(y.long(), num_classes).float() if y.ndim == 1 else y.float()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
               wb: torch.Tensor) -> float:
    """Run one optimizer step of the sample-weighted cross-entropy (bf16 autocast on CUDA); return the loss.

    ``yb`` holds int labels (N,) or class probabilities (N, K) (soft labels for synthetic tiles).
    """
    with autocast(xb.device):
        logits = model(xb)
    logp = F.log_softmax(logits.float(), dim=-1)
    per_sample = -(soft_targets(yb, logp.shape[-1]).to(logp.device) * logp).sum(-1)
    loss = (per_sample * wb).sum() / wb.sum().clamp_min(1e-8)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _index_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield full index batches forever, each pass a new permutation (a set smaller than a batch: all of it).

    The rows a pass leaves over come first in a later one by chance: a short last batch would be a
    noisy step, and a batch of one breaks BatchNorm (81 tiles at batch 16 did, in the validation run).
    """
    size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        yield from (perm[i : i + size] for i in range(0, n - size + 1, size))


def class_ids(y: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Return class ids: ``y`` itself for int labels (N,), the argmax for class probabilities (N, K); a tensor for a
    tensor, an array for an array."""
    return y.argmax(-1) if y.ndim == 2 else y


def mixed_batches(real_y: torch.Tensor, extra_y: torch.Tensor, batch_size: int, extra_fraction: float,
                  generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (real indices, extra indices) batches forever, mixed class by class.

    Each batch starts as a batch of real rows; each row is then swapped, with probability
    ``extra_fraction``, for an extra tile of its own class (when that class has any; the extra
    tiles of each class are cycled through in a new order each pass). So the batch's class mix is
    the real split's whatever the per-class counts of the extra set: an extra set with many tiles
    of some classes and none of others changes what a class looks like, never how often it is
    seen. (Filling a fixed half of every batch from the extra set instead shifts the class prior
    towards the classes with extras: an oracle set of true-labeled tiles then cost 5 points of
    balanced accuracy at 19 labels per class, and every control arm read as a loss.)
    """
    real_y, extra_y = class_ids(real_y), class_ids(extra_y)
    real = _index_batches(len(real_y), batch_size, generator)
    extra_gen = torch.Generator().manual_seed(int(generator.initial_seed()) + 1)
    by_class = {int(c): torch.nonzero(extra_y == c).flatten() for c in torch.unique(extra_y)}
    cycles = {c: _index_batches(len(idx), 1, extra_gen) for c, idx in by_class.items()}
    empty = torch.zeros(0, dtype=torch.long)
    while True:
        rows = next(real)
        if not by_class or extra_fraction <= 0:
            yield rows, empty
            continue
        swap = torch.rand(len(rows), generator=extra_gen) < extra_fraction
        keep, extra = [], []
        for row, s in zip(rows.tolist(), swap.tolist()):
            c = int(real_y[row])
            if s and c in by_class:
                extra.append(int(by_class[c][next(cycles[c])[0]]))
            else:
                keep.append(row)
        yield torch.tensor(keep, dtype=torch.long), torch.tensor(extra, dtype=torch.long)


def extra_share(real_y: torch.Tensor, extra_y: torch.Tensor, extra_fraction: float) -> float:
    """Return the expected share of a batch's rows that :func:`mixed_batches` takes from the extra set."""
    if not len(extra_y):
        return 0.0
    real_y, extra_y = class_ids(real_y), class_ids(extra_y)
    return extra_fraction * float(torch.isin(real_y, torch.unique(extra_y)).float().mean())


def classifier_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """Return the downstream classifier's optimizer: AdamW, fused (one kernel per step on CPU and CUDA)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def fit_classifier(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    backbone: str,
    num_classes: int,
    image_size: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    augment: bool | str = True,
    steps: int | None = None,
    extra_x: torch.Tensor | None = None,
    extra_y: torch.Tensor | None = None,
    extra_weight: torch.Tensor | None = None,
    extra_fraction: float = 0.5,
) -> FitResult:
    """Train a timm classifier; return the weights with the best validation balanced accuracy.

    ``steps=None`` trains ``epochs`` passes over ``train_x``. With ``steps``, training takes
    exactly that many optimizer steps whatever the size of the sets, and ``epochs`` is the number
    of evenly spaced validation rounds: arms with more tiles get no more training than others.
    ``extra_x`` / ``extra_y`` (int labels or (N, K) soft labels) / ``extra_weight`` are extra
    training tiles (synthetic, pseudo-labeled, ...): each real row of a batch is swapped for an extra
    tile of its class with probability ``extra_fraction`` (:func:`mixed_batches`).
    """
    if len(train_x) == 0:
        raise ValueError("no training tiles")
    if len(val_x) == 0:
        raise ValueError("no validation tiles: model selection needs a validation split")
    mode = "dihedral" if augment is True else (augment or "none")
    if mode != "none" and mode not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of {sorted(AUGMENTATIONS)} or 'none'")
    if steps is not None and steps < epochs:
        raise ValueError(f"steps={steps} must be at least epochs={epochs} (the number of validation rounds)")
    if len(train_x) < 2:
        raise ValueError(f"{len(train_x)} training tile(s): BatchNorm needs at least 2 per batch")
    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = create_backbone(backbone, num_classes, image_size).to(device)
    opt = classifier_optimizer(model, lr, weight_decay)
    n_extra = 0 if extra_x is None else len(extra_x)
    extra_ids = extra_y if n_extra else torch.zeros(0, dtype=torch.long)
    batches = mixed_batches(train_y, extra_ids, batch_size, extra_fraction, gen)
    real_rows = batch_size * (1 - extra_share(train_y, extra_ids, extra_fraction))
    passes = max(1, int(len(train_x) // max(1.0, real_rows)))
    rounds = [passes] * epochs if steps is None else [steps // epochs + (r < steps % epochs) for r in range(epochs)]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=sum(rounds), pct_start=0.15)
    real_y = soft_targets(train_y, num_classes)
    if n_extra:
        extra_soft = soft_targets(extra_y, num_classes)
        extra_w = extra_weight if extra_weight is not None else torch.ones(n_extra)
    best = (-1.0, -1, None)
    history = []
    step = 0
    for epoch, round_steps in enumerate(rounds):
        model.train()
        total, seen = 0.0, 0
        for real_idx, extra_idx in itertools.islice(batches, round_steps):
            xb, yb, wb = train_x[real_idx], real_y[real_idx], torch.ones(len(real_idx))
            if len(extra_idx):
                xb = torch.cat([xb, extra_x[extra_idx]])
                yb = torch.cat([yb, extra_soft[extra_idx]])
                wb = torch.cat([wb, extra_w[extra_idx]])
            if mode != "none":
                xb = AUGMENTATIONS[mode](xb, gen)
            loss = train_step(model, opt, resize(xb.to(device), image_size), yb.to(device), wb.to(device))
            sched.step()
            total += loss * len(yb)
            seen += len(yb)
            step += 1
        val_pred = predict_proba(model, val_x, image_size, device=device).argmax(-1)
        val_bacc = balanced_accuracy(val_pred, val_y, num_classes)
        history.append({"epoch": epoch, "step": step, "train_loss": total / seen, "val_balanced_accuracy": val_bacc})
        if val_bacc > best[0]:
            best = (val_bacc, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    return FitResult(model=model, best_epoch=best[1], best_val_balanced_accuracy=best[0], history=history)
