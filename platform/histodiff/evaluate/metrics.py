"""Classification metrics (torchmetrics), the paired gain with its confidence interval, plots.

Pure functions of tensors and lists: no files, Ray or MLflow here.

The gain of augmentation is measured *paired by seed*: seed k trains the baseline and the
augmented arm with the same initialisation seed and batch order seed, so the per-seed
differences ``d_k = augmented_k - baseline_k`` remove most of the seed-to-seed variance.
The 95% interval is the Student t-interval over those K differences,
``mean(d) +- t_{0.975, K-1} * sd(d) / sqrt(K)`` (sd with K-1 in the denominator). With
K = 1 there is no spread to estimate and the interval is reported as NaN, never as zero.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

# The headline metrics, in the order tables show them.
SCALAR_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def classification_metrics(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Return accuracy, balanced accuracy, macro-F1, per-class sensitivity/specificity and the confusion matrix."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_recall,
        multiclass_specificity,
    )

    pred = torch.as_tensor(pred).long().cpu()
    target = torch.as_tensor(target).long().cpu()
    if pred.shape != target.shape or pred.ndim != 1:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} must be equal 1-D shapes")
    if len(target) == 0:
        raise ValueError("no test tiles to score: the test split is empty")
    kw = {"num_classes": num_classes}
    return {
        "accuracy": float(multiclass_accuracy(pred, target, average="micro", **kw)),
        # Balanced accuracy = mean per-class recall (sensitivity).
        "balanced_accuracy": float(multiclass_recall(pred, target, average="macro", **kw)),
        "macro_f1": float(multiclass_f1_score(pred, target, average="macro", **kw)),
        "sensitivity": [float(v) for v in multiclass_recall(pred, target, average="none", **kw)],
        "specificity": [float(v) for v in multiclass_specificity(pred, target, average="none", **kw)],
        "confusion_matrix": multiclass_confusion_matrix(pred, target, **kw).tolist(),
        "num_test": int(len(target)),
    }


@dataclass(frozen=True)
class Gain:
    """Augmented minus baseline, paired by seed, with a t-interval over seeds."""

    mean: float
    ci_low: float
    ci_high: float
    std: float
    n: int
    per_seed: tuple[float, ...]
    confidence: float = 0.95

    def as_dict(self) -> dict[str, Any]:
        """Return the gain as plain data."""
        out = asdict(self)
        out["per_seed"] = list(self.per_seed)
        return out


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Gain:
    """Return the mean of ``values`` with its Student t confidence interval (NaN for fewer than 2 values)."""
    from scipy import stats

    values = [float(v) for v in values]
    if not values:
        raise ValueError("a confidence interval needs at least one value")
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Gain(mean, math.nan, math.nan, math.nan, n, tuple(values), confidence)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return Gain(mean, mean - half, mean + half, std, n, tuple(values), confidence)


def paired_gain(baseline: Sequence[float], augmented: Sequence[float], confidence: float = 0.95) -> Gain:
    """Return the mean paired difference augmented - baseline and its Student t confidence interval."""
    if len(baseline) != len(augmented):
        raise ValueError(f"paired gain needs one baseline per augmented value; got {len(baseline)} and {len(augmented)}")
    if not baseline:
        raise ValueError("paired gain needs at least one seed")
    return mean_interval([float(a) - float(b) for a, b in zip(augmented, baseline)], confidence)


def draw_gain(per_draw: Sequence[Sequence[float]], confidence: float = 0.95) -> Gain:
    """Return the gain over label draws: each draw's seed-averaged paired gain, then a t-interval over draws.

    The labeled draw (and with it the latent classifier, the selector and the synthesis) is the
    largest source of variance at a few labels per class; seeds only vary the downstream
    initialisation and batch order, so they are averaged within a draw, not counted as samples.
    """
    if not per_draw or any(not d for d in per_draw):
        raise ValueError("a gain over draws needs at least one seed in every draw")
    return mean_interval([sum(d) / len(d) for d in per_draw], confidence)


def t_test_p(values: Sequence[float]) -> float:
    """Return the two-sided p-value of a one-sample t-test of mean(values) = 0 (NaN for fewer than 2)."""
    from scipy import stats

    if len(values) < 2:
        return math.nan
    return float(stats.ttest_1samp(list(values), 0.0).pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Return Holm-Bonferroni adjusted p-values (same order; NaN stays NaN): family-wise error control."""
    order = sorted((p, i) for i, p in enumerate(p_values) if p == p)
    adjusted = [math.nan] * len(p_values)
    running, m = 0.0, len(order)
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarise(outcomes: Sequence[Any]) -> tuple[dict, dict]:
    """Return (arm -> metric -> [mean, std]) and (arm -> metric -> paired gain over the baseline)."""
    by_arm: dict[str, dict[int, Any]] = {}
    for o in outcomes:
        by_arm.setdefault(o.arm, {})[o.seed] = o
    summary = {arm: {m: list(mean_std([o.test[m] for o in runs.values()])) for m in SCALAR_METRICS}
               for arm, runs in by_arm.items()}
    gains: dict[str, dict[str, dict]] = {}
    base = by_arm.get("baseline", {})
    for arm, runs in by_arm.items():
        if arm == "baseline":
            continue
        seeds = sorted(set(runs) & set(base))
        gains[arm] = {m: paired_gain([base[s].test[m] for s in seeds], [runs[s].test[m] for s in seeds]).as_dict()
                      for m in SCALAR_METRICS}
    return summary, gains


def confusion_figure(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> Any:
    """Return a matplotlib figure of a confusion matrix (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(matrix, dtype=float)
    size = max(3.0, 0.5 * len(class_names) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if cm[i, j] > top / 2 else "black", fontsize=8)
    fig.tight_layout()
    return fig
