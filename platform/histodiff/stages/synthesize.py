"""Stage ``synthesize``: guided synthesis per class, judged by the selector, until N per class are accepted.

Outputs under ``paths.synthetic``: ``accepted/`` tile shards (manifest last), ``lineage.parquet``
(one row per generated tile, with every model's hash) and ``report.json``; the acceptance plot
and grids go to MLflow. The math and the work items are :mod:`histodiff.augment.synthesize`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from histodiff.augment.synthesize import (MODEL_KINDS, ModelRef, SamplingSpec, SelectionSpec, SynthesisPlan,
                                          SynthesisWorker, generate_all, lineage_and_accepted)
from histodiff.checkpoint import model_meta
from histodiff.config import HistodiffConfig
from histodiff.data import shards
from histodiff.headline import metric_name
from histodiff.plots import acceptance_figure, labeled_grid_figure
from histodiff.runner import Context, Spec as StageSpec, StageResult
from histodiff.storage import Store, join

log = logging.getLogger(__name__)

VERSION = 1
LINEAGE = "lineage.parquet"
REPORT = "report.json"
_MAKER = {"denoiser": "`histodiff run pretrain`", "autoencoder": "`histodiff run autoencoder`",
          "classifier": "`histodiff run classifier`", "selector": "`histodiff run selector`"}


class Spec(StageSpec):
    """The synthesis plan (models by hash, classes, quota, sampling, selection) and how to shard it."""

    plan: SynthesisPlan
    num_actors: int
    tiles_per_shard: int


@dataclass
class Result(StageResult):
    """Where the accepted tiles and the lineage went, and per-class counts."""

    accepted_uri: str
    lineage_uri: str
    generated: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)


def spec(cfg: HistodiffConfig, store: Store) -> Spec:
    """Return the synthesis spec after checking the four models exist and belong together."""
    paths, synthesis = cfg.paths, cfg.synthesis
    uris = {"denoiser": paths.denoiser, "autoencoder": paths.autoencoder, "classifier": paths.classifier, "selector": paths.selector}
    metas = {kind: model_meta(uris[kind], store, _MAKER[kind]) for kind in MODEL_KINDS}
    ae = metas["autoencoder"]["sha256"]
    for kind in ("denoiser", "classifier"):
        theirs = metas[kind].get("autoencoder_sha256")
        if theirs != ae:
            raise ValueError(
                f"the {kind} at {uris[kind]!r} was trained on latents of autoencoder {str(theirs)[:12]}, but "
                f"paths.autoencoder={paths.autoencoder!r} is {ae[:12]}; retrain the {kind} on the current latents "
                "or point paths.autoencoder at the matching export")
    known = metas["classifier"]["classes"]
    unknown = [c for c in (synthesis.classes or []) if c not in known]
    if unknown:
        raise ValueError(f"synthesis.classes {unknown} are not classes of the latent classifier {known}")
    if metas["selector"]["classes"] != known:
        raise ValueError(f"the selector's classes {metas['selector']['classes']} differ from the latent classifier's "
                         f"{known}; retrain both on the same labeled shards")
    plan = SynthesisPlan(
        models={k: ModelRef(uri=uris[k], sha256=metas[k]["sha256"]) for k in MODEL_KINDS},
        classes=synthesis.classes or known, accepted_per_class=synthesis.accepted_per_class,
        max_samples_per_class=synthesis.max_samples_per_class, batch_size=synthesis.batch_size, seed=cfg.seed,
        sampling=SamplingSpec(guidance_scale=synthesis.guidance_scale, num_inference_steps=synthesis.num_inference_steps, eta=synthesis.eta,
                              schedule=cfg.denoiser.schedule),
        selection=SelectionSpec(mode=synthesis.selector.mode, threshold=synthesis.selector.threshold,
                                max_per_class=synthesis.selector.max_per_class))
    return Spec(output_uri=paths.synthetic, plan=plan, num_actors=synthesis.num_actors, tiles_per_shard=cfg.data.tiles_per_shard)


def _write_outputs(spec: Spec, store: Store, lineage: pa.Table, accepted: dict[str, np.ndarray],
                   ids: dict[str, list[str]], report: dict) -> str:
    out = join(spec.output_uri, "accepted")
    store.delete(join(out, shards.MANIFEST))  # an older complete set must not look current while it is replaced
    tiles = [t for c in accepted for t in accepted[c]]
    labels = [c for c in accepted for _ in accepted[c]]
    sources = [tid for c in accepted for tid in ids[c]]
    names, per = [], spec.tiles_per_shard
    for k, start in enumerate(range(0, len(tiles), per)):
        names.append(shards.shard_name(k))
        shards.write_table(shards.tiles_table(tiles[start:start + per], labels[start:start + per], "synthetic",
                                              sources[start:start + per]), join(out, names[-1]), store)
    shards.write_table(lineage, join(spec.output_uri, LINEAGE), store)
    store.write_json(join(spec.output_uri, REPORT), report)
    size = int(tiles[0].shape[0]) if tiles else 0
    shards.write_manifest(shards.Manifest(uri=out, shards=names, num_tiles=len(tiles), classes=sorted(accepted),
                                          tile_size=size, report=report, fingerprint=lineage_fingerprint(lineage),
                                          extra={"lineage": LINEAGE}), store)
    return out


def lineage_fingerprint(lineage: pa.Table) -> str:
    """Return a short hash of which tiles were accepted (the identity of the synthetic set)."""
    accepted = [tid for tid, a in zip(lineage["tile_id"].to_pylist(), lineage["accepted"].to_pylist()) if a]
    return hashlib.sha256("\n".join(accepted).encode()).hexdigest()[:16]


def _log_report(ctx: Context, report: dict, accepted: dict[str, np.ndarray], threshold: float, quota: int) -> None:
    ctx.tracker.log_figure(acceptance_figure(report, threshold, quota), "acceptance/score_histograms.png")
    ctx.tracker.log_dict(report, "acceptance/report.json")
    rows = [(c, tiles[:8]) for c, tiles in accepted.items() if len(tiles)]
    if rows:  # one labelled row per class, upscaled: 32 px tiles at 1x are unreadable
        ctx.tracker.log_figure(labeled_grid_figure(rows, "accepted synthetic tiles (first 8 per class)"),
                               "acceptance/accepted_tiles.png")
    ctx.tracker.log_metrics({**{metric_name("accepted", c): r["accepted"] for c, r in report.items()},
                             **{metric_name("acceptance", c, "pct"): 100 * r["acceptance_rate"] for c, r in report.items()}})


def work(spec: Spec, ctx: Context) -> Result:
    """Generate, select and write synthetic tiles per class with their lineage."""
    import ray

    t0 = time.perf_counter()
    actor = ray.remote(SynthesisWorker).options(num_cpus=ctx.ray.cpus_per_worker,
                                                num_gpus=1 if ctx.ray.use_gpu else 0)
    workers = [actor.remote(spec.plan, ctx.store, ctx.ray.use_gpu) for _ in range(spec.num_actors)]
    try:
        kept = generate_all(spec.plan, workers, use_ray=True)
    finally:
        for w in workers:
            ray.kill(w)
    prefix = hashlib.sha256(spec.plan.model_dump_json().encode()).hexdigest()[:8]  # tile ids unique per plan
    lineage, accepted, ids, report = lineage_and_accepted(spec.plan, kept, prefix)
    accepted_uri = _write_outputs(spec, ctx.store, lineage, accepted, ids, report)
    seconds = time.perf_counter() - t0
    ctx.tracker.log_metrics({"accepted_tiles_per_s": sum(map(len, accepted.values())) / seconds})
    _log_report(ctx, report, accepted, spec.plan.selection.threshold, spec.plan.accepted_per_class)
    log.info("synthesis: %s", {c: f"{r['accepted']}/{r['generated']}" for c, r in report.items()})
    rejected = [c for c, r in report.items() if r["accepted"] == 0]
    if rejected:
        log.warning("the selector accepted no tile of class(es) %s (threshold %s): see the score histograms in %s; "
                    "lower synthesis.selector.threshold or raise synthesis.guidance_scale", rejected,
                    spec.plan.selection.threshold, join(spec.output_uri, LINEAGE))
    return Result(accepted_uri, join(spec.output_uri, LINEAGE), {c: r["generated"] for c, r in report.items()},
                  {c: r["accepted"] for c, r in report.items()})
