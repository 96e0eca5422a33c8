"""The validation's figures: per budget and arm, accuracy and the gain over the baseline with an interval over draws.

A gain is computed per (draw, seed) as arm minus baseline (paired: the same seed, the same real
tiles), averaged over the seeds of a draw, and the 95% t-interval is taken over draws
(:func:`histodiff.evaluate.metrics.draw_gain`): the label draw, with its latent classifier,
selector and synthesis, is the variance that matters at a few labels per class. The headline
budget (5% of the pool) is the primary test; the others are corrected for multiple comparisons
with Holm's method (``augmented_p_holm``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from histodiff.evaluate.metrics import draw_gain, holm, t_test_p

# Fewer label draws than this: the t-interval rests on 1 degree of freedom (2 equal gains give it no
# width at all), so it is reported but flagged (``few_draws``) and the table marks it.
MIN_DRAWS = 3

ARMS = ("augmented", "unfiltered", "unguided_selected", "duplicated_real", "classical_aug", "pseudo_label", "oracle")


def _acc(outcomes: list[dict], arm: str) -> dict[int, float]:
    return {o["seed"]: 100.0 * o["test"]["accuracy"] for o in outcomes if o["arm"] == arm}


def _gains(outcomes: list[dict], arm: str) -> dict[int, float]:
    """Return the arm's test accuracy minus the baseline's, per seed (paired: the same seed, the same real tiles)."""
    acc, base = _acc(outcomes, arm), _acc(outcomes, "baseline")
    return {s: acc[s] - base[s] for s in sorted(acc) if s in base}


def _over_draws(per_draw: list[list[float]]) -> dict[str, Any]:
    """Return the gain over draws of per-(draw, seed) gains: its mean, 95% interval and each draw's mean."""
    gain = draw_gain(per_draw)
    return {"gain_points": gain.mean, "gain_ci_low": gain.ci_low, "gain_ci_high": gain.ci_high,
            "gain_per_draw": [float(np.mean(d)) for d in per_draw], "p_value": t_test_p(gain.per_seed)}


def arm_figures(cells: list[dict], arm: str) -> dict[str, Any] | None:
    """Return one arm's accuracy and gain over the baseline with its interval over the cells (one per draw), or
    None when a cell lacks the arm."""
    per_draw = [list(_gains(c["outcomes"], arm).values()) for c in cells]
    if any(not d for d in per_draw):
        return None
    accs = [_acc(c["outcomes"], arm) for c in cells]
    return {"acc": float(np.mean([v for a in accs for v in a.values()])), **_over_draws(per_draw)}


def budget_figures(cells: list[dict]) -> dict[str, Any]:
    """Return one budget's figures from its cells (one per label draw)."""
    out: dict[str, Any] = {"label_draws": len(cells), "seeds": len(_acc(cells[0]["outcomes"], "baseline")),
                           "few_draws": len(cells) < MIN_DRAWS}
    base = [_acc(c["outcomes"], "baseline") for c in cells]
    out["baseline_acc"] = float(np.mean([v for b in base for v in b.values()]))
    for arm in ARMS:
        if (got := arm_figures(cells, arm)) is not None:
            out[arm] = got
    reports = [c["synthesis"] for c in cells]
    out["selectivity"] = float(np.mean([r["selectivity"] for rep in reports for r in rep.values()]))
    out["accepted_per_class"] = float(np.mean([r["accepted"] for rep in reports for r in rep.values()]))
    out["quota_fill"] = float(np.mean([r["quota_fill"] for rep in reports for r in rep.values()]))
    out["draws_nothing_accepted"] = [c["draw"] for c in cells if c["nothing_accepted"]]
    out["volumes"] = [c["volumes"] for c in cells]
    out["guidance_precision_guided"] = float(np.nanmean([c["precision_guided"] for c in cells]))
    out["guidance_precision_accepted"] = float(np.nanmean([c["precision_guided_accepted"] for c in cells]))
    out["selector_val_bacc"] = float(np.mean([c["selector_val_bacc"] for c in cells]))
    out["probes"] = {k: float(np.mean([c["probes"][k] for c in cells])) * 100.0 for k in cells[0]["probes"]}
    out["pseudo_label_precision"] = float(np.nanmean([c.get("pseudo_label_precision", math.nan) for c in cells])) \
        if any(c.get("pseudo_label_precision") == c.get("pseudo_label_precision") for c in cells) else math.nan
    return out


def minus_recipe(cells: list[dict], recipe: list[dict]) -> dict[str, Any] | None:
    """Return a variant's augmented gain minus the recipe's, paired by draw and seed (the same labels, the same
    downstream seed), with a 95% t-interval over the draws both have; None when they share no draw."""
    theirs = {c["draw"]: c for c in recipe}
    per_draw, draws = [], []
    for cell in sorted(cells, key=lambda c: c["draw"]):
        if cell["draw"] not in theirs:
            continue
        mine, other = _gains(cell["outcomes"], "augmented"), _gains(theirs[cell["draw"]]["outcomes"], "augmented")
        if seeds := [s for s in mine if s in other]:
            per_draw.append([mine[s] - other[s] for s in seeds])
            draws.append(cell["draw"])
    return {**_over_draws(per_draw), "draws": draws} if per_draw else None


def figures(cells: list[dict], protocol: Any, precision_unguided: float, wall_s: float,
            generator: dict | None = None, recipe_cells: list[dict] | None = None) -> dict[str, Any]:
    """Return the benchmark keys of issue 14 from every cell of one run (a variant's with ``recipe_cells``, the
    recipe's finished cells: then every budget's augmented arm also says how far it moved from the recipe's)."""
    by_budget = {str(b): [c for c in cells if c["budget"] == b] for b in protocol.budgets}
    missing = [b for b, cs in by_budget.items() if not cs]
    curve = {b: budget_figures(cs) for b, cs in by_budget.items() if cs}
    for b, f in curve.items():
        moved = minus_recipe(by_budget[b], [c for c in recipe_cells or [] if str(c["budget"]) == b])
        if moved is not None and "augmented" in f:
            f["augmented"]["minus_recipe"] = moved
    if not curve:
        raise ValueError(f"no validation cell finished for any budget of {list(protocol.budgets)}: nothing to report")
    budgets = list(curve)
    adjusted = holm([curve[b].get("augmented", {}).get("p_value", math.nan) for b in budgets])
    for b, p in zip(budgets, adjusted):
        if "augmented" in curve[b]:
            curve[b]["augmented"]["p_holm"] = p
        curve[b]["guidance_precision_unguided"] = precision_unguided
    head = curve[str(protocol.headline)] if str(protocol.headline) in curve else curve[budgets[-1]]
    aug = head.get("augmented", {})
    return {
        "validate_headline_budget": protocol.headline,
        "validate_gain_points": aug.get("gain_points", math.nan),
        "validate_gain_ci_low": aug.get("gain_ci_low", math.nan),
        "validate_gain_ci_high": aug.get("gain_ci_high", math.nan),
        "validate_curve": curve,
        "guidance_precision_guided": head["guidance_precision_guided"],
        "guidance_precision_unguided": precision_unguided,
        "validate_wall_s": wall_s,
        "validate_generator": generator or {},
        "validate_budgets_without_cells": [int(b) for b in missing],
    }


def table_markdown(curve: dict[str, dict]) -> str:
    """Return the curve as a markdown table: accuracy and gain [95% CI over draws] per arm and budget.

    A budget with fewer than ``MIN_DRAWS`` draws has its row marked: its intervals mean nothing. A variant's
    table has one more column: its augmented gain minus the recipe's, paired by draw.
    """
    compared = any("minus_recipe" in f.get("augmented", {}) for f in curve.values())
    names = [*ARMS, "augmented minus recipe"] if compared else list(ARMS)
    lines = ["| labels/class | baseline | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]

    def gain(a: dict) -> str:
        return f"{a['gain_points']:+.1f} [{a['gain_ci_low']:+.1f}, {a['gain_ci_high']:+.1f}]"

    for b, f in curve.items():
        cells = []
        for arm in ARMS:
            a = f.get(arm)
            cells.append("n/a" if a is None else f"{a['acc']:.1f} ({gain(a)})")
        if compared:
            moved = f.get("augmented", {}).get("minus_recipe")
            cells.append("n/a" if moved is None else gain(moved))
        label = f"{b} (intervals over {f['label_draws']} draws: not meaningful)" if f.get("few_draws") else b
        lines.append(f"| {label} | {f['baseline_acc']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
