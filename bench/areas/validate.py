"""Benchmark: method validation on MNIST 5k (``histodiff bench validate``); the protocol is :mod:`bench.validation`."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

from bench.validation import run_validation

UNITS = {
    "validate_baseline_acc": ("percent", "test accuracy, real labels only (2 per class), mean over seeds"),
    "validate_augmented_acc": ("percent", "test accuracy, real + selected synthetic tiles, mean over seeds"),
    "validate_gain_points": ("points", ">= +6.4 (the paper's headline gain), paired by seed"),
    "validate_gain_ci_low": ("points", "> 0: the 95% t-interval over seeds excludes no gain"),
    "validate_gain_ci_high": ("points", "upper end of the 95% t-interval of the gain"),
    "validate_unfiltered_gain_points": ("points", "below validate_gain_points: selection should matter"),
    "validate_cheap_baseline_acc": ("percent", "below validate_augmented_acc: best of pseudo-labeling, latent kNN "
                                               "and linear probe"),
    "guidance_precision_guided": ("fraction", "above the unguided rate: guided samples (2 labels per class, before "
                                              "selection) that an independent judge labels as their target"),
    "guidance_precision_unguided": ("fraction", "about 0.1 (10 classes): unguided samples matching their assigned class"),
    "validate_wall_s": ("s", "< 1800 on 2 CPU cores (whole protocol, all budgets)"),
    "validate_curve": ("mixed", "per budget (2, 5, 10 labels per class): the same figures"),
}


def _machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        gpu = None
    return f"{platform.machine()} {os.cpu_count()} CPU cores" + (f", {gpu}" if gpu else ", no GPU")


def run(workdir: str, budgets: tuple[int, ...] = (2, 5, 10), overrides: list[str] | None = None) -> dict[str, dict]:
    """Return the validation figures in the benchmark format (value, unit, goal, measured)."""
    figures = run_validation(os.path.join(workdir, "validate"), budgets=budgets, overrides=overrides)
    stamp = f"{datetime.now(timezone.utc):%Y-%m-%d} {_machine()}"
    return {key: {"value": figures[key], "unit": unit, "goal": goal, "measured": stamp}
            for key, (unit, goal) in UNITS.items()}
