"""Stage ``pseudolabel``: label the most confident pool tiles from the few labels, in the denoiser's feature space.

The pretrained denoiser reads the labeled train split's latents and the pool's latents at
``pseudo_labels.timestep`` (:func:`histodiff.augment.pool_labels.denoiser_features`); each pool
tile gets a vote of its ``k`` nearest labeled tiles, and the ``per_class`` most confident per
class are written to ``pseudo_labels.parquet`` (tile sha1, label, confidence). The latent
classifier, the selector and the anchors of anchored synthesis can learn from them
(``pseudo_labels.use_in``). With ``per_class: 0`` the stage writes an empty set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict

from histodiff.augment.synthesize import ModelRef
from histodiff.checkpoint import model_meta
from histodiff.config import HistodiffConfig, PseudoLabelConfig
from histodiff.data.encode import LatentsRef, latents_ref
from histodiff.data.splits import SplitSpec, split_spec
from histodiff.runner import Context, Spec as StageSpec, StageResult, upstream_fingerprint
from histodiff.storage import Store, join

log = logging.getLogger(__name__)

VERSION = 1
TABLE = "pseudo_labels.parquet"
SCHEMA = pa.schema([("sha1", pa.string()), ("label", pa.string()), ("confidence", pa.float64())])


class Spec(StageSpec):
    """The settings, the denoiser (by hash), the pool's and the labeled tiles' latents, the labeled split."""

    settings: PseudoLabelConfig
    denoiser: ModelRef | None
    pool: LatentsRef | None
    labeled: LatentsRef | None
    split: SplitSpec | None
    seed: int


@dataclass
class Result(StageResult):
    """Where the pseudo-labels went and how many per class."""

    pseudo_labels_uri: str
    per_class: dict[str, int] = field(default_factory=dict)
    mean_confidence: float = 0.0


def spec(cfg: HistodiffConfig, store: Store) -> Spec:
    """Return the spec; with ``pseudo_labels.per_class: 0`` it names no input (the stage writes nothing to use)."""
    settings, paths = cfg.pseudo_labels, cfg.paths
    if settings.per_class == 0:
        return Spec(output_uri=paths.pseudo_labels, settings=settings, denoiser=None, pool=None, labeled=None,
                    split=None, seed=cfg.seed)
    meta = model_meta(paths.denoiser, store, "`histodiff run pretrain`")
    return Spec(output_uri=paths.pseudo_labels, settings=settings,
                denoiser=ModelRef(uri=paths.denoiser, sha256=meta["sha256"]),
                pool=latents_ref(paths.latents, store), labeled=latents_ref(join(paths.labeled_latents, "train"), store),
                split=split_spec(cfg, store), seed=cfg.seed)


def labeled_train_latents(spec: Spec, store: Store) -> tuple[torch.Tensor, torch.Tensor, list[str], set[str]]:
    """Return (scaled latents, label ids, class names) of the labeled train split, and the sha1s of every
    labeled tile (train, validation and test), which never get a pseudo-label."""
    from histodiff.data.shards import pixel_sha1
    from histodiff.data.splits import labeled_splits
    from histodiff.train.latent_classifier import select_latents

    splits = labeled_splits(spec.split, store)
    tiles, _, classes = splits["train"]
    z, y = select_latents(spec.labeled.uri, store, [pixel_sha1(t) for t in tiles], classes)
    labeled = {pixel_sha1(t) for part in splits.values() for t in part[0]}
    return z * spec.labeled.scale_factor, y, classes, labeled


def work(spec: Spec, ctx: Context) -> Result:
    """Propagate the labels to the pool in the denoiser's feature space; write the most confident per class."""
    from diffusers import UNet2DModel

    from histodiff.augment.pool_labels import denoiser_features, most_confident, propagate
    from histodiff.checkpoint import load_exported
    from histodiff.data.encode import load_latents
    from histodiff.data.shards import write_table

    out = join(spec.output_uri, TABLE)
    if spec.denoiser is None:
        write_table(SCHEMA.empty_table(), out, ctx.store)
        return Result(out)
    s = spec.settings
    unet, _ = load_exported(UNet2DModel, spec.denoiser.uri, ctx.store)
    labeled_z, labeled_y, classes, labeled_sha1 = labeled_train_latents(spec, ctx.store)
    pool_z, _, pool_sha1, _ = load_latents(spec.pool.uri, ctx.store)
    # A pool tile that is also a labeled tile (a validation or test tile above all) is never pseudo-labeled:
    # model selection and the test score must not learn from their own tiles.
    keep = [i for i, s in enumerate(pool_sha1) if s not in labeled_sha1]
    pool_z, pool_sha1 = pool_z[keep], [pool_sha1[i] for i in keep]
    feats = denoiser_features(unet, torch.cat([labeled_z, pool_z * spec.pool.scale_factor]), s.timestep, spec.seed)
    probs = propagate(feats[: len(labeled_z)], labeled_y, feats[len(labeled_z):], len(classes), s.k, s.temperature)
    idx, labels, conf = most_confident(probs, s.per_class)
    table = pa.table({"sha1": [pool_sha1[i] for i in idx.tolist()], "label": [classes[i] for i in labels.tolist()],
                      "confidence": conf.double().numpy()}, schema=SCHEMA)
    write_table(table, out, ctx.store)
    per_class = {c: int((labels == k).sum()) for k, c in enumerate(classes)}
    ctx.tracker.log_metrics({"mean_confidence": float(conf.mean()) if len(conf) else 0.0,
                             **{f"pseudo_labels/{c}": n for c, n in per_class.items()}})
    log.info("pseudo-labels from the pool: %s (mean confidence %.3f)", per_class, float(conf.mean()) if len(conf) else 0)
    return Result(out, per_class, float(conf.mean()) if len(conf) else 0.0)


class PseudoLabelsRef(BaseModel):
    """A finished pseudo-label table, by location and by the fingerprint of the stage that wrote it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    fingerprint: str


def pseudo_labels_ref(cfg: HistodiffConfig, store: Store, user: str) -> PseudoLabelsRef | None:
    """Return the pseudo-labels a stage (``user``: classifier, selector, anchors) learns from, or None when off."""
    settings = cfg.pseudo_labels
    if settings.per_class == 0 or user not in settings.use_in:
        return None
    fingerprint = upstream_fingerprint(cfg.paths.pseudo_labels, store, "pseudolabel")
    return PseudoLabelsRef(uri=join(cfg.paths.pseudo_labels, TABLE), fingerprint=fingerprint)


def load_pseudo_labels(ref: PseudoLabelsRef | None, store: Store, classes: list[str]) -> dict | None:
    """Return {sha1, label_ids, confidence} lists of the pseudo-labels (None when ``ref`` is None)."""
    if ref is None:
        return None
    table = store.read_parquet(ref.uri)
    unknown = sorted(set(table.column("label").to_pylist()) - set(classes))
    if unknown:
        raise ValueError(f"pseudo-labels at {ref.uri!r} name classes {unknown} outside {classes}; rerun pseudolabel")
    return {"sha1": table.column("sha1").to_pylist(),
            "label_ids": [classes.index(c) for c in table.column("label").to_pylist()],
            "confidence": table.column("confidence").to_pylist()}
