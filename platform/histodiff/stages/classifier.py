"""Stage ``classifier``: the noisy-latent classifier p(y | z_t, t) on the labeled train split, with Ray Train.

The worker side is :mod:`histodiff.train.latent_classifier`. After training, held-out
(validation split) accuracy is measured at ``classifier.eval_timesteps`` noise levels, logged
per t and as a plot, and the model is exported with {autoencoder_sha256, classes, mode}.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from histodiff import checkpoint as ckpt
from histodiff.config import HistodiffConfig, LatentClassifierConfig, ScheduleConfig
from histodiff.data.encode import LatentsRef, latents_ref
from histodiff.data.shards import pixel_sha1
from histodiff.data.splits import SplitSpec, labeled_splits, split_spec
from histodiff.stages.pseudolabel import PseudoLabelsRef, load_pseudo_labels, pseudo_labels_ref
from histodiff.diffusion.schedule import ddpm_scheduler
from histodiff.plots import line_figure
from histodiff.runner import Context, Spec as StageSpec, StageResult
from histodiff.storage import Store, join
from histodiff.train import common
from histodiff.train.latent_classifier import accuracy_at_timesteps, build_classifier, select_latents, train_loop

log = logging.getLogger(__name__)

VERSION = 1
MODELS = {"latent-classifier": "classifier_uri"}
KIND = "latent_classifier"


class Spec(StageSpec):
    """The classifier recipe, the noise schedule, the labeled split and its latents (by content)."""

    classifier: LatentClassifierConfig
    schedule: ScheduleConfig
    seed: int
    num_workers: int
    split: SplitSpec
    latents: LatentsRef
    pool: LatentsRef | None = None
    pseudo_labels: PseudoLabelsRef | None = None


@dataclass
class Result(StageResult):
    """Where the classifier went, its hash, and its held-out accuracy per timestep."""

    classifier_uri: str
    sha256: str
    classes: list[str]
    mode: str
    val_accuracy: dict[int, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Result":
        """Return a result from its JSON form (timesteps come back as ints)."""
        return cls(**{**data, "val_accuracy": {int(k): v for k, v in data.get("val_accuracy", {}).items()}})


def spec(cfg: HistodiffConfig, store: Store) -> Spec:
    """Return the classifier spec: the split of the labeled shards, the labeled latents' identity (and the
    pool's pseudo-labels when ``pseudo_labels.use_in`` names the classifier)."""
    pseudo = pseudo_labels_ref(cfg, store, "classifier")
    return Spec(output_uri=cfg.paths.classifier, classifier=cfg.classifier, schedule=cfg.denoiser.schedule,
                seed=cfg.seed, num_workers=cfg.ray.num_workers, split=split_spec(cfg, store),
                latents=latents_ref(join(cfg.paths.labeled_latents, "train"), store),
                pool=latents_ref(cfg.paths.latents, store) if pseudo else None, pseudo_labels=pseudo)


def run_name(spec: Spec, name: str) -> str:
    """Return the Ray Train run name: the run's name plus a hash of the spec without the cadences."""
    data = spec.model_dump(mode="json", exclude={"output_uri": True, "classifier": {
        "steps", "report_every", "checkpoint_every", "eval_timesteps"}})
    return f"{name}-classifier-{hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]}"


def work(spec: Spec, ctx: Context) -> Result:
    """Train the latent classifier with Ray Train, measure val accuracy per t, export it."""
    splits = labeled_splits(spec.split, ctx.store)
    (train_x, _, classes), (val_x, val_y, _) = splits["train"], splits["val"]
    if len(val_y) == 0:
        raise ValueError("the labeled validation split is empty: held-out accuracy needs data.val_fraction > 0")
    train_sha1, val_sha1 = [pixel_sha1(t) for t in train_x], [pixel_sha1(t) for t in val_x]
    ccfg, run = spec.classifier, run_name(spec, ctx.name)
    ctx.tracker.log_params({"classes": ",".join(classes), "train_latents": len(train_sha1)})
    loop_config = {"spec": spec, "store": ctx.store, "train_sha1": train_sha1, "classes": classes,
                   "pseudo": load_pseudo_labels(spec.pseudo_labels, ctx.store, classes)}
    common.build_trainer(ctx, train_loop, loop_config, run).fit()
    tensors, _ = common.final_checkpoint(ctx.checkpoints_uri, run, ctx.store, ccfg.steps, "classifier")
    model = build_classifier(ccfg, spec.latents.shape[0], len(classes))
    model.load_state_dict(tensors["model"])
    z, y = select_latents(spec.latents.uri, ctx.store, val_sha1, classes)
    acc = accuracy_at_timesteps(model, z * spec.latents.scale_factor, y, ddpm_scheduler(spec.schedule),
                                ccfg.eval_timesteps, spec.seed)
    for t, a in acc.items():
        ctx.tracker.log_metrics({"val_accuracy": a}, step=t)
    ctx.tracker.log_figure(line_figure({f"mode={ccfg.mode}": acc}, "timestep t", "validation accuracy",
                                       "latent classifier accuracy vs noise level", chance=1.0 / len(classes)),
                           "val_accuracy_vs_t.png")
    sha = ckpt.export_model(model, spec.output_uri, {
        "kind": KIND, "autoencoder_sha256": spec.latents.autoencoder_sha256, "classes": classes, "mode": ccfg.mode,
        "scale_factor": spec.latents.scale_factor, "val_accuracy": {str(k): v for k, v in acc.items()}}, ctx.store)
    ctx.tracker.set_tags({"classifier.sha256": sha, "classifier.uri": spec.output_uri})
    log.info("latent classifier (%s): val accuracy by t %s", ccfg.mode, acc)
    return Result(spec.output_uri, sha, classes, ccfg.mode, acc)
