"""Downstream evaluation: a timm classifier on real tiles vs real + synthetic tiles, K seeds.

Protocol (METHOD.md, fixing the reference code's test-set selection):
- every arm (``baseline`` = real train split; ``augmented`` = real + class-balanced synthetic,
  ``synthetic_ratio`` x the real count) trains with the same recipe and the same seeds;
- :func:`train_and_score` selects the epoch on the validation split only: the selection
  function (``fit_classifier``) is never handed the test split, which is touched once,
  after selection, to score the chosen model;
- the gain is augmented - baseline paired by seed, with a t-interval (see metrics.py).

Parallelism: one Ray task per (arm, seed). The runs are independent and small (a few
thousand tiles), so spreading 2K whole runs over the cluster's GPUs/CPUs scales better than
DDP inside one run, which would pay gradient all-reduce for a model that fits one device
and would run the arms one after the other.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from histodiff.evaluate.metrics import SCALAR_METRICS, classification_metrics
from histodiff.train.backbone import fit_classifier, predict_proba

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """Labeled tiles (uint8 NHWC) and class ids per split; ``classes[i]`` names id i."""

    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


class Recipe(BaseModel):
    """The training recipe every arm shares (plain data, shipped to workers)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backbone: str
    image_size: int
    epochs: int
    lr: float
    weight_decay: float
    batch_size: int
    augment: Literal["dihedral", "shift", "none"] = "dihedral"
    synthetic_loss_weight: float = 1.0
    use_gpu: bool = False
    steps: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "Recipe":
        """Return the recipe named by ``cfg.evaluation`` (and ``cfg.ray.use_gpu``)."""
        ev = cfg.evaluation
        return cls(backbone=ev.backbone, image_size=ev.image_size, epochs=ev.epochs, lr=ev.lr,
                   weight_decay=ev.weight_decay, batch_size=ev.batch_size, augment=ev.augment,
                   synthetic_loss_weight=ev.synthetic_loss_weight, use_gpu=cfg.ray.use_gpu, steps=ev.steps)


@dataclass
class ArmOutcome:
    """One trained (arm, seed): the validation-selected epoch and its test metrics."""

    arm: str
    seed: int
    best_epoch: int
    val_balanced_accuracy: float
    num_real: int
    num_synthetic: int
    test: dict[str, Any]


def check_labels(name: str, labels: list[str | None], classes: list[str], require_all: bool) -> None:
    """Raise a clear error when tiles carry unknown classes, no label, or (optionally) a class is empty."""
    known = set(classes)
    unknown = sorted({str(c) for c in labels if c not in known})
    if unknown:
        raise ValueError(f"{name}: classes {unknown} are not among the real classes {classes}; "
                         "synthesize with the same class names as the labeled set")
    if require_all:
        counts = {c: 0 for c in classes}
        for c in labels:
            counts[c] += 1
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            raise ValueError(f"{name}: class(es) {empty} have no tiles; every class needs at least one "
                             "(raise the label budget or drop the class)")


def sample_balanced(labels: np.ndarray, total: int, num_classes: int, seed: int) -> np.ndarray:
    """Return indices of about ``total`` items, equal per class, drawn without replacement with ``seed``."""
    rng = np.random.default_rng(seed)
    per_class = int(round(total / num_classes))
    picked = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            log.warning("class %d has only %d synthetic tiles (wanted %d); using all of them", c, len(idx), per_class)
        picked.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _tensors(tiles: np.ndarray) -> torch.Tensor:
    from histodiff.data.shards import to_model_range

    if len(tiles) == 0:
        return torch.zeros(0, 3, 1, 1)
    return to_model_range(tiles)


def train_and_score(arm: str, seed: int, splits: Splits, extra_x: np.ndarray, extra_y: np.ndarray,
                    recipe: Recipe, return_state: bool = False) -> tuple[ArmOutcome, dict | None]:
    """Return the validation-selected model's test metrics for one (arm, seed) (and its weights if asked)."""
    from histodiff.runtime import device_for

    device = device_for(recipe.use_gpu)
    num_classes = len(splits.classes)
    train_x = _tensors(np.concatenate([splits.train_x, extra_x]) if len(extra_x) else splits.train_x)
    train_y = torch.from_numpy(np.concatenate([splits.train_y, extra_y]).astype(np.int64))
    weights = torch.cat([torch.ones(len(splits.train_y)), torch.full((len(extra_y),), recipe.synthetic_loss_weight)])
    # Model selection: only train and validation tiles reach fit_classifier.
    fit = fit_classifier(
        train_x, train_y, _tensors(splits.val_x), torch.from_numpy(splits.val_y.astype(np.int64)),
        backbone=recipe.backbone, num_classes=num_classes, image_size=recipe.image_size, epochs=recipe.epochs,
        lr=recipe.lr, weight_decay=recipe.weight_decay, batch_size=recipe.batch_size, seed=seed, device=device,
        sample_weight=weights, augment=recipe.augment, steps=recipe.steps,
    )
    # The test split is touched here, once, after selection is final.
    pred = predict_proba(fit.model, _tensors(splits.test_x), recipe.image_size, device=device).argmax(-1)
    metrics = classification_metrics(pred, torch.from_numpy(splits.test_y.astype(np.int64)), num_classes)
    outcome = ArmOutcome(arm, seed, fit.best_epoch, fit.best_val_balanced_accuracy, len(splits.train_y),
                         len(extra_y), metrics)
    state = {k: v.detach().cpu() for k, v in fit.model.state_dict().items()} if return_state else None
    return outcome, state


Runner = Callable[[Callable[..., Any], list[tuple]], list[Any]]


def local_runner(fn: Callable[..., Any], jobs: list[tuple]) -> list[Any]:
    """Return ``[fn(*job) for job in jobs]``, run one after the other in this process."""
    return [fn(*job) for job in jobs]


def ray_runner(num_cpus: float, use_gpu: bool) -> Runner:
    """Return a runner that runs each job as its own Ray task (one GPU each when asked)."""

    def run_jobs(fn: Callable[..., Any], jobs: list[tuple]) -> list[Any]:
        import ray

        task = ray.remote(num_cpus=num_cpus, num_gpus=1 if use_gpu else 0, max_retries=1)(fn)
        # Large shared inputs (the splits, the pool) go to the object store once, not once per job.
        shared: dict[int, Any] = {}

        def ref(arg: Any) -> Any:
            if isinstance(arg, (Splits, np.ndarray)) and getattr(arg, "size", 1) > 0:
                if id(arg) not in shared:
                    shared[id(arg)] = ray.put(arg)
                return shared[id(arg)]
            return arg

        from histodiff import console

        refs = [task.remote(*(ref(a) for a in job)) for job in jobs]
        # Each (arm, seed) trains for tens of seconds: a line per finished one shows the work moving.
        progress, pending = console.Progress("evaluate", len(refs), "classifier runs"), list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=1)
            progress.update(len(refs) - len(pending), force=True)
        return ray.get(refs)

    return run_jobs


def evaluate_arms(splits: Splits, arms: dict[str, tuple[np.ndarray, np.ndarray]], recipe: Recipe,
                  seeds: list[int], runner: Runner = local_runner, keep_state: tuple[str, int] | None = None,
                  baseline: bool = True) -> tuple[list[ArmOutcome], dict | None]:
    """Return every (arm, seed) outcome (``arms`` maps name -> extra tiles) and one kept model.

    The baseline arm (real tiles only) is added unless ``baseline=False``: the validation
    benchmark takes it from the pseudo-labeling baseline, which trains it anyway.
    """
    check_labels("real train split", [splits.classes[i] for i in splits.train_y], splits.classes, require_all=True)
    if len(splits.val_y) == 0:
        raise ValueError("the validation split is empty: model selection needs one (set data.val_fraction > 0)")
    if len(splits.test_y) == 0:
        raise ValueError("the test split is empty: give a labeled test set or set data.test_fraction > 0")
    empty = (np.zeros((0, *splits.train_x.shape[1:]), np.uint8), np.zeros(0, np.int64))
    all_arms = {"baseline": empty, **arms} if baseline else dict(arms)
    # An arm with no extra tiles is the baseline itself (training is deterministic per seed): its
    # outcomes are the baseline's, not a second training of the same thing.
    same_as_baseline = [arm for arm, (_, y) in all_arms.items() if arm != "baseline" and len(y) == 0 and baseline]
    jobs = [(arm, seed, splits, x, y, recipe, keep_state == (arm, seed)) for arm, (x, y) in all_arms.items()
            if arm not in same_as_baseline for seed in seeds]
    results = runner(train_and_score, jobs)
    kept = next((state for _, state in results if state is not None), None)
    outcomes = [outcome for outcome, _ in results]
    for arm in same_as_baseline:
        outcomes += [dataclasses.replace(o, arm=arm) for o in outcomes if o.arm == "baseline"]
    return outcomes, kept


def format_table(summary: dict[str, dict[str, list[float]]], gains: dict[str, dict[str, dict]], n_seeds: int) -> str:
    """Return a print-ready table: each arm's mean +- std and its gain over the baseline with 95% CI."""
    lines = [f"downstream test metrics, {n_seeds} seed(s), model selected on validation (percent)",
             f"{'arm':<12}" + "".join(f"{m:>22}" for m in SCALAR_METRICS)]
    for arm, metrics in summary.items():
        cells = "".join(f"{100 * mean:>15.1f} +- {100 * std:<4.1f}" for mean, std in (metrics[m] for m in SCALAR_METRICS))
        lines.append(f"{arm:<12}{cells}")
    for arm, arm_gains in gains.items():
        lines.append(f"gain {arm} - baseline (95% t-interval over paired seeds):")
        for m in SCALAR_METRICS:
            g = arm_gains[m]
            lines.append(f"  {m:<18} {100 * g['mean']:+6.1f} points  [{100 * g['ci_low']:+.1f}, {100 * g['ci_high']:+.1f}]")
    return "\n".join(lines)


def load_splits(split: Any, store: Any) -> Splits:
    """Return the labeled train/val/test splits of ``histodiff.data.splits.labeled_splits``."""
    from histodiff.data.splits import labeled_splits

    got = labeled_splits(split, store)
    (tx, ty, classes), (vx, vy, _), (sx, sy, _) = got["train"], got["val"], got["test"]
    return Splits(list(classes), tx, ty, vx, vy, sx, sy)


def load_synthetic(uri: str, store: Any, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 NHWC tiles, class ids) of the accepted synthetic tiles at a shard directory."""
    from histodiff.data.shards import load_tiles

    tiles, labels = load_tiles(uri, store)
    # A class the selector rejected entirely is a result, not bad input: the augmented arm adds
    # tiles of the other classes (sample_balanced warns). Nothing accepted at all is a result too:
    # the augmented arm is then the real tiles alone (gain 0), flagged by its synthetic count of 0.
    check_labels(f"synthetic tiles at {uri!r}", labels, classes, require_all=False)
    if not labels:
        log.warning("synthetic tiles at %s: the selector accepted no tile of any class, so the augmented arm "
                    "is the real tiles alone (gain 0). Lower synthesis.selector.threshold, or raise "
                    "synthesis.max_samples_per_class or synthesis.guidance_scale", uri)
    return tiles, np.array([classes.index(c) for c in labels], dtype=np.int64)
