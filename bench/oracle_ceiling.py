"""The ceiling of any extra data at one budget: true-labeled pool tiles at several volumes and step counts.

Issue 15's question before any synthesis lever: how much can *perfect* extra tiles add at a
budget? On the validation's own splits (its label draws, test and validation tiles), the
downstream recipe trains on the real split alone and with ``v`` pool tiles per class drawn at
random with their true labels (the ``oracle`` control at a chosen volume), for each step count.
Gains are paired by seed, averaged over seeds, then over draws. No generator is involved, so a
gain the oracle cannot reach here no synthetic tile can reach either.

    python -m bench.oracle_ceiling --budget 19 --volumes 16,64,256 --steps 200,600

It writes the shards it needs under ``--workdir`` (the validation's, so an existing run's are reused).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import numpy as np

from bench.validation import Protocol, cell_config, prepare_data

log = logging.getLogger(__name__)


def ceiling(workdir: str, protocol: Protocol, budget: int, volumes: list[int], steps: list[int],
            draws: int = 2) -> dict[str, Any]:
    """Return {steps: {"baseline": acc %, "oracle<v>": gain points}} averaged over draws and ``protocol.seeds``."""
    from histodiff.data.splits import split_spec
    from histodiff.evaluate import controls
    from histodiff.evaluate.downstream import Recipe, evaluate_arms, load_splits, local_runner
    from histodiff.evaluate.metrics import summarise
    from histodiff.storage import Store

    data = prepare_data(workdir, protocol)
    store = Store()
    pool_x, pool_y = data.x[data.idx["pool"]], data.y[data.idx["pool"]]
    rows: dict[int, list[dict[str, float]]] = {s: [] for s in steps}
    t0 = time.time()
    for draw in range(draws):
        cfg = cell_config(data, protocol, budget, draw)
        splits = load_splits(split_spec(cfg, store), store)
        n_classes = len(splits.classes)
        for n_steps in steps:
            recipe = Recipe.from_config(cfg).model_copy(update={"steps": n_steps})
            arms = {f"oracle{v}": controls.random_per_class(pool_x, pool_y, np.full(n_classes, v), cfg.seed)
                    for v in volumes}
            outcomes, _ = evaluate_arms(splits, arms, recipe, list(protocol.seeds), local_runner)
            summary, gains = summarise(outcomes)  # gains paired by seed, as the evaluate stage reports them
            row = {"baseline": 100.0 * summary["baseline"]["accuracy"][0]}
            row.update({arm: 100.0 * gains[arm]["accuracy"]["mean"] for arm in arms})
            rows[n_steps].append(row)
            log.info("draw %d, %d steps: %s (%.0f s)", draw, n_steps,
                     {k: round(v, 1) for k, v in row.items()}, time.time() - t0)
    return {str(s): {k: round(float(np.mean([r[k] for r in rs])), 1) for k in rs[0]} for s, rs in rows.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="bench/_work/validate/full")
    p.add_argument("--budget", type=int, default=19)
    p.add_argument("--volumes", default="16,64,256", help="pool tiles per class, comma-separated")
    p.add_argument("--steps", default="200,600", help="downstream optimizer steps, comma-separated")
    p.add_argument("--draws", type=int, default=2)
    p.add_argument("--output", default=None, help="write the table here as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = ceiling(os.path.abspath(args.workdir), Protocol(), args.budget,
                  [int(v) for v in args.volumes.split(",")], [int(s) for s in args.steps.split(",")], args.draws)
    print(json.dumps(out, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
