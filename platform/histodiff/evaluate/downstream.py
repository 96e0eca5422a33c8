"""Downstream evaluation: a timm classifier on real tiles vs real + synthetic tiles, K seeds.

Protocol (METHOD.md, fixing the reference code's test-set selection):
- every arm (``baseline`` = the real train split; every other arm = the real tiles plus an
  extra set: synthetic tiles, or a control's tiles at the same volume, each real row of a batch
  swapped for an extra tile of its class with probability ``synthetic_fraction``, so the class
  mix stays the real split's) trains with the same recipe, steps and seeds;
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
from histodiff.train.backbone import fit_classifier, predict_proba, soft_targets

log = logging.getLogger(__name__)


@dataclass
class Extra:
    """An arm's extra training tiles: uint8 NHWC tiles, class ids (N,) or probabilities (N, K), optional weights."""

    x: np.ndarray
    y: np.ndarray
    weight: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: np.ndarray) -> "Extra":
        """Return the rows ``idx`` of this set."""
        return Extra(self.x[idx], self.y[idx], None if self.weight is None else self.weight[idx])


# An arm: fixed extra tiles, or a function of (seed, the seed's baseline weights) that builds them
# (pseudo-labeling labels the pool with each seed's own baseline).
Arm = Extra | Callable[[int, dict], Extra]


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
    synthetic_label_smoothing: float = 0.0
    synthetic_fraction: float = 0.5
    use_gpu: bool = False
    steps: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "Recipe":
        """Return the recipe named by ``cfg.evaluation`` (and ``cfg.ray.use_gpu``)."""
        ev = cfg.evaluation
        return cls(backbone=ev.backbone, image_size=ev.image_size, epochs=ev.epochs, lr=ev.lr,
                   weight_decay=ev.weight_decay, batch_size=ev.batch_size, augment=ev.augment,
                   synthetic_loss_weight=ev.synthetic_loss_weight,
                   synthetic_label_smoothing=ev.synthetic_label_smoothing, synthetic_fraction=ev.synthetic_fraction,
                   use_gpu=cfg.ray.use_gpu, steps=ev.steps)


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


def _tensors(tiles: np.ndarray) -> torch.Tensor:
    from histodiff.data.shards import to_model_range

    if len(tiles) == 0:
        return torch.zeros(0, 3, 1, 1)
    return to_model_range(tiles)


def train_and_score(arm: str, seed: int, splits: Splits, extra: Extra | None, recipe: Recipe,
                    return_state: bool = False) -> tuple[ArmOutcome, dict | None]:
    """Return the validation-selected model's test metrics for one (arm, seed) (and its weights if asked)."""
    from histodiff.runtime import device_for

    device = device_for(recipe.use_gpu)
    num_classes = len(splits.classes)
    kwargs: dict[str, Any] = {}
    if extra is not None and len(extra):
        weight = extra.weight if extra.weight is not None else np.ones(len(extra), np.float32)
        y = torch.tensor(extra.y)  # a copy: arrays from Ray's object store are read-only
        if recipe.synthetic_label_smoothing > 0:  # soft labels: trust each extra tile a little less
            eps = recipe.synthetic_label_smoothing
            y = soft_targets(y, num_classes) * (1 - eps) + eps / num_classes
        kwargs = {"extra_x": _tensors(extra.x), "extra_y": y,
                  "extra_weight": torch.from_numpy(weight.astype(np.float32)) * recipe.synthetic_loss_weight,
                  "extra_fraction": recipe.synthetic_fraction}
    # Model selection: only train and validation tiles reach fit_classifier.
    fit = fit_classifier(
        _tensors(splits.train_x), torch.from_numpy(splits.train_y.astype(np.int64)), _tensors(splits.val_x),
        torch.from_numpy(splits.val_y.astype(np.int64)), backbone=recipe.backbone, num_classes=num_classes,
        image_size=recipe.image_size, epochs=recipe.epochs, lr=recipe.lr, weight_decay=recipe.weight_decay,
        batch_size=recipe.batch_size, seed=seed, device=device, augment=recipe.augment, steps=recipe.steps, **kwargs)
    # The test split is touched here, once, after selection is final.
    pred = predict_proba(fit.model, _tensors(splits.test_x), recipe.image_size, device=device).argmax(-1)
    metrics = classification_metrics(pred, torch.from_numpy(splits.test_y.astype(np.int64)), num_classes)
    outcome = ArmOutcome(arm, seed, fit.best_epoch, fit.best_val_balanced_accuracy, len(splits.train_y),
                         0 if extra is None else len(extra), metrics)
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
            if isinstance(arg, (Splits, Extra, np.ndarray)) and getattr(arg, "size", 1) > 0:
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


def evaluate_arms(splits: Splits, arms: dict[str, Arm], recipe: Recipe, seeds: list[int],
                  runner: Runner = local_runner) -> tuple[list[ArmOutcome], dict[int, dict]]:
    """Return every (arm, seed) outcome, the baseline first, and the baseline's weights per seed.

    ``arms`` maps a name to its extra tiles, or to a function (seed, baseline weights) -> extra
    tiles for arms built from each seed's baseline. The baselines train first (every seed at
    once), then every other (arm, seed) at once. An arm with no extra tiles is the baseline
    itself (training is deterministic per seed): it takes the baseline's outcomes, untrained.
    """
    check_labels("real train split", [splits.classes[i] for i in splits.train_y], splits.classes, require_all=True)
    if len(splits.val_y) == 0:
        raise ValueError("the validation split is empty: model selection needs one (set data.val_fraction > 0)")
    if len(splits.test_y) == 0:
        raise ValueError("the test split is empty: give a labeled test set or set data.test_fraction > 0")
    first = runner(train_and_score, [("baseline", seed, splits, None, recipe, True) for seed in seeds])
    outcomes = [outcome for outcome, _ in first]
    states = {seed: state for seed, (_, state) in zip(seeds, first)}
    jobs, copies = [], []
    for name, arm in arms.items():
        for seed in seeds:
            extra = arm(seed, states[seed]) if callable(arm) else arm
            if len(extra):
                jobs.append((name, seed, splits, extra, recipe, False))
            else:
                copies.append(dataclasses.replace(outcomes[seeds.index(seed)], arm=name))
    outcomes += [outcome for outcome, _ in runner(train_and_score, jobs)] + copies
    return outcomes, states


def format_table(summary: dict[str, dict[str, list[float]]], gains: dict[str, dict[str, dict]], n_seeds: int) -> str:
    """Return a print-ready table: each arm's mean +- std and its gain over the baseline with 95% CI."""
    width = max([12, *(len(arm) + 1 for arm in summary)])  # control names are longer than "augmented"
    lines = [f"downstream test metrics, {n_seeds} seed(s), model selected on validation (percent)",
             f"{'arm':<{width}}" + "".join(f"{m:>22}" for m in SCALAR_METRICS)]
    for arm, metrics in summary.items():
        cells = "".join(f"{100 * mean:>15.1f} +- {100 * std:<4.1f}" for mean, std in (metrics[m] for m in SCALAR_METRICS))
        lines.append(f"{arm:<{width}}{cells}".rstrip())
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


def load_synthetic(uri: str, store: Any, classes: list[str], weighting: str = "none") -> Extra:
    """Return the synthetic tiles at a shard directory as an extra set (with ``weighting="confidence"``,
    each tile weighted by its selector score from the synthesis lineage next to the directory)."""
    import posixpath

    from histodiff.data.shards import decode_png, read_manifest, read_table

    table = read_table(uri, store, columns=["image", "label", "source"])
    labels = table.column("label").to_pylist()
    # A class the selector rejected entirely is a result, not bad input: the augmented arm adds
    # tiles of the other classes (synthesize warns). Nothing accepted at all is a result too:
    # the augmented arm is then the real tiles alone (gain 0), flagged by its synthetic count of 0.
    check_labels(f"synthetic tiles at {uri!r}", labels, classes, require_all=False)
    if not labels:
        log.warning("synthetic tiles at %s: the selector accepted no tile of any class, so the augmented arm "
                    "is the real tiles alone (gain 0). Lower synthesis.selector.threshold, or raise "
                    "synthesis.max_samples_per_class or synthesis.guidance_scale", uri)
        return Extra(np.zeros((0, 1, 1, 3), np.uint8), np.zeros(0, np.int64))
    tiles = np.stack([decode_png(b) for b in table.column("image").to_pylist()])
    ids = np.array([classes.index(c) for c in labels], dtype=np.int64)
    weight = None
    if weighting == "confidence":
        # The synthesize stage names its lineage (a sibling of the tile set) in the tile set's manifest.
        name = read_manifest(uri, store).extra.get("lineage")
        lineage_uri = posixpath.join(posixpath.dirname(uri.rstrip("/")), name) if name else f"{uri} (its manifest)"
        if not name or not store.exists(lineage_uri):  # tiles the synthesize stage did not write
            raise FileNotFoundError(f"no synthesis lineage at {lineage_uri!r}: evaluation.synthetic_weighting="
                                    "confidence weights each synthetic tile by its selector score from it; run "
                                    "`histodiff run synthesize` or set evaluation.synthetic_weighting=none")
        lineage = store.read_parquet(lineage_uri, ["tile_id", "selector_score"])
        score = dict(zip(lineage.column("tile_id").to_pylist(), lineage.column("selector_score").to_pylist()))
        weight = np.array([score[t] for t in table.column("source").to_pylist()], np.float32)
    return Extra(tiles, ids, weight)
