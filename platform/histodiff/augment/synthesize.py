"""Guided synthesis, judged: DDIM per class in latent space, decode, the selector's verdict, lineage.

Work items are (class, batch index); each tile's noise comes from its own seed (a hash of the
seed, the class and its position), so a tile never depends on the batch it ran in or on which
Ray actor ran it. Batches are taken per class in index order until ``accepted_per_class``
tiles pass the rule (or ``max_samples_per_class`` is spent); batches run ahead by parallel
actors past that point are dropped, so the output depends on the spec only. The ``synthesize``
stage (:mod:`histodiff.stages.synthesize`) drives this and writes the outputs.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict

from histodiff.config import ScheduleConfig
from histodiff.data import shards

log = logging.getLogger(__name__)

LINEAGE_SCHEMA = pa.schema([
    ("tile_id", pa.string()), ("class", pa.string()), ("batch", pa.int32()), ("seed", pa.int64()),
    ("guidance_scale", pa.float64()), ("steps", pa.int32()), ("eta", pa.float64()),
    ("denoiser_sha256", pa.string()), ("autoencoder_sha256", pa.string()), ("classifier_sha256", pa.string()),
    ("selector_sha256", pa.string()), ("selection_mode", pa.string()), ("selector_score", pa.float64()),
    ("passed_rule", pa.bool_()), ("accepted", pa.bool_()), ("strength", pa.float64()), ("anchor", pa.string()),
])
MODEL_KINDS = ("denoiser", "autoencoder", "classifier", "selector")


class ModelRef(BaseModel):
    """An exported model by location and content hash."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    sha256: str


class SamplingSpec(BaseModel):
    """How a synthetic tile is generated: guided DDIM with these settings on this noise schedule."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    guidance_scale: float
    num_inference_steps: int
    eta: float
    schedule: ScheduleConfig
    strength: float = 1.0


class SelectionSpec(BaseModel):
    """How a synthetic tile is judged: the rule, its threshold, and the per-class cap."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["confidence", "centroid", "none"]
    threshold: float
    max_per_class: int | None


class AnchorSpec(BaseModel):
    """Where anchored synthesis takes its anchors: latents directories and, per class, the tiles (by sha1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latents_uris: list[str]
    scale_factor: float
    sha1s: dict[str, list[str]]


class SynthesisPlan(BaseModel):
    """Everything a synthesis worker needs: the models, the classes, the quota, sampling and selection."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    models: dict[str, ModelRef]
    classes: list[str]
    accepted_per_class: int
    max_samples_per_class: int
    batch_size: int
    seed: int
    sampling: SamplingSpec
    selection: SelectionSpec
    anchors: AnchorSpec | None = None


def tile_seed(seed: int, cls: str, index: int) -> int:
    """Return the deterministic seed of the ``index``-th generated tile of class ``cls``."""
    return int(hashlib.sha256(f"{seed}/{cls}/{index}".encode()).hexdigest()[:15], 16)


def work_item(plan: SynthesisPlan, cls: str, batch: int) -> dict:
    """Return the work item of one batch of one class: its tile indices, their seeds (and anchors)."""
    start = batch * plan.batch_size
    n = min(plan.batch_size, plan.max_samples_per_class - start)
    indices = list(range(start, start + n))
    item = {"class": cls, "batch": batch, "indices": indices, "seeds": [tile_seed(plan.seed, cls, i) for i in indices],
            "anchors": [""] * n}
    if plan.anchors is not None and plan.sampling.strength < 1.0:
        pool = plan.anchors.sha1s.get(cls) or []
        if not pool:
            raise ValueError(f"anchored synthesis has no anchor tile of class {cls!r}")
        item["anchors"] = [pool[i % len(pool)] for i in indices]  # the anchors in turn, each with several variants
    return item


class SynthesisWorker:
    """Ray actor (or plain object): holds the models once, turns one work item into judged tiles."""

    def __init__(self, plan: SynthesisPlan, store: Any, use_gpu: bool) -> None:
        from diffusers import AutoencoderKL, UNet2DModel

        from histodiff.augment.selection import load_selector
        from histodiff.checkpoint import load_exported
        from histodiff.models.latent_classifier import LatentClassifier
        from histodiff.runtime import device_for

        self.plan = plan
        self.device = device_for(use_gpu)
        m = plan.models
        self.unet, self.unet_meta = load_exported(UNet2DModel, m["denoiser"].uri, store)
        self.vae, _ = load_exported(AutoencoderKL, m["autoencoder"].uri, store)
        self.classifier, cmeta = load_exported(LatentClassifier, m["classifier"].uri, store)
        self.classes = cmeta["classes"]
        self.selector, _ = load_selector(m["selector"].uri, store, self.device)
        for model in (self.unet, self.vae, self.classifier):
            model.to(self.device).eval().requires_grad_(False)
        self.anchor_latents: dict[str, torch.Tensor] = {}
        if plan.anchors is not None and plan.sampling.strength < 1.0:
            from histodiff.data.encode import load_latents

            wanted = {s for ss in plan.anchors.sha1s.values() for s in ss}
            for uri in plan.anchors.latents_uris:
                z, _, sha1s, _ = load_latents(uri, store)
                self.anchor_latents.update({s: z[i] * plan.anchors.scale_factor for i, s in enumerate(sha1s)
                                            if s in wanted})
            missing = wanted - set(self.anchor_latents)
            if missing:
                raise ValueError(f"{len(missing)} anchor tiles have no latent in {plan.anchors.latents_uris}; "
                                 "rerun `histodiff run encode`")

    def generate(self, item: dict) -> dict:
        """Return {class, batch, indices, seeds, tiles (uint8 NHWC), score, passed} for one work item."""
        from histodiff.diffusion.guidance import classifier_grad_fn
        from histodiff.diffusion.sampling import ddim_sample
        from histodiff.diffusion.schedule import ddim_scheduler
        from histodiff.runtime import autocast

        s, sel = self.plan.sampling, self.plan.selection
        seeds = item["seeds"]
        y = self.classes.index(item["class"])
        shape = (len(seeds), *self.unet_meta["latent_shape"])
        cond_fn = classifier_grad_fn(self.classifier, torch.full((len(seeds),), y), s.guidance_scale)
        anchors = torch.stack([self.anchor_latents[a] for a in item["anchors"]]) if self.anchor_latents else None
        z = ddim_sample(self.unet, ddim_scheduler(s.schedule), shape,
                        [torch.Generator().manual_seed(sd) for sd in seeds], s.num_inference_steps, s.eta,
                        cond_fn=cond_fn, device=self.device, autocast=autocast(self.device), anchors=anchors,
                        strength=s.strength)
        with torch.no_grad():
            images = self.vae.decode(z / float(self.unet_meta["scale_factor"])).sample.float()
        tiles = shards.to_uint8(images)
        # Judge exactly what is written: the 8-bit tiles.
        passed, score = self.selector.select(shards.to_model_range(tiles), torch.full((len(seeds),), y),
                                             sel.mode, sel.threshold)
        return {**item, "tiles": tiles, "score": score.numpy(), "passed": passed.numpy()}


def generate_all(plan: SynthesisPlan, workers: list[Any], use_ray: bool) -> dict[str, list[dict]]:
    """Return per class the judged batches, in batch order, up to the one that reaches the quota."""
    from histodiff import console

    n_batches = math.ceil(plan.max_samples_per_class / plan.batch_size)
    results: dict[str, dict[int, dict]] = {c: {} for c in plan.classes}
    next_batch = {c: 0 for c in plan.classes}
    wave = max(1, len(workers))

    def finished(c: str) -> bool:
        passed = 0
        for b in range(n_batches):
            if b not in results[c]:
                return False
            passed += int(results[c][b]["passed"].sum())
            if passed >= plan.accepted_per_class:
                return True
        return True

    # Counts generated tiles against the most the plan may generate; reaching every class's quota
    # early is the normal end, and the closing line says so rather than stopping at 67%.
    bar = console.Progress("synthesize", len(plan.classes) * plan.max_samples_per_class, "tiles")
    generated = 0
    while True:
        todo = []
        for c in plan.classes:
            while not finished(c) and next_batch[c] < n_batches and sum(i["class"] == c for i in todo) < wave:
                todo.append(work_item(plan, c, next_batch[c]))
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
            generated += len(out["seeds"])
            passed = sum(int(b["passed"].sum()) for r in results.values() for b in r.values())
            bar.update(generated, {"passed": passed, "selectivity_pct": 100 * passed / generated})
    early = generated < bar.total
    bar.finish(f"quota reached after {generated} generated tiles" if early else "all batches generated")
    kept: dict[str, list[dict]] = {}
    for c in plan.classes:
        kept[c], passed = [], 0
        for b in sorted(results[c]):
            if passed >= plan.accepted_per_class:
                break  # run ahead by a parallel actor: dropped so the output depends on the spec only
            kept[c].append(results[c][b])
            passed += int(results[c][b]["passed"].sum())
    return kept


def keep_mask(passed: np.ndarray, score: np.ndarray, mode: str, cap: int) -> np.ndarray:
    """Return which tiles are kept: mode ``none`` the first ``cap`` in generation order (no ranking by any
    classifier: the unfiltered control), otherwise the ``cap`` best-scoring tiles that passed the rule."""
    from histodiff.augment.selection import cap_by_score

    if mode == "none":
        keep = np.zeros(len(passed), bool)
        keep[:cap] = True
        return keep
    return cap_by_score(torch.from_numpy(passed), torch.from_numpy(score), cap).numpy()


def lineage_and_accepted(plan: SynthesisPlan, kept: dict[str, list[dict]], prefix: str
                         ) -> tuple[pa.Table, dict[str, dict[str, Any]], dict[str, dict]]:
    """Return (lineage: a row per generated tile, per class {tiles, ids, accepted mask}, the report).

    The report separates the selector's **selectivity** (passed / generated) from the **quota fill**
    (accepted / ``accepted_per_class``): a rule that passes nearly everything still fills the quota
    and stops, and a class that cannot fill it is reported with its numbers.
    """
    s, sel = plan.sampling, plan.selection
    cap = plan.accepted_per_class if sel.max_per_class is None else min(plan.accepted_per_class, sel.max_per_class)
    rows: dict[str, list] = {name: [] for name in LINEAGE_SCHEMA.names}
    per_class, report = {}, {}
    for c, batches in kept.items():
        if not batches:
            continue
        passed = np.concatenate([b["passed"] for b in batches]).astype(bool)
        score = np.concatenate([b["score"] for b in batches])
        accepted = keep_mask(passed, score, sel.mode, cap)
        ids = [f"syn-{prefix}-{c}-{i:06d}" for b in batches for i in b["indices"]]
        anchor_ids = [a for b in batches for a in b["anchors"]]
        seeds = [sd for b in batches for sd in b["seeds"]]
        batch_ids = [b["batch"] for b in batches for _ in b["seeds"]]
        for i, (sd, b) in enumerate(zip(seeds, batch_ids)):
            for name, value in (("tile_id", ids[i]), ("class", c), ("batch", b), ("seed", sd),
                                ("guidance_scale", s.guidance_scale), ("steps", s.num_inference_steps),
                                ("eta", s.eta), ("selection_mode", sel.mode), ("selector_score", float(score[i])),
                                ("passed_rule", bool(passed[i])), ("accepted", bool(accepted[i])),
                                ("strength", s.strength), ("anchor", anchor_ids[i])):
                rows[name].append(value)
            for kind in MODEL_KINDS:
                rows[f"{kind}_sha256"].append(plan.models[kind].sha256)
        per_class[c] = {"tiles": np.concatenate([b["tiles"] for b in batches]), "ids": ids, "accepted": accepted}
        n = len(seeds)
        report[c] = {"generated": n, "passed_rule": int(passed.sum()), "accepted": int(accepted.sum()),
                     "quota": plan.accepted_per_class, "selectivity": float(passed.sum()) / n,
                     "quota_fill": float(accepted.sum()) / plan.accepted_per_class,
                     "score_histogram": np.histogram(score, bins=10, range=(0.0, 1.0))[0].tolist()}
    return pa.Table.from_pydict(rows, schema=LINEAGE_SCHEMA), per_class, report
