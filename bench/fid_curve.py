"""Is the generator trained enough? The denoiser's loss and FID against the pool at several step counts.

Issue 15, lever 4. On the validation's pool (its autoencoder, latents and noise schedule), one
denoiser run is continued to each step count in turn: the pretrain stage names its Ray Train
run without the step count, so raising ``denoiser.steps`` resumes from the last complete
checkpoint (recorded as ``resumed_from``), and the learning rate is constant after warmup, so a
continued run is the run a larger ``denoiser.steps`` would have trained. After each step count:
the probe loss on a fixed batch of latents, FID and KID of ``--samples`` unguided samples
against the pool (torchmetrics, the validation judge's pre-logit features as the extractor: a
classifier trained on the pool's true labels, so these FIDs compare only with each other), and
the share of samples the judge calls each digit (a generator that covers the pool gives 0.1
each). Writes a plot of FID and probe loss against steps beside the table.

    python -m bench.fid_curve --steps 500,1000,2000,3000

It trains in its own workdir (default ``bench/_work/fid_curve``): the validation's generator is
never overwritten, and a rerun skips the step counts it finished (the stage's fingerprint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from typing import Any

import numpy as np

from bench.validation import CLASSES, Protocol, sample_unguided, cell_config, prepare_data, train_judge

log = logging.getLogger(__name__)


def curve(workdir: str, protocol: Protocol, steps: list[int], n_samples: int, seed: int = 7) -> dict[str, Any]:
    """Return {step count: {probe_loss, final_loss, fid, kid_mean, class_share_min_max, resumed_from, seconds}},
    the extractor's name, and the sample and pool sizes."""
    from histodiff.data import shards
    from histodiff.evaluate.quality import BackboneFeatures, fid_kid
    from histodiff.runner import run_stage
    from histodiff.runtime import init_ray
    from histodiff.stages import autoencoder, encode, pretrain
    from histodiff.train.backbone import predict_proba

    data = prepare_data(workdir, protocol)
    pool = data.x[data.idx["pool"]]
    judge = train_judge(data, protocol)
    extractor = BackboneFeatures(judge, 32)
    rows: dict[str, dict[str, Any]] = {}
    for n_steps in sorted(steps):
        t0 = time.time()
        # The recipe's generator config at this step count (as a base override, not a variant: a variant would
        # train a generator of its own in another folder instead of continuing this one).
        at = dataclasses.replace(protocol, base_overrides=(*protocol.base_overrides, f"denoiser.steps={n_steps}"))
        cfg = cell_config(data, at, None)
        init_ray(cfg)
        for stage in (autoencoder, encode):
            run_stage(stage, cfg)  # trained once; skipped by fingerprint at every later step count
        result = run_stage(pretrain, cfg)
        tiles = sample_unguided(cfg, n_samples, seed)
        scores = fid_kid(pool, tiles, extractor)
        pred = predict_proba(judge, shards.to_model_range(tiles), 32).argmax(-1).numpy()
        share = np.bincount(pred, minlength=len(CLASSES)) / len(pred)
        rows[str(n_steps)] = {
            "probe_loss": round(float(result.probe_losses[-1][1]), 4) if result.probe_losses else None,
            "final_loss": result.final_loss, "fid": round(scores["fid"], 2), "kid_mean": round(scores["kid_mean"], 4),
            "class_share_min_max": [round(float(share.min()), 3), round(float(share.max()), 3)],
            "resumed_from": [int(r[0]) for r in result.resumed_from], "seconds": round(time.time() - t0)}
        log.info("fid curve: %d denoiser steps: %s", n_steps, rows[str(n_steps)])
    return {"extractor": f"validation judge ({protocol.judge_backbone}, {protocol.judge_steps} steps on the pool's "
                         f"true labels), val balanced accuracy {data.extra['judge_val_bacc']:.3f}",
            "samples": n_samples, "pool": len(pool), "steps": rows}


def plot(table: dict[str, Any], path: str) -> None:
    """Write FID and probe loss against denoiser steps as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(s) for s in table["steps"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, [r["fid"] for r in table["steps"].values()], "o-", color="tab:blue")
    ax.set_xlabel("denoiser steps")
    ax.set_ylabel("FID vs pool (judge features)", color="tab:blue")
    loss = [r["probe_loss"] for r in table["steps"].values()]
    if all(v is not None for v in loss):
        twin = ax.twinx()
        twin.plot(steps, loss, "s--", color="tab:red")
        twin.set_ylabel("probe loss", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None, protocol: Protocol = Protocol()) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="bench/_work/fid_curve")
    p.add_argument("--steps", default="500,1000,2000,3000", help="denoiser steps, comma-separated")
    p.add_argument("--samples", type=int, default=1000, help="unguided samples per step count")
    p.add_argument("--output", default=None, help="write the table here as JSON (and the plot beside it as .png)")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    if not steps or min(steps) < 1 or args.samples < 2:
        p.error(f"--steps {args.steps!r} and --samples {args.samples}: need positive step counts and >= 2 samples")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.time()
    table = curve(os.path.abspath(args.workdir), protocol, steps, args.samples)
    table["seconds"] = round(time.time() - t0)
    print(json.dumps(table, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(table, f, indent=1)
        plot(table, os.path.splitext(args.output)[0] + ".png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
