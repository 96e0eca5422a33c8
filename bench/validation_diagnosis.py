"""Why an arm gains what it gains: how many of its extra tiles can teach the downstream classifier anything.

Issue 15 asks why the augmented arm gained only what pseudo-labeling gained at 5 and 10 labels per
class (+4.2 vs +4.3 and +1.2 vs +1.2 at 57fadd9), both far below the oracle (true-labeled pool tiles
at the same volume). An extra tile can teach a classifier something only if its label is right and
the classifier does not already predict that label. For each label draw of each budget, on the
validation's own generator, judge, splits and seeds, this trains the baseline and four arms at the
augmented arm's per-class volume, and measures every arm's extra tiles against each seed's own baseline:

- ``augmented``, ``pseudo_label``, ``oracle``: as in the validation (:mod:`bench.validation`);
- ``oracle_confident``: pool tiles with their true labels, but per class the ones the seed's baseline
  is most confident of (true labels, chosen the way pseudo-labeling chooses): if it gains what
  pseudo-labeling gains and far less than the random ``oracle``, the cap is what confident tiles can
  teach, not their label noise.

Per arm: ``right`` (the share of extra tiles whose label is true: the truth for pool tiles, the
judge's call for synthetic ones), ``agree`` (the share whose label the baseline already predicts),
``teach`` (right and not agreed: the share that carries a correct signal the baseline lacks) and
``teach_per_class``. Per (budget, draw) the cell is written under ``{workdir}/diagnosis/`` as it
finishes; a rerun reads it (a cell of another protocol or version is redone).

    python -m bench.validation_diagnosis --workdir /path/to/validation/workdir --budgets 2,5,10

Writes ``validate_diagnosis`` into ``--output`` (default ``bench/results.json``) with the code version
and the date, and prints one markdown table per budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np

from bench.validation import Data, Protocol, cell_config, cell_key, judged_precision, prepare_data

log = logging.getLogger(__name__)

VERSION = 1  # bump when a diagnosis cell's computation changes: cached ones of another version are redone
ARMS = ("augmented", "pseudo_label", "oracle_confident", "oracle")


def oracle_confident(pool_x: np.ndarray, pool_y: np.ndarray, recipe: Any, counts: np.ndarray,
                     num_classes: int) -> Callable[[int, dict], Any]:
    """Return the arm builder: per class ``c``, the ``counts[c]`` pool tiles of true class ``c`` to which the
    seed's baseline gives ``c`` the highest probability, with their true labels."""
    from histodiff.evaluate.controls import baseline_proba
    from histodiff.evaluate.downstream import Extra

    def build(seed: int, baseline_state: dict) -> Extra:
        probs = baseline_proba(recipe, num_classes, baseline_state, pool_x).numpy()
        picked = []
        for c, n in enumerate(counts):
            idx = np.flatnonzero(pool_y == c)
            picked.append(idx[np.argsort(-probs[idx, c], kind="stable")[:n]])
        idx = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
        return Extra(pool_x[idx], pool_y[idx].astype(np.int64))

    return build


def teaching_stats(labels: np.ndarray, truth: np.ndarray, baseline_probs: np.ndarray,
                   num_classes: int) -> dict[str, float]:
    """Return the shares of extra tiles whose label is right, that the baseline already predicts, and that teach
    (right and not already predicted), plus the teaching tiles per class; ``labels`` are class ids."""
    if len(labels) == 0:
        return {"right": float("nan"), "agree": float("nan"), "teach": float("nan"), "teach_per_class": 0.0}
    right, agree = truth == labels, baseline_probs.argmax(-1) == labels
    teach = right & ~agree
    return {"right": float(right.mean()), "agree": float(agree.mean()), "teach": float(teach.mean()),
            "teach_per_class": float(teach.sum() / num_classes)}


def _truth(data: Data, judge: Any) -> Callable[[np.ndarray], np.ndarray]:
    """Return a function giving tiles' true class ids: the pool's labels for pool tiles, the judge's for others."""
    from histodiff.data import shards
    from histodiff.train.backbone import predict_proba

    pool = data.idx["pool"]
    known = {shards.pixel_sha1(t): int(y) for t, y in zip(data.x[pool], data.y[pool])}

    def truth(tiles: np.ndarray) -> np.ndarray:
        out = np.array([known.get(shards.pixel_sha1(t), -1) for t in tiles], np.int64)
        if (unknown := out < 0).any():
            out[unknown] = predict_proba(judge, shards.to_model_range(tiles[unknown]), 32).argmax(-1).numpy()
        return out

    return truth


def run_cell(data: Data, cfg: Any, judge: Any, seeds: list[int]) -> dict[str, Any]:
    """Return one (budget, draw)'s outcomes (baseline and ``ARMS`` x seeds) and each arm's teaching stats per seed;
    the per-cell stages of the recipe run first, as the validation runs them (``validation_cell.run_chain``)."""
    from bench.validation_cell import run_chain
    from histodiff.evaluate import controls
    from histodiff.evaluate.downstream import evaluate_arms, ray_runner
    from histodiff.train.backbone import class_ids

    chain = run_chain(data, cfg)
    splits, augmented, counts, recipe = chain.splits, chain.augmented, chain.counts, chain.recipe
    pool_x, pool_y, k = chain.pool_x, chain.pool_y, len(chain.splits.classes)
    arms = {"augmented": augmented, "pseudo_label": controls.pseudo_label(pool_x, recipe, counts, k),
            "oracle_confident": oracle_confident(pool_x, pool_y, recipe, counts, k),
            "oracle": controls.random_per_class(pool_x, pool_y, counts, cfg.seed)}
    outcomes, states = evaluate_arms(splits, arms, recipe, seeds, ray_runner(cfg.ray.cpus_per_worker, recipe.use_gpu))
    truth = _truth(data, judge)
    stats: dict[str, list[dict[str, float]]] = {}
    for name, arm in arms.items():
        for seed in seeds:
            extra = arm(seed, states[seed]) if callable(arm) else arm  # the same tiles the arm trained on
            probs = controls.baseline_proba(recipe, k, states[seed], extra.x).numpy()
            stats.setdefault(name, []).append(teaching_stats(class_ids(extra.y), truth(extra.x), probs, k))
    return {"outcomes": [dataclasses.asdict(o) for o in outcomes], "stats": stats,
            "accepted_per_class": float(counts.sum() / k),
            "augmented_judge_precision": judged_precision(judge, augmented.x, class_ids(augmented.y))}


def diagnose(workdir: str, protocol: Protocol) -> dict[str, dict[str, Any]]:
    """Return {budget: {arm: gain, interval, mean teaching stats}} over the protocol's draws and seeds, training
    what no finished diagnosis cell holds (the generator and judge of the workdir are reused, or trained)."""
    from bench.validation import pretrain_generator, train_judge
    from bench.validation_report import arm_figures
    from histodiff.runtime import init_ray
    from histodiff.storage import Store, join

    data = prepare_data(workdir, protocol)
    init_ray(cell_config(data, protocol, None))
    pretrain_generator(data, protocol)  # finished stages are skipped by fingerprint
    judge = train_judge(data, protocol)
    store, out = Store(), {}
    for budget in protocol.budgets:
        cells = []
        for draw in range(protocol.draws):
            path = join(data.root, f"{protocol.variant}diagnosis", f"b{budget}-d{draw}.json")  # a variant's apart
            key = f"{VERSION}-{cell_key(protocol, budget, draw)}"
            cell = store.read_json(path) if store.exists(path) else None
            if cell is None or cell.get("key") != key:
                t0 = time.time()
                cell = run_cell(data, cell_config(data, protocol, budget, draw), judge, list(protocol.seeds))
                cell.update(key=key, budget=budget, draw=draw, seconds=round(time.time() - t0))
                store.write_json(path, cell)
            log.info("diagnosis %d labels, draw %d: done", budget, draw)
            cells.append(cell)
        row: dict[str, Any] = {"accepted_per_class": round(float(np.mean([c["accepted_per_class"] for c in cells])), 1),
                               "draws": len(cells), "seeds": len(protocol.seeds)}
        for arm in ARMS:
            gain = arm_figures(cells, arm)
            stats = [s for c in cells for s in c["stats"][arm]]
            row[arm] = {"gain": [round(gain[k], 1) for k in ("gain_points", "gain_ci_low", "gain_ci_high")],
                        **{k: round(float(np.nanmean([s[k] for s in stats])), 3) for k in stats[0]}}
        out[str(budget)] = row
    return out


def table_markdown(rows: dict[str, dict[str, Any]]) -> str:
    """Return one markdown table per budget: a row per arm."""
    out = []
    for budget, row in rows.items():
        out += [f"{budget} labels per class ({row['draws']} draws x {row['seeds']} seeds, "
                f"{row['accepted_per_class']} extra tiles per class):",
                "| arm | gain [95% CI over draws] | label right | baseline already agrees | teaching | "
                "teaching tiles/class |", "|---|---|---|---|---|---|"]
        for arm in ARMS:
            a = row[arm]
            g = a["gain"]
            out.append(f"| {arm} | {g[0]:+.1f} [{g[1]:+.1f}, {g[2]:+.1f}] | {a['right']:.2f} | {a['agree']:.2f} | "
                       f"{a['teach']:.2f} | {a['teach_per_class']:.1f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None, protocol: Protocol | None = None) -> int:
    protocol = protocol or Protocol()
    from bench.common import machine
    from bench.runner import code_version, merge_into
    from histodiff.cli import int_list

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="bench/_work/validate/full",
                   help="the workdir of `histodiff bench validate` (or empty: its generator and judge are trained)")
    p.add_argument("--budgets", type=int_list, default=(5, 10), metavar="N,N",
                   help="labels per class, comma-separated")
    p.add_argument("--output", default="bench/results.json")
    args = p.parse_args(argv)
    try:
        protocol = protocol.at_budgets(args.budgets)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    code = code_version()
    rows = diagnose(os.path.abspath(args.workdir), protocol)
    print(table_markdown(rows))
    merge_into(args.output, {"validate_diagnosis": {
        "value": rows, "unit": "points and shares", "measured": f"{datetime.now(timezone.utc):%Y-%m-%d} {machine()}, "
                                                                 f"{code}",
        "goal": "informational (issue 15): why an arm gains what it gains; per arm at the augmented arm's volume: "
                "gain [95% t-interval over draws], the share of extra tiles whose label is right, that each seed's "
                "baseline already predicts, and that teach (right and not already predicted)"}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
