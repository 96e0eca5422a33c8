"""One metric naming scheme and each stage's key figures.

Names are ``snake_case`` and end in their unit where they have one (``_pct``: percent,
``_points``: percentage points, ``_db``, ``_per_s``); a stage run logs ``name``, the pipeline's
parent run logs ``stage/name``. Accuracies are percent everywhere (the console, MLflow, the
README), never fractions. :func:`figures` is what a stage's end line, the parent run and the
expected-range check (:mod:`histodiff.expected`) read.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

PRIMARY = "gain_balanced_accuracy_points"  # the one number the pipeline exists for
PRIMARY_PARENT = f"evaluate/{PRIMARY}"


def metric_name(*parts: Any) -> str:
    """Return the parts joined as one ``snake_case`` metric name (``/`` and ``.`` become ``_``)."""
    text = "_".join(str(p) for p in parts if p not in (None, ""))
    return re.sub(r"[^0-9A-Za-z_]+", "_", text).strip("_").lower()


def parent_name(stage: str, name: str) -> str:
    """Return the parent run's name of a stage figure: ``stage/name``."""
    return f"{stage}/{name}"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        else None


def evaluation_figures(summary: dict, gains: dict, quality: dict | None = None) -> dict[str, float]:
    """Return the evaluation's figures: arms in ``_pct``, gains and their CI in ``_points``, FID/KID."""
    out: dict[str, float] = {}
    for arm, metrics in summary.items():
        for m, (mean, std) in metrics.items():
            out[metric_name(arm, m, "pct")] = 100 * mean
            out[metric_name(arm, m, "std_pct")] = 100 * std
    for arm, arm_gains in gains.items():
        prefix = "gain" if arm == "augmented" else f"gain_{arm}"
        for m, g in arm_gains.items():
            out[metric_name(prefix, m, "points")] = 100 * g["mean"]
            out[metric_name(prefix, m, "points_ci_low")] = 100 * g["ci_low"]
            out[metric_name(prefix, m, "points_ci_high")] = 100 * g["ci_high"]
    for key in ("fid", "kid_mean", "copy_suspects"):
        value = _num((quality or {}).get(key))
        if value is not None:
            out[metric_name("quality", key)] = value
    return {k: v for k, v in out.items() if v == v}  # NaN (one seed has no interval) is no metric


def _synthesize(r: Any) -> dict[str, float]:
    generated, accepted = sum(r.generated.values()), sum(r.accepted.values())
    out = {"generated_tiles": generated, "accepted_tiles": accepted}
    if generated:
        out["selectivity_pct"] = 100 * accepted / generated
    return out


def _classifier(r: Any) -> dict[str, float]:
    by_t = {int(t): a for t, a in r.val_accuracy.items()}
    if not by_t:
        return {}
    low, high = min(by_t), max(by_t)
    return {f"val_accuracy_t{low}_pct": 100 * by_t[low], f"val_accuracy_t{high}_pct": 100 * by_t[high]}


def _pseudolabel(r: Any) -> dict[str, float]:
    n = sum(r.per_class.values())  # 0 when the stage is off (pseudo_labels.per_class=0): no confidence to show
    return {"pseudo_labeled_tiles": n, **({"mean_confidence": r.mean_confidence} if n else {})}


_FIGURES = {
    "ingest": lambda r: {metric_name(k, "tiles"): v for k, v in r.num_tiles.items()},
    "autoencoder": lambda r: {"psnr_db": r.psnr, "ssim": r.ssim},
    "encode": lambda r: {"num_latents": r.num_latents, "scale_factor": r.scale_factor},
    # Names unlike the per-step metrics (probe_loss, samples_per_s): a figure is logged at step 0.
    "pretrain": lambda r: {"final_loss": r.final_loss, "train_samples_per_s": r.samples_per_s,
                           "final_probe_loss": r.probe_losses[-1][1] if r.probe_losses else None},
    "pseudolabel": _pseudolabel,
    "classifier": _classifier,
    "selector": lambda r: {"val_balanced_accuracy_pct": 100 * r.val_balanced_accuracy},
    "synthesize": _synthesize,
    "evaluate": lambda r: evaluation_figures(r.summary, r.gains, r.quality),
}


def figures(stage: str, result: Any) -> dict[str, float]:
    """Return a stage result's key figures by metric name (plus ``seconds``); unknown stages: top-level numbers."""
    pick = _FIGURES.get(stage)
    if pick is not None:
        raw = pick(result)
    else:
        data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)
        raw = {metric_name(k): v for k, v in data.items()}
    # Three decimals: the MLflow runs table shows "0.69444179..." otherwise, and no figure here is finer.
    out = {k: round(float(v), 3) for k, v in raw.items() if _num(v) is not None}
    out.pop("seconds", None)
    seconds = _num(getattr(result, "seconds", None))
    if seconds:
        out["seconds"] = round(seconds, 1)
    return out


# What a stage's end line shows first: the evaluation's gain, both arms and the FID before the rest.
_FIRST = {"evaluate": (PRIMARY, "baseline_balanced_accuracy_pct", "augmented_balanced_accuracy_pct", "quality_fid")}


def summary_text(stage: str, values: dict[str, float], limit: int = 4) -> str:
    """Return the few figures a stage's end line shows, e.g. ``psnr_db 26.4, ssim 0.79``."""
    keys = [k for k in values if k != "seconds" and not k.endswith(("_ci_low", "_ci_high", "std_pct"))]
    first = [k for k in _FIRST.get(stage, ()) if k in values]
    keys = [*first, *[k for k in keys if k not in first]]
    return ", ".join(f"{k} {values[k]:.4g}" for k in keys[:limit])
