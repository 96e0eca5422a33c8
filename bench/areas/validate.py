"""Benchmark: method validation on MNIST 5k (``histodiff bench validate``); the protocol is :mod:`bench.validation`."""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timezone

from bench.common import machine
from bench.validation import Protocol, run_validation
from bench.validation_report import ARMS, table_markdown

UNITS = {
    "validate_headline_budget": ("labels per class", "5% of the pool's labels: the label fraction of the paper's +6.4"),
    "validate_gain_points": ("points", ">= +6.4: augmented minus baseline test accuracy at the headline budget"),
    "validate_gain_ci_low": ("points", "> 0: the 95% t-interval over label draws (seed-averaged) excludes no gain"),
    "validate_gain_ci_high": ("points", "upper end of the 95% t-interval over label draws"),
    "validate_curve": ("mixed", "per budget: label_draws, seeds, baseline_acc, per arm acc / gain_points / gain_ci_low"
                                " / gain_ci_high (augmented, unfiltered, unguided_selected, duplicated_real, "
                                "classical_aug, pseudo_label, oracle), selectivity, accepted_per_class"),
    "guidance_precision_guided": ("fraction", "0.3 above the unguided rate: every generated guided tile (before "
                                              "selection) that an independent judge labels as its target"),
    "guidance_precision_unguided": ("fraction", "about 0.1 (10 classes): unguided samples matching an assigned class"),
    "validate_wall_s": ("s", "<= 3600 on 2 CPU cores: the whole protocol from an empty workdir, one run"),
    "validate_generator": ("mixed", "the shared generator's training figures (steps, losses, psnr)"),
}


def run(workdir: str, quick: bool = False, overrides: tuple[str, ...] = (), budgets: tuple[int, ...] = (),
        arms: tuple[str, ...] = ()) -> dict[str, dict]:
    """Return the validation figures in the benchmark format (value, unit, goal, measured).

    ``budgets`` runs only these labels-per-class budgets (the headline is the largest unless the protocol's is
    among them); ``arms`` trains only these arms beside the baseline, an ablation's ``("augmented",)`` say."""
    # Bad input fails here, before Ray starts or the generator trains.
    if overrides:
        from histodiff.config import load_config

        load_config("tiny", list(overrides))
    if unknown := sorted(set(arms) - set(ARMS)):
        raise ValueError(f"validate arms {unknown} unknown: choose from {list(ARMS)}")
    protocol = Protocol.quick(tuple(overrides)) if quick else Protocol(overrides=tuple(overrides))
    if budgets:
        protocol = protocol.at_budgets(budgets)
    if arms:
        protocol = dataclasses.replace(protocol, arms=tuple(arms))
    figures = run_validation(os.path.join(workdir, "quick" if quick else "full"), protocol)
    print("test accuracy % (gain over the baseline in points [95% interval over label draws]):\n"
          + table_markdown(figures["validate_curve"]), flush=True)
    stamp = f"{datetime.now(timezone.utc):%Y-%m-%d} {machine()}" + (" (QUICK mode: not a result)" if quick else "")
    return {key: {"value": figures[key], "unit": unit, "goal": goal, "measured": stamp}
            for key, (unit, goal) in UNITS.items()}
