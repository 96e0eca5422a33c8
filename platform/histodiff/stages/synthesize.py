"""Stage ``synthesize``: guided synthesis per class, judged by the selector, until N per class are accepted.

Outputs under ``paths.synthetic``: ``accepted/`` tile shards (manifest last), ``generated/``
(every generated tile, accepted or not, with ``synthesis.keep_rejected``: the unfiltered control
draws from it), ``lineage.parquet`` (one row per generated tile, with every model's hash) and
``report.json`` (per class: generated, passed, accepted, selectivity, quota fill); the acceptance
plot and grids go to MLflow. The math and the work items are :mod:`histodiff.augment.synthesize`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from histodiff.augment.synthesize import (MODEL_KINDS, AnchorSpec, ModelRef, SamplingSpec, SelectionSpec,
                                          SynthesisPlan, SynthesisWorker, generate_all, lineage_and_accepted)
from histodiff.checkpoint import model_meta
from histodiff.config import HistodiffConfig
from histodiff.data import shards
from histodiff.data.splits import SplitSpec, split_spec
from histodiff.headline import metric_name
from histodiff.plots import acceptance_figure, labeled_grid_figure
from histodiff.runner import Context, Spec as StageSpec, StageResult
from histodiff.storage import Store, join

log = logging.getLogger(__name__)

VERSION = 1
LINEAGE = "lineage.parquet"
REPORT = "report.json"
GENERATED = "generated"
_MAKER = {"denoiser": "`histodiff run pretrain`", "autoencoder": "`histodiff run autoencoder`",
          "classifier": "`histodiff run classifier`", "selector": "`histodiff run selector`"}


class Spec(StageSpec):
    """The synthesis plan (models by hash, classes, quota, sampling, selection) and how to shard it."""

    plan: SynthesisPlan
    num_actors: int
    tiles_per_shard: int
    keep_rejected: bool
    split: SplitSpec
    colour_drift_bound: float


@dataclass
class Result(StageResult):
    """Where the accepted tiles and the lineage went, and per-class counts."""

    accepted_uri: str
    lineage_uri: str
    generated: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    generated_uri: str | None = None


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
        sampling=SamplingSpec(guidance_scale=synthesis.guidance_scale, num_inference_steps=synthesis.num_inference_steps,
                              eta=synthesis.eta, schedule=cfg.denoiser.schedule, strength=synthesis.strength),
        selection=SelectionSpec(mode=synthesis.selector.mode, threshold=synthesis.selector.threshold,
                                max_per_class=synthesis.selector.max_per_class),
        anchors=anchor_spec(cfg, store) if synthesis.strength < 1.0 else None)
    return Spec(output_uri=paths.synthetic, plan=plan, num_actors=synthesis.num_actors,
                tiles_per_shard=cfg.data.tiles_per_shard, keep_rejected=synthesis.keep_rejected,
                split=split_spec(cfg, store), colour_drift_bound=synthesis.colour_drift_bound)


def write_tile_set(out: str, store: Store, tiles: list[np.ndarray], labels: list[str], sources: list[str],
                   tiles_per_shard: int, report: dict, extra: dict) -> None:
    """Write a synthetic tile set as tile shards (dataset ``synthetic``), its manifest last."""
    store.delete(join(out, shards.MANIFEST))  # an older complete set must not look current while it is replaced
    names = []
    for k, start in enumerate(range(0, len(tiles), tiles_per_shard)):
        names.append(shards.shard_name(k))
        stop = start + tiles_per_shard
        shards.write_table(shards.tiles_table(tiles[start:stop], labels[start:stop], "synthetic", sources[start:stop]),
                           join(out, names[-1]), store)
    fingerprint = hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]  # which tiles: the set's identity
    shards.write_manifest(shards.Manifest(uri=out, shards=names, num_tiles=len(tiles), classes=sorted(set(labels)),
                                          tile_size=int(tiles[0].shape[0]) if tiles else 0, report=report,
                                          fingerprint=fingerprint, extra=extra), store)


def anchor_spec(cfg: HistodiffConfig, store: Store) -> AnchorSpec:
    """Return the anchors of anchored synthesis: the labeled train split's tiles per class, by sha1, and their latents."""
    from histodiff.data.encode import latents_ref
    from histodiff.data.splits import labeled_splits

    from histodiff.stages.pseudolabel import load_pseudo_labels, pseudo_labels_ref

    tiles, ids, classes = labeled_splits(split_spec(cfg, store), store)["train"]
    latents = latents_ref(join(cfg.paths.labeled_latents, "train"), store)
    sha1s = {c: [shards.pixel_sha1(t) for t, i in zip(tiles, ids) if i == k] for k, c in enumerate(classes)}
    uris = [latents.uri]
    pseudo = load_pseudo_labels(pseudo_labels_ref(cfg, store, "anchors"), store, list(classes))
    if pseudo:  # the labeled tiles first, then the pool's most confident pseudo-labeled ones
        uris.append(cfg.paths.latents)
        for sha1, label in zip(pseudo["sha1"], pseudo["label_ids"]):
            sha1s[classes[label]].append(sha1)
    return AnchorSpec(latents_uris=uris, scale_factor=latents.scale_factor, sha1s=sha1s)


def _write_outputs(spec: Spec, store: Store, lineage: pa.Table, per_class: dict, report: dict) -> str:
    """Write lineage and report, the accepted set and (``keep_rejected``) every generated tile; return accepted/."""
    shards.write_table(lineage, join(spec.output_uri, LINEAGE), store)
    store.write_json(join(spec.output_uri, REPORT), report)
    if spec.keep_rejected:
        write_tile_set(join(spec.output_uri, GENERATED), store,
                       [t for c in per_class for t in per_class[c]["tiles"]],
                       [c for c in per_class for _ in per_class[c]["ids"]],
                       [i for c in per_class for i in per_class[c]["ids"]], spec.tiles_per_shard, report,
                       {"lineage": LINEAGE, "contents": "every generated tile, accepted or not"})
    out = join(spec.output_uri, "accepted")
    write_tile_set(out, store, [t for c in per_class for t in per_class[c]["tiles"][per_class[c]["accepted"]]],
                   [c for c in per_class for _ in range(int(per_class[c]["accepted"].sum()))],
                   [i for c in per_class for i, a in zip(per_class[c]["ids"], per_class[c]["accepted"]) if a],
                   spec.tiles_per_shard, report, {"lineage": LINEAGE})
    return out


def colour_fidelity(spec: Spec, store: Store, per_class: dict, report: dict, ctx: Context) -> None:
    """Add each class's colour drift (HED, LAB) to the report; flag and plot the classes past the bound."""
    from histodiff.data.splits import labeled_splits
    from histodiff.evaluate.colour import colour_figure, colour_report

    tiles, ids, classes = labeled_splits(spec.split, store)["train"]
    real = {c: tiles[ids == k] for k, c in enumerate(classes)}
    fake = {c: d["tiles"][d["accepted"]] for c, d in per_class.items() if d["accepted"].any()}
    colours = colour_report(real, fake, spec.colour_drift_bound)
    for c, r in colours.items():
        report[c]["colour"] = r
    ctx.tracker.log_metrics({metric_name("colour_drift", space, c): r[space] for c, r in colours.items()
                             for space in ("hed", "lab") if r[space] == r[space]})
    if fake:
        ctx.tracker.log_figure(colour_figure(real, fake, colours), "acceptance/colour_fidelity.png")
    drifted = {c: f"HED {r['hed']:.2f}, LAB {r['lab']:.2f}" for c, r in colours.items() if r["drifted"]}
    if drifted:
        log.warning("synthetic colours drift past synthesis.colour_drift_bound=%s for %s: see "
                    "acceptance/colour_fidelity.png in MLflow", spec.colour_drift_bound, drifted)


def _log_report(ctx: Context, report: dict, per_class: dict, threshold: float, quota: int) -> None:
    ctx.tracker.log_figure(acceptance_figure(report, threshold, quota), "acceptance/score_histograms.png")
    ctx.tracker.log_dict(report, "acceptance/report.json")
    rows = [(c, d["tiles"][d["accepted"]][:8]) for c, d in per_class.items() if d["accepted"].any()]
    if rows:  # one labelled row per class, upscaled: 32 px tiles at 1x are unreadable
        ctx.tracker.log_figure(labeled_grid_figure(rows, "accepted synthetic tiles (first 8 per class)"),
                               "acceptance/accepted_tiles.png")
    ctx.tracker.log_metrics({**{metric_name("accepted", c): r["accepted"] for c, r in report.items()},
                             **{metric_name("selectivity", c, "pct"): 100 * r["selectivity"] for c, r in report.items()},
                             **{metric_name("quota_fill", c, "pct"): 100 * r["quota_fill"] for c, r in report.items()}})


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
    lineage, per_class, report = lineage_and_accepted(spec.plan, kept, prefix)
    colour_fidelity(spec, ctx.store, per_class, report, ctx)
    accepted_uri = _write_outputs(spec, ctx.store, lineage, per_class, report)
    seconds = time.perf_counter() - t0
    ctx.tracker.log_metrics({"accepted_tiles_per_s": sum(r["accepted"] for r in report.values()) / seconds})
    _log_report(ctx, report, per_class, spec.plan.selection.threshold, spec.plan.accepted_per_class)
    log.info("synthesis (accepted/generated): %s", {c: f"{r['accepted']}/{r['generated']}" for c, r in report.items()})
    short = {c: f"{r['accepted']} of {r['quota']} ({r['passed_rule']} of {r['generated']} generated passed)"
             for c, r in report.items() if r["accepted"] < r["quota"]}
    if short:
        log.warning("class(es) short of the quota of %d: %s. Lower synthesis.selector.threshold, or raise "
                    "synthesis.max_samples_per_class or synthesis.guidance_scale; the score histograms are in MLflow "
                    "and every tile's score in %s", spec.plan.accepted_per_class, short,
                    join(spec.output_uri, LINEAGE))
    return Result(accepted_uri, join(spec.output_uri, LINEAGE), {c: r["generated"] for c, r in report.items()},
                  {c: r["accepted"] for c, r in report.items()},
                  join(spec.output_uri, GENERATED) if spec.keep_rejected else None)
