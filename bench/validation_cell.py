"""One cell of the validation (a label budget x a label draw): the method's stages, then every arm.

Each cell runs the chain as a user runs it (``classifier``, ``selector``, ``synthesize`` through
the stage runner), builds the augmented arm and the six controls at the augmented arm's per-class
volume (:mod:`histodiff.evaluate.controls`), and trains them all over the protocol's seeds with
the same recipe (:func:`histodiff.evaluate.downstream.evaluate_arms`, one Ray task per run).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from histodiff.config import HistodiffConfig
from histodiff.data import shards
from histodiff.evaluate import controls
from histodiff.evaluate.downstream import Extra, Recipe, evaluate_arms, load_splits, load_synthetic, ray_runner
from histodiff.storage import Store

log = logging.getLogger(__name__)


def select_unguided(selector: Any, tiles: np.ndarray, mode: str, threshold: float, counts: np.ndarray) -> Extra:
    """Return the unguided tiles the selector accepts, per class in pool order, up to ``counts[c]``.

    An unguided sample has no target: it is offered to the class it is most like under the rule
    (the selector's argmax, or the nearest centroid), and passes that class's rule as a guided
    sample passes its target's.
    """
    import torch.nn.functional as F

    from histodiff.augment.selection import centroid_rule, confidence_rule

    probs, feats = selector.judge(shards.to_model_range(tiles))
    if mode == "centroid":
        target = (F.normalize(feats.float(), dim=-1) @ selector.centroids.float().T).argmax(-1)
        passed, _ = centroid_rule(feats, target, selector.centroids)
    else:
        target = probs.argmax(-1)
        passed, _ = confidence_rule(probs, target, threshold if mode == "confidence" else 0.0)
    target, passed = target.numpy(), passed.numpy()
    picked = [np.flatnonzero((target == c) & passed)[:n] for c, n in enumerate(counts)]
    idx = np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
    return Extra(tiles[idx], target[idx].astype(np.int64))


def _probes(cfg: HistodiffConfig, splits: Any, store: Store) -> dict[str, float]:
    """Return the cheap baselines' test accuracy: kNN and a linear probe on the autoencoder's latents and on the
    pretrained denoiser's features (if a probe alone beats the method, the table says so)."""
    from diffusers import AutoencoderKL, UNet2DModel

    from histodiff.augment.pool_labels import denoiser_features
    from histodiff.checkpoint import load_exported
    from histodiff.evaluate.baselines import autoencoder_features, probe_baselines

    vae, _ = load_exported(AutoencoderKL, cfg.paths.autoencoder, store)
    unet, meta = load_exported(UNet2DModel, cfg.paths.denoiser, store)

    def denoiser(tiles: np.ndarray) -> Any:
        z = autoencoder_features(vae, tiles).view(len(tiles), *meta["latent_shape"]) * float(meta["scale_factor"])
        return denoiser_features(unet, z, cfg.pseudo_labels.timestep, cfg.seed)

    seeds = list(cfg.evaluation.seeds)
    got = {**probe_baselines(splits, lambda tiles: autoencoder_features(vae, tiles), cfg.evaluation.knn_k, seeds),
           **{f"denoiser_{k.split('_', 1)[1]}": v
              for k, v in probe_baselines(splits, denoiser, cfg.evaluation.knn_k, seeds).items()}}
    return {name: float(np.mean([m["accuracy"] for m in runs])) for name, runs in got.items()}


def _pseudo_label_precision(cfg: HistodiffConfig, data: Any, store: Store) -> float:
    """Return the fraction of the pool's pseudo-labels that are right (the validation knows the pool's labels)."""
    from histodiff.stages.pseudolabel import TABLE

    if cfg.pseudo_labels.per_class == 0:
        return float("nan")
    table = store.read_parquet(f"{cfg.paths.pseudo_labels}/{TABLE}")
    truth = {shards.pixel_sha1(t): str(y) for t, y in zip(data.x[data.idx["pool"]], data.y[data.idx["pool"]])}
    labels = table.column("label").to_pylist()
    return float(np.mean([truth[s] == lab for s, lab in zip(table.column("sha1").to_pylist(), labels)])) \
        if labels else float("nan")


@dataclasses.dataclass
class Chain:
    """A cell's chain as a user runs it: the per-cell stages' results, the real splits, the accepted synthetic
    tiles with their per-class volume (every arm's), the downstream recipe, and the pool (tiles, true labels)."""

    classifier: Any
    selector: Any
    synthesis: Any
    splits: Any
    augmented: Extra
    counts: np.ndarray
    recipe: Recipe
    pool_x: np.ndarray
    pool_y: np.ndarray


def run_chain(data: Any, cfg: HistodiffConfig) -> Chain:
    """Run a cell's per-cell stages (pseudo-labels, latent classifier, selector, synthesis; each skipped when
    finished with the same spec) and return what its arms are built from."""
    from histodiff.data.splits import split_spec
    from histodiff.runner import run_stage
    from histodiff.stages import classifier, pseudolabel, selector, synthesize

    store = Store(cfg.storage)
    run_stage(pseudolabel, cfg)
    clf = run_stage(classifier, cfg)
    sel = run_stage(selector, cfg)
    syn = run_stage(synthesize, cfg)
    splits = load_splits(split_spec(cfg, store), store)
    augmented = load_synthetic(syn.accepted_uri, store, splits.classes, cfg.evaluation.synthetic_weighting)
    pool = data.idx["pool"]
    return Chain(clf, sel, syn, splits, augmented, controls.class_counts(augmented.y, len(splits.classes)),
                 Recipe.from_config(cfg), data.x[pool], data.y[pool])


def run_cell(data: Any, cfg: HistodiffConfig, judge: Any, unguided: np.ndarray,
             only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Return one cell's outcomes (every arm x seed, or the baseline and the arms in ``only``), its synthesis
    report and its guidance precision."""
    from bench.validation import judged_precision
    from histodiff.augment.selection import load_selector

    store = Store(cfg.storage)
    chain = run_chain(data, cfg)
    clf, sel, syn, splits, augmented = chain.classifier, chain.selector, chain.synthesis, chain.splits, chain.augmented
    counts, recipe, pool_x, pool_y, k = chain.counts, chain.recipe, chain.pool_x, chain.pool_y, len(splits.classes)
    generated = load_synthetic(syn.generated_uri, store, splits.classes)
    syn_x, syn_y, gen_x, gen_y = augmented.x, augmented.y, generated.x, generated.y
    selector_model, _ = load_selector(cfg.paths.selector, store)
    mode, threshold = cfg.synthesis.selector.mode, cfg.synthesis.selector.threshold
    arms = {
        "augmented": augmented,
        "unfiltered": controls.random_per_class(gen_x, gen_y, counts, cfg.seed),
        "unguided_selected": select_unguided(selector_model, unguided, mode, threshold, counts),
        "duplicated_real": controls.duplicated_real(splits, counts),
        "classical_aug": controls.classical_aug(splits, counts, recipe.augment, cfg.seed),
        "pseudo_label": controls.pseudo_label(pool_x, recipe, counts, k),
        "oracle": controls.random_per_class(pool_x, pool_y, counts, cfg.seed),
    }
    if only is not None:
        if unknown := sorted(set(only) - set(arms)):
            raise ValueError(f"validation arms {unknown} unknown: choose from {sorted(arms)}")
        arms = {name: arm for name, arm in arms.items() if name in only}
    outcomes, _ = evaluate_arms(splits, arms, recipe, list(cfg.evaluation.seeds),
                                ray_runner(cfg.ray.cpus_per_worker, recipe.use_gpu))
    report = store.read_json(f"{cfg.paths.synthetic}/report.json")
    volumes = {name: int(len(arm)) for name, arm in arms.items() if not callable(arm)}
    log.info("validation cell %s: accepted %d of quota %d, volumes %s", cfg.name, int(counts.sum()),
             cfg.synthesis.accepted_per_class * k, volumes)
    return {
        "outcomes": [dataclasses.asdict(o) for o in outcomes],
        "synthesis": report, "volumes": volumes, "accepted_total": int(counts.sum()),
        "nothing_accepted": bool(counts.sum() == 0),
        "precision_guided": judged_precision(judge, gen_x, gen_y),
        "precision_guided_accepted": judged_precision(judge, syn_x, syn_y),
        "selector_val_bacc": sel.val_balanced_accuracy, "classifier_val_accuracy": clf.val_accuracy,
        "probes": _probes(cfg, splits, store),
        "pseudo_label_precision": _pseudo_label_precision(cfg, data, store),
    }
