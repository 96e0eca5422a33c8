"""Which lever of the recipe does what: one lever changed per row, on the validation's own generator.

Issue 15 asks for an ablation row per lever. Each variant (one or more ``KEY=VALUE`` overrides of the
recipe, quoted as one argument) runs as a variant of the validation protocol in the workdir of a
``histodiff bench validate`` (its generator, judge, label draws and seeds; an empty workdir trains them),
training only the augmented arm beside the baseline (``Protocol.arms``; the recipe's row too, where its cells
are not finished): a variant of the downstream evaluation reads the recipe's per-cell stages, a variant of the
synthesis trains its own. Each row: the augmented gain with
its 95% interval over draws, the variant minus the recipe paired by draw and seed, what the selector
accepted and how often the judge calls a tile its target before and after selection. A rerun reads the
finished cells (nothing is trained again), so the key can be rebuilt from the workdir at no cost.

    python -m bench.validation_ablations --budgets 2,5,19 "synthesis.strength=1.0" "pseudo_labels.per_class=0"

Writes ``validate_ablations`` into ``--output`` (default ``bench/results.json``) with the code version
and the date, and prints one markdown table per budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from datetime import datetime, timezone
from typing import Any

from bench.validation import Protocol, run_validation

log = logging.getLogger(__name__)


def _row(budget: dict[str, Any], seconds: float | None = None) -> dict[str, Any]:
    aug = budget.get("augmented", {})
    row = {
        "augmented": [round(aug.get(k, float("nan")), 1) for k in ("gain_points", "gain_ci_low", "gain_ci_high")],
        "per_draw": [round(g, 1) for g in aug.get("gain_per_draw", [])],
        "accepted_per_class": round(budget["accepted_per_class"], 1),
        "guided_precision_before_after_selection": [round(budget["guidance_precision_guided"], 2),
                                                    round(budget["guidance_precision_accepted"], 2)],
        "baseline_acc": round(budget["baseline_acc"], 1),
    }
    if moved := aug.get("minus_recipe"):
        row["minus_recipe"] = [round(moved[k], 1) for k in ("gain_points", "gain_ci_low", "gain_ci_high")]
        row["minus_recipe_draws"] = moved["draws"]
    if seconds is not None:
        row["seconds"] = round(seconds)
    return row


def ablations(workdir: str, protocol: Protocol, variants: list[tuple[str, ...]]) -> dict[str, dict[str, Any]]:
    """Return {budget: {"the recipe": row, variant: row}}: every row from a run of the augmented arm alone beside
    the baseline (cells finished earlier, the recipe's with every arm included, are read, not redone)."""
    protocol = dataclasses.replace(protocol, arms=("augmented",))
    t0 = time.time()
    recipe = run_validation(workdir, protocol)["validate_curve"]
    table = {b: {"the recipe": _row(f, time.time() - t0)} for b, f in recipe.items()}
    for overrides in variants:
        t0 = time.time()
        log.info("validation ablation: %s", " ".join(overrides))
        curve = run_validation(workdir, dataclasses.replace(protocol, overrides=overrides))["validate_curve"]
        for b, f in curve.items():
            table.setdefault(b, {})[" ".join(overrides)] = _row(f, time.time() - t0)
    return table


def table_markdown(rows: dict[str, dict[str, Any]]) -> str:
    """Return one markdown table per budget: a row per variant."""
    def span(v: list[float]) -> str:
        return f"{v[0]:+.1f} [{v[1]:+.1f}, {v[2]:+.1f}]"

    out = []
    for budget, variants in rows.items():
        out += [f"{budget} labels per class:", "| variant | augmented | minus recipe | per draw | accepted/class "
                "| judge precision before / after selection |", "|---|---|---|---|---|---|"]
        for name, r in variants.items():
            moved = span(r["minus_recipe"]) if "minus_recipe" in r else ""
            before, after = r["guided_precision_before_after_selection"]
            out.append(f"| {name} | {span(r['augmented'])} | {moved} | {', '.join(f'{g:+.1f}' for g in r['per_draw'])}"
                       f" | {r['accepted_per_class']} | {before:.2f} / {after:.2f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None, protocol: Protocol | None = None) -> int:
    protocol = protocol or Protocol()
    from bench.common import machine
    from bench.runner import code_version, merge_into
    from histodiff.cli import int_list
    from histodiff.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+", metavar="'KEY=VALUE [KEY=VALUE ...]'",
                   help="one variant of the recipe per argument (quote several overrides as one)")
    p.add_argument("--workdir", default="bench/_work/validate/full",
                   help="the workdir of `histodiff bench validate` (or empty)")
    p.add_argument("--budgets", type=int_list, default=protocol.budgets, metavar="N,N",
                   help="labels per class, comma-separated")
    p.add_argument("--output", default="bench/results.json")
    args = p.parse_args(argv)
    variants = [tuple(v.split()) for v in args.variants]
    try:
        protocol = protocol.at_budgets(args.budgets)
    except ValueError as e:
        p.error(str(e))
    for overrides in variants:  # a misspelled key fails here, before Ray starts
        load_config("tiny", list(overrides))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    code = code_version()
    rows = ablations(os.path.abspath(args.workdir), protocol, variants)
    print(table_markdown(rows))
    stamp = f"{datetime.now(timezone.utc):%Y-%m-%d} {machine()}, {code}"
    merge_into(args.output, {"validate_ablations": {
        "value": rows, "unit": "points", "measured": stamp,
        "goal": "informational (issue 15): one lever of the recipe changed per row, on the validation's generator, "
                "label draws and seeds; augmented gain [95% t-interval over draws]; minus_recipe: the variant's "
                "augmented gain minus the recipe's, paired by draw and seed; seconds: the variant's run"}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
