"""Synthesis stage: guided DDIM per class, decode, select, until N per class are accepted.

Work items are (class, batch index); each tile's noise comes from its own seed (a hash of the
config seed, the class and its position), so a tile never depends on the batch it ran in or
on which Ray actor ran it. Batches are taken per class in index order until ``accepted_per_class``
tiles pass (or ``max_samples_per_class`` is spent); batches run ahead by parallel actors past
that point are dropped, so the output depends on the config only. Outputs under
``cfg.paths.synthetic``: ``accepted/`` tile shards (manifest last), ``lineage.parquet`` (one row
per generated tile) and ``report.json``; the acceptance plot and grids go to MLflow.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from histodiff import storage
from histodiff.checkpoint import load_exported, model_meta
from histodiff.config import HistodiffConfig, config_from_dict
from histodiff.data import shards

log = logging.getLogger(__name__)

STAGE = "synthesize"
LINEAGE = "lineage.parquet"
REPORT = "report.json"
LINEAGE_SCHEMA = pa.schema([
    ("tile_id", pa.string()), ("class", pa.string()), ("batch", pa.int32()), ("seed", pa.int64()),
    ("guidance_scale", pa.float64()), ("steps", pa.int32()), ("eta", pa.float64()),
    ("denoiser_sha256", pa.string()), ("autoencoder_sha256", pa.string()), ("classifier_sha256", pa.string()),
    ("selector_sha256", pa.string()), ("selection_mode", pa.string()), ("selector_score", pa.float64()),
    ("passed_rule", pa.bool_()), ("accepted", pa.bool_()),
])


@dataclass
class SynthesisResult:
    """Where the accepted tiles and the lineage went, and per-class counts."""

    accepted_uri: str
    lineage_uri: str
    generated: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    skipped: bool = False


def tile_seed(seed: int, cls: str, index: int) -> int:
    """Return the deterministic seed of the ``index``-th generated tile of class ``cls``."""
    return int(hashlib.sha256(f"{seed}/{cls}/{index}".encode()).hexdigest()[:15], 16)


def check_inputs(cfg: HistodiffConfig) -> dict[str, dict]:
    """Return the metas of the denoiser, autoencoder and classifier, or raise one clear error per problem."""
    s = cfg.synthesis
    if s.guidance_scale < 0:
        raise ValueError(f"synthesis.guidance_scale={s.guidance_scale} is negative; use 0 (unguided) or more")
    if not 0.0 <= s.selector.threshold <= 1.0:
        raise ValueError(f"synthesis.selector.threshold={s.selector.threshold} is outside [0, 1]")
    metas = {name: model_meta(uri, cfg.storage) for name, uri in
             (("denoiser", cfg.paths.denoiser), ("autoencoder", cfg.paths.autoencoder),
              ("classifier", cfg.paths.classifier))}
    ae = metas["autoencoder"]["sha256"]
    for name in ("denoiser", "classifier"):
        theirs = metas[name].get("autoencoder_sha256")
        if theirs != ae:
            raise ValueError(
                f"the {name} at {getattr(cfg.paths, name)!r} was trained on latents of autoencoder "
                f"{str(theirs)[:12]}, but paths.autoencoder={cfg.paths.autoencoder!r} is {ae[:12]}; "
                f"retrain the {name} on the current latents or point paths.autoencoder at the matching export")
    known = metas["classifier"]["classes"]
    unknown = [c for c in (s.classes or []) if c not in known]
    if unknown:
        raise ValueError(f"synthesis.classes {unknown} are not classes of the latent classifier {known}")
    return metas


def _fingerprint(cfg: HistodiffConfig, hashes: dict[str, str]) -> str:
    data = {"synthesis": cfg.public_dict()["synthesis"], "seed": cfg.seed, "hashes": hashes}
    return storage.sha256_bytes(repr(sorted(data.items())).encode())[:16]


class SynthesisWorker:
    """Ray actor (or plain object): holds the models once, turns one work item into judged tiles."""

    def __init__(self, cfg_dict: dict) -> None:
        from diffusers import AutoencoderKL, UNet2DModel

        from histodiff.augment.selection import load_selector
        from histodiff.models.latent_classifier import LatentClassifier
        from histodiff.runtime import device_for

        self.cfg = config_from_dict(cfg_dict)
        c = self.cfg
        self.device = device_for(c.ray.use_gpu)
        self.unet, self.unet_meta = load_exported(UNet2DModel, c.paths.denoiser, c.storage)
        self.vae, _ = load_exported(AutoencoderKL, c.paths.autoencoder, c.storage)
        self.classifier, cmeta = load_exported(LatentClassifier, c.paths.classifier, c.storage)
        self.classes = cmeta["classes"]
        self.selector, _ = load_selector(c.paths.selector, c.storage, self.device)
        for m in (self.unet, self.vae, self.classifier):
            m.to(self.device).eval().requires_grad_(False)

    def generate(self, item: dict) -> dict:
        """Return {class, batch, seeds, tiles (uint8 NHWC), score, passed} for one work item."""
        from histodiff.diffusion.guidance import classifier_grad_fn
        from histodiff.diffusion.sampling import ddim_sample
        from histodiff.diffusion.schedule import ddim_scheduler
        from histodiff.runtime import autocast

        s = self.cfg.synthesis
        seeds = item["seeds"]
        y = self.classes.index(item["class"])
        shape = (len(seeds), *self.unet_meta["latent_shape"])
        cond_fn = classifier_grad_fn(self.classifier, torch.full((len(seeds),), y), s.guidance_scale)
        z = ddim_sample(self.unet, ddim_scheduler(self.cfg.denoiser.schedule), shape,
                        [torch.Generator().manual_seed(sd) for sd in seeds], s.num_inference_steps, s.eta,
                        cond_fn=cond_fn, device=self.device, autocast=autocast(self.device))
        with torch.no_grad():
            images = self.vae.decode(z / float(self.unet_meta["scale_factor"])).sample.float()
        tiles = shards.to_uint8(images)
        # Judge exactly what is written: the 8-bit tiles.
        passed, score = self.selector.select(shards.to_model_range(tiles), torch.full((len(seeds),), y),
                                             s.selector.mode, s.selector.threshold)
        return {"class": item["class"], "batch": item["batch"], "indices": item["indices"], "seeds": seeds,
                "tiles": tiles, "score": score.numpy(), "passed": passed.numpy()}


def _items(cfg: HistodiffConfig, cls: str, batch: int) -> dict:
    s = cfg.synthesis
    start = batch * s.batch_size
    n = min(s.batch_size, s.max_samples_per_class - start)
    indices = list(range(start, start + n))
    return {"class": cls, "batch": batch, "indices": indices, "seeds": [tile_seed(cfg.seed, cls, i) for i in indices]}


def generate_all(cfg: HistodiffConfig, classes: list[str], workers: list[Any], use_ray: bool) -> dict[str, list[dict]]:
    """Return per class the judged batches, in batch order, up to the one that reaches the quota."""
    from tqdm.auto import tqdm

    s = cfg.synthesis
    n_batches = math.ceil(s.max_samples_per_class / s.batch_size)
    results: dict[str, dict[int, dict]] = {c: {} for c in classes}
    next_batch = {c: 0 for c in classes}
    wave = max(1, len(workers))

    def finished(c: str) -> bool:
        passed = 0
        for b in range(n_batches):
            if b not in results[c]:
                return False
            passed += int(results[c][b]["passed"].sum())
            if passed >= s.accepted_per_class:
                return True
        return True

    bar = tqdm(total=len(classes) * s.max_samples_per_class, desc="synthesis", unit="tile")
    while True:
        todo = []
        for c in classes:
            while not finished(c) and next_batch[c] < n_batches and sum(i["class"] == c for i in todo) < wave:
                todo.append(_items(cfg, c, next_batch[c]))
                next_batch[c] += 1
        if not todo:
            break
        if use_ray:
            from ray.util import ActorPool

            outs = list(ActorPool(workers).map_unordered(lambda a, it: a.generate.remote(it), todo))
        else:
            outs = [workers[0].generate(it) for it in todo]
        for out in outs:
            results[out["class"]][out["batch"]] = out
            bar.update(len(out["seeds"]))
    bar.close()
    kept: dict[str, list[dict]] = {}
    for c in classes:
        kept[c], passed = [], 0
        for b in sorted(results[c]):
            if passed >= s.accepted_per_class:
                break  # run ahead by a parallel actor: dropped so the output depends on the config only
            kept[c].append(results[c][b])
            passed += int(results[c][b]["passed"].sum())
    return kept


def ensure_selector(cfg: HistodiffConfig) -> str:
    """Return the sha256 of the selector at ``paths.selector``, training and exporting it when stale."""
    from histodiff.augment.selection import SELECTOR_META, export_selector, train_selector
    from histodiff.data.splits import labeled_splits
    from histodiff.runtime import device_for

    sel = cfg.synthesis.selector
    manifest = shards.read_manifest(cfg.paths.labeled_shards, cfg.storage)
    key = {"selector": {k: getattr(sel, k) for k in ("backbone", "epochs", "lr", "batch_size")}, "seed": cfg.seed,
           "data": cfg.public_dict()["data"], "labeled": manifest.fingerprint or manifest.num_tiles}
    fingerprint = storage.sha256_bytes(repr(sorted(key.items())).encode())[:16]
    meta_uri = storage.join(cfg.paths.selector, SELECTOR_META)
    if storage.exists(meta_uri, cfg.storage):
        meta = storage.read_json(meta_uri, cfg.storage)
        if meta.get("fingerprint") == fingerprint:
            return meta["sha256"]
    splits = labeled_splits(cfg)
    (tx, ty, classes), (vx, vy, _) = splits["train"], splits["val"]
    selector = train_selector(cfg, shards.to_model_range(tx), torch.from_numpy(ty), shards.to_model_range(vx),
                              torch.from_numpy(vy), classes, device_for(cfg.ray.use_gpu))
    return export_selector(selector, cfg.paths.selector, {"fingerprint": fingerprint}, cfg.storage)


def _lineage_and_accepted(cfg: HistodiffConfig, kept: dict[str, list[dict]], hashes: dict[str, str],
                          fingerprint: str) -> tuple[pa.Table, dict[str, np.ndarray], dict[str, dict]]:
    from histodiff.augment.selection import cap_by_score

    s = cfg.synthesis
    cap = s.accepted_per_class if s.selector.max_per_class is None else min(s.accepted_per_class,
                                                                             s.selector.max_per_class)
    rows: dict[str, list] = {name: [] for name in LINEAGE_SCHEMA.names}
    accepted_tiles, report = {}, {}
    for c, batches in kept.items():
        if not batches:
            continue
        passed = torch.from_numpy(np.concatenate([b["passed"] for b in batches]))
        score = torch.from_numpy(np.concatenate([b["score"] for b in batches]))
        accepted = cap_by_score(passed, score, cap).numpy()
        tiles = np.concatenate([b["tiles"] for b in batches])
        seeds = [sd for b in batches for sd in b["seeds"]]
        batch_ids = [b["batch"] for b in batches for _ in b["seeds"]]
        indices = [i for b in batches for i in b["indices"]]
        for i, (sd, b, index) in enumerate(zip(seeds, batch_ids, indices)):
            rows["tile_id"].append(f"syn-{fingerprint[:8]}-{c}-{index:06d}")
            rows["class"].append(c)
            rows["batch"].append(b)
            rows["seed"].append(sd)
            rows["guidance_scale"].append(s.guidance_scale)
            rows["steps"].append(s.num_inference_steps)
            rows["eta"].append(s.eta)
            for name in ("denoiser", "autoencoder", "classifier", "selector"):
                rows[f"{name}_sha256"].append(hashes[name])
            rows["selection_mode"].append(s.selector.mode)
            rows["selector_score"].append(float(score[i]))
            rows["passed_rule"].append(bool(passed[i]))
            rows["accepted"].append(bool(accepted[i]))
        accepted_tiles[c] = tiles[accepted]
        report[c] = {"generated": len(seeds), "passed_rule": int(passed.sum()), "accepted": int(accepted.sum()),
                     "acceptance_rate": float(accepted.mean()),
                     "score_histogram": np.histogram(score.numpy(), bins=10, range=(0.0, 1.0))[0].tolist()}
    return pa.Table.from_pydict(rows, schema=LINEAGE_SCHEMA), accepted_tiles, report


def _write_outputs(cfg: HistodiffConfig, lineage: pa.Table, accepted: dict[str, np.ndarray], report: dict,
                   fingerprint: str) -> None:
    out = storage.join(cfg.paths.synthetic, "accepted")
    ids = {c: [tid for tid, cl, a in zip(lineage["tile_id"].to_pylist(), lineage["class"].to_pylist(),
                                         lineage["accepted"].to_pylist()) if a and cl == c] for c in accepted}
    tiles = [t for c in accepted for t in accepted[c]]
    labels = [c for c in accepted for _ in accepted[c]]
    sources = [tid for c in accepted for tid in ids[c]]
    names, per = [], cfg.data.tiles_per_shard
    for k, start in enumerate(range(0, len(tiles), per)):
        names.append(shards.shard_name(k))
        shards.write_table(shards.tiles_table(tiles[start:start + per], labels[start:start + per], "synthetic",
                                              sources[start:start + per]), storage.join(out, names[-1]), cfg.storage)
    shards.write_table(lineage, storage.join(cfg.paths.synthetic, LINEAGE), cfg.storage)
    storage.write_json(storage.join(cfg.paths.synthetic, REPORT), report, cfg.storage)
    size = int(tiles[0].shape[0]) if tiles else cfg.data.tile_size
    shards.write_manifest(shards.Manifest(uri=out, shards=names, num_tiles=len(tiles), classes=sorted(accepted),
                                          tile_size=size, report=report, fingerprint=fingerprint,
                                          extra={"lineage": LINEAGE}), cfg.storage)


def _log_report(tracker: Any, report: dict, accepted: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(report)), figsize=(3.2 * max(1, len(report)), 2.6), squeeze=False)
    for ax, (c, r) in zip(axes[0], report.items()):
        ax.bar(np.linspace(0.05, 0.95, 10), r["score_histogram"], width=0.09)
        ax.set(title=f"{c}: {r['accepted']}/{r['generated']} accepted", xlabel="selector score", xlim=(0, 1))
    tracker.log_figure(fig, "acceptance/score_histograms.png")
    plt.close(fig)
    tracker.log_dict(report, "acceptance/report.json")
    for c, tiles in accepted.items():
        if len(tiles):
            n = min(len(tiles), 32)
            cols = min(n, 8)
            grid = np.zeros((math.ceil(n / cols) * tiles.shape[1], cols * tiles.shape[2], 3), np.uint8)
            for i in range(n):
                r, q = divmod(i, cols)
                grid[r * tiles.shape[1]:(r + 1) * tiles.shape[1], q * tiles.shape[2]:(q + 1) * tiles.shape[2]] = tiles[i]
            tracker.log_image(grid, f"acceptance/accepted_{c}.png")
    totals = {f"accepted/{c}": r["accepted"] for c, r in report.items()}
    tracker.log_metrics({**totals, **{f"acceptance_rate/{c}": r["acceptance_rate"] for c, r in report.items()}})


def run(cfg: HistodiffConfig) -> SynthesisResult:
    """Generate, select and write synthetic tiles per class with lineage; skip when already complete."""
    import time

    from histodiff import tracking
    from histodiff.runtime import init_ray

    metas = check_inputs(cfg)
    accepted_uri = storage.join(cfg.paths.synthetic, "accepted")
    lineage_uri = storage.join(cfg.paths.synthetic, LINEAGE)
    hashes = {k: metas[k]["sha256"] for k in metas}
    hashes["selector"] = ensure_selector(cfg)
    from histodiff.augment.selection import SELECTOR_META

    selector_classes = storage.read_json(storage.join(cfg.paths.selector, SELECTOR_META), cfg.storage)["classes"]
    if selector_classes != metas["classifier"]["classes"]:
        raise ValueError(f"the selector's classes {selector_classes} differ from the latent classifier's "
                         f"{metas['classifier']['classes']}; retrain both on the same labeled shards")
    fingerprint = _fingerprint(cfg, hashes)
    if storage.exists(storage.join(accepted_uri, shards.MANIFEST), cfg.storage):
        done = shards.read_manifest(accepted_uri, cfg.storage)
        if done.fingerprint == fingerprint:
            log.info("synthetic tiles at %s are up to date; skipping", accepted_uri)
            return SynthesisResult(accepted_uri, lineage_uri, {c: r["generated"] for c, r in done.report.items()},
                                   {c: r["accepted"] for c, r in done.report.items()}, skipped=True)
    classes = cfg.synthesis.classes or metas["classifier"]["classes"]
    t0 = time.perf_counter()
    init_ray(cfg)
    import ray

    with tracking.stage_run(cfg, STAGE, params={f"{k}_sha256": v for k, v in hashes.items()}) as tracker:
        actor = ray.remote(SynthesisWorker).options(num_cpus=cfg.ray.cpus_per_worker,
                                                    num_gpus=1 if cfg.ray.use_gpu else 0)
        workers = [actor.remote(cfg.public_dict()) for _ in range(cfg.synthesis.num_actors)]
        try:
            kept = generate_all(cfg, classes, workers, use_ray=True)
        finally:
            for w in workers:
                ray.kill(w)
        lineage, accepted, report = _lineage_and_accepted(cfg, kept, hashes, fingerprint)
        _write_outputs(cfg, lineage, accepted, report, fingerprint)
        seconds = time.perf_counter() - t0
        tracker.log_metrics({"seconds": seconds, "accepted_tiles_per_s": sum(map(len, accepted.values())) / seconds})
        _log_report(tracker, report, accepted)
    log.info("synthesis: %s", {c: f"{r['accepted']}/{r['generated']}" for c, r in report.items()})
    rejected = [c for c, r in report.items() if r["accepted"] == 0]
    if rejected:
        log.warning("the selector accepted no tile of class(es) %s (threshold %s): see the score histograms in %s; "
                    "lower synthesis.selector.threshold or raise synthesis.guidance_scale", rejected,
                    cfg.synthesis.selector.threshold, lineage_uri)
    return SynthesisResult(accepted_uri, lineage_uri, {c: r["generated"] for c, r in report.items()},
                           {c: r["accepted"] for c, r in report.items()}, seconds)
