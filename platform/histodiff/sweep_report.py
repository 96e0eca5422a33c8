"""The sweep's report: the recommendation (do no harm), the results table and the gain heatmap."""

from __future__ import annotations

import math
import re
from typing import Any

from histodiff.plots import figure_png
from histodiff.storage import Store, join

NO_SYNTHETIC_KEY = "no-synthetic"
COLUMNS = ("key", "guidance_scale", "threshold", "synthetic_fraction", "strength", "val_gain", "test_gain", "status",
           "error")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def recommend(trials: list[dict[str, Any]]) -> tuple[dict[str, Any], float, float | None]:
    """Return (setting, its validation gain, its test gain): the best on validation, else no synthetic.

    "No synthetic tiles" has gain 0 by definition and is always a candidate, and it wins
    ties: augmenting has to *help* on validation to be recommended.
    """
    best = {"key": NO_SYNTHETIC_KEY, "guidance_scale": None, "threshold": None, "synthetic_fraction": 0.0,
            "strength": None}
    best_val, best_test = 0.0, 0.0
    for t in trials:
        if t.get("status") == "OK" and t.get("synthetic_fraction") and _finite(t.get("val_gain")) \
                and t["val_gain"] > best_val:
            best = {k: t.get(k) for k in ("key", "guidance_scale", "threshold", "synthetic_fraction", "strength")}
            best_val, best_test = float(t["val_gain"]), t.get("test_gain")
    return best, best_val, best_test if _finite(best_test) else None


def table_csv(trials: list[dict[str, Any]]) -> str:
    """Return the trials as CSV text, best validation gain first."""
    def order(t: dict[str, Any]) -> float:
        return -t["val_gain"] if _finite(t.get("val_gain")) else math.inf

    lines = [",".join(COLUMNS)]
    for t in sorted(trials, key=order):
        cells = []
        for c in COLUMNS:
            v = t.get(c)
            cells.append("" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v).replace(",", ";")
                         .replace("\n", " "))
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def heatmap_figure(trials: list[dict[str, Any]]) -> Any:
    """Return a matplotlib figure of the validation gain over guidance scale x threshold.

    Cells average over synthetic fractions and strengths; failed trials show as blank (NaN) cells.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = [t for t in trials if t.get("synthetic_fraction")]
    scales = sorted({t["guidance_scale"] for t in grid})
    thresholds = sorted({t["threshold"] for t in grid})
    values = np.full((len(thresholds), len(scales)), np.nan)
    for i, th in enumerate(thresholds):
        for j, sc in enumerate(scales):
            cell = [t["val_gain"] for t in grid if t["threshold"] == th and t["guidance_scale"] == sc
                    and t.get("status") == "OK" and _finite(t.get("val_gain"))]
            if cell:
                values[i, j] = 100 * sum(cell) / len(cell)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * max(1, len(scales)), 1.2 + 0.9 * max(1, len(thresholds))))
    bound = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    im = ax.imshow(values, cmap="RdYlGn", vmin=-bound, vmax=bound, origin="lower", aspect="auto")
    ax.set_xticks(range(len(scales)), [f"{s:g}" for s in scales])
    ax.set_yticks(range(len(thresholds)), [f"{t:g}" for t in thresholds])
    ax.set_xlabel("guidance scale")
    ax.set_ylabel("selection threshold")
    ax.set_title("validation gain, balanced accuracy (points)")
    for i in range(len(thresholds)):
        for j in range(len(scales)):
            ax.text(j, i, "failed" if math.isnan(values[i, j]) else f"{values[i, j]:+.1f}", ha="center",
                    va="center", fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig


def error_kinds(trials: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return, per kind of error (its exception name), how many trials failed so and the first one."""
    kinds: dict[str, dict[str, Any]] = {}
    for t in trials:
        if t.get("status") == "OK":
            continue
        error = str(t.get("error") or "unknown error")
        match = re.match(r"^([\w.]+(?:\([\w.]+\))?):", error)
        name = match.group(1) if match else error[:60]
        entry = kinds.setdefault(name, {"count": 0, "first": error, "key": t.get("key")})
        entry["count"] += 1
    return kinds


def summary_text(result: Any) -> str:
    """Return the print-ready recommendation with its separately reported test gain.

    A sweep where any trial failed recommends nothing: it names how many failed and the first
    error of each kind, so a broken sweep never reads as a finding ("don't augment").
    """
    head = f"sweep: {len(result.trials)} trials, {result.num_failed} failed"
    if result.recommended is None:
        lines = [head, f"no recommendation: {result.num_failed} of {len(result.trials)} trials failed"]
        for name, kind in error_kinds(result.trials).items():
            lines.append(f"  {kind['count']} x {name}; first ({kind['key']}): {kind['first']}")
        return "\n".join(lines)
    rec = result.recommended
    setting = ("don't augment (no synthetic tiles)" if rec["key"] == NO_SYNTHETIC_KEY else
               f"guidance_scale={rec['guidance_scale']:g} threshold={rec['threshold']:g} "
               f"synthetic_fraction={rec['synthetic_fraction']:g}"
               + (f" strength={rec['strength']:g}" if rec.get("strength") not in (None, 1.0) else ""))
    test = "n/a" if result.recommended_test_gain is None else f"{100 * result.recommended_test_gain:+.2f}"
    return (f"{head}\n"
            f"recommended (best validation gain): {setting}\n"
            f"  validation gain {100 * result.recommended_val_gain:+.2f} points balanced accuracy\n"
            f"  test gain       {test} points (reported separately; not used to choose)")


def write_report(cfg: Any, result: Any, tracker: Any) -> dict[str, str]:
    """Write results.json/.csv, heatmap.png and summary.txt to the sweep dir and the parent run; return URIs."""
    import dataclasses

    out = result.output_uri
    csv = table_csv(result.trials)
    uris = {name: join(out, name) for name in ("results.csv", "heatmap.png", "summary.txt", "results.json")}
    store = Store(cfg.storage)
    store.write_bytes(uris["results.csv"], csv.encode())
    store.write_bytes(uris["summary.txt"], (summary_text(result) + "\n").encode())
    png = figure_png(heatmap_figure(result.trials))
    store.write_bytes(uris["heatmap.png"], png)
    tracker.log_png(png, "heatmap.png")
    tracker.log_text(csv, "results.csv")
    tracker.log_text(summary_text(result), "summary.txt")
    data = {k: v for k, v in dataclasses.asdict(result).items() if k != "artifacts"}
    tracker.log_dict(data, "results.json")
    tracker.log_metrics({"recommended_val_gain": result.recommended_val_gain, "num_failed": result.num_failed,
                         "num_trials": len(result.trials),
                         "recommended_test_gain": result.recommended_test_gain})
    tracker.set_tags({"histodiff.recommended": result.recommended["key"] if result.recommended else "none"})
    store.write_json(uris["results.json"], data)  # last: marks the report complete
    return uris
