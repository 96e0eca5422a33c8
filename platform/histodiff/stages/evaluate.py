"""Stage ``evaluate``: a timm classifier on real tiles vs real + synthetic tiles, and controls, K seeds.

The protocol is :mod:`histodiff.evaluate.downstream` (equal optimizer steps per arm, model
selection on validation only, the test split touched once, one Ray task per (arm, seed)). The
``augmented`` arm adds every accepted synthetic tile; the controls named in
``evaluation.controls`` (:mod:`histodiff.evaluate.controls`) get the same per-class volume, and
every extra set is mixed in class by class (``evaluation.synthetic_fraction``). The stage writes the
table, the confusion matrices and the quality report, and returns the paired gains.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from histodiff.config import HistodiffConfig
from histodiff.data import shards
from histodiff.data.splits import SplitSpec, split_spec
from histodiff.evaluate import controls, quality
from histodiff.evaluate.downstream import (ArmOutcome, Recipe, check_labels, evaluate_arms, format_table,
                                           load_splits, load_synthetic, ray_runner)
from histodiff.evaluate.metrics import summarise
from histodiff.models.backbone import check_backbone_name
from histodiff.plots import confusion_figure, figure_png, labeled_grid_figure
from histodiff.runner import Context, Spec as StageSpec, StageResult
from histodiff.stages.synthesize import GENERATED
from histodiff.storage import Store, join

log = logging.getLogger(__name__)

VERSION = 1


class SyntheticSet(BaseModel):
    """The accepted synthetic tiles, by location and content (their manifest's fingerprint)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    fingerprint: str


class Spec(StageSpec):
    """The recipe, the seeds, the labeled split, the synthetic set and how much of it to use, quality settings."""

    recipe: Recipe
    seeds: list[int]
    seed: int
    split: SplitSpec
    synthetic: SyntheticSet | None
    generated: SyntheticSet | None
    pool: SyntheticSet | None
    controls: list[str]
    synthetic_weighting: Literal["none", "confidence"]
    fid_extractor: Literal["baseline", "inception"]
    inception_weights_uri: str | None
    memorisation_pairs: int


@dataclass
class Result(StageResult):
    """Per-arm outcomes, their mean/std, and each arm's gain over the baseline."""

    output_uri: str
    classes: list[str]
    outcomes: list[ArmOutcome]
    summary: dict[str, dict[str, list[float]]]
    gains: dict[str, dict[str, dict]]
    quality: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Result":
        """Return a result from its JSON form."""
        return cls(**{**data, "outcomes": [ArmOutcome(**o) for o in data["outcomes"]]})

    def table(self) -> str:
        """Return the print-ready table of the arms and the gains."""
        return format_table(self.summary, self.gains, len({o.seed for o in self.outcomes}))


def _tile_set(uri: str | None, store: Store) -> SyntheticSet | None:
    if not uri or not store.exists(join(uri, shards.MANIFEST)):
        return None
    manifest = shards.read_manifest(uri, store)
    return SyntheticSet(uri=uri, fingerprint=manifest.fingerprint or str(manifest.num_tiles))


def spec(cfg: HistodiffConfig, store: Store) -> Spec:
    """Return the evaluation spec; the synthetic tiles must be complete when ``synthetic_fraction`` > 0."""
    ev = cfg.evaluation
    check_backbone_name(ev.backbone)
    synthetic = generated = pool = None
    controls = list(ev.controls)
    if ev.synthetic_fraction > 0:
        uri = join(cfg.paths.synthetic, "accepted")
        synthetic = _tile_set(uri, store)
        if synthetic is None:
            raise FileNotFoundError(f"no accepted synthetic tiles at {uri!r} (no {shards.MANIFEST}); run "
                                    "`histodiff run synthesize` first, or set evaluation.synthetic_fraction=0 "
                                    "for a baseline-only evaluation")
        if "unfiltered" in controls:
            generated = _tile_set(join(cfg.paths.synthetic, GENERATED), store)
            if generated is None:
                raise FileNotFoundError(f"the unfiltered control needs every generated tile at "
                                        f"{join(cfg.paths.synthetic, GENERATED)!r}; rerun synthesize with "
                                        "synthesis.keep_rejected=true or drop 'unfiltered' from evaluation.controls")
        if "pseudo_label" in controls:
            pool = _tile_set(cfg.paths.unlabeled_shards, store)
            if pool is None:
                raise FileNotFoundError(f"the pseudo_label control labels the unlabeled pool at "
                                        f"{cfg.paths.unlabeled_shards!r}, which holds no complete tile shards")
    else:
        controls = []
    return Spec(output_uri=cfg.paths.evaluation, recipe=Recipe.from_config(cfg), seeds=list(ev.seeds), seed=cfg.seed,
                split=split_spec(cfg, store), synthetic=synthetic, generated=generated, pool=pool, controls=controls,
                synthetic_weighting=ev.synthetic_weighting,
                fid_extractor=ev.fid_extractor, inception_weights_uri=ev.inception_weights_uri,
                memorisation_pairs=ev.memorisation_pairs)


def control_arms(spec: Spec, store: Store, splits: Any, counts: np.ndarray) -> dict[str, Any]:
    """Return the control arms named in the spec, each at ``counts[c]`` tiles of class ``c``."""
    arms: dict[str, Any] = {}
    for name in spec.controls:
        if name == "unfiltered":
            generated = load_synthetic(spec.generated.uri, store, splits.classes)
            arms[name] = controls.random_per_class(generated.x, generated.y, counts, spec.seed)
        elif name == "duplicated_real":
            arms[name] = controls.duplicated_real(splits, counts)
        elif name == "classical_aug":
            arms[name] = controls.classical_aug(splits, counts, spec.recipe.augment, spec.seed)
        elif name == "pseudo_label":
            pool_x, _ = shards.load_tiles(spec.pool.uri, store)
            arms[name] = controls.pseudo_label(pool_x, spec.recipe, counts, len(splits.classes))
    return arms


def work(spec: Spec, ctx: Context) -> Result:
    """Train the baseline, the augmented arm and the controls over the seeds; return and write the comparison."""
    splits = load_splits(spec.split, ctx.store)
    check_labels("real train split", [splits.classes[i] for i in splits.train_y], splits.classes, require_all=True)
    arms: dict[str, Any] = {}
    syn_x = None
    if spec.synthetic is not None:
        augmented = load_synthetic(spec.synthetic.uri, ctx.store, splits.classes, spec.synthetic_weighting)
        arms["augmented"] = augmented
        syn_x = augmented.x
        arms.update(control_arms(spec, ctx.store, splits, controls.class_counts(augmented.y, len(splits.classes))))
    outcomes, states = evaluate_arms(splits, arms, spec.recipe, spec.seeds,
                                     ray_runner(ctx.ray.cpus_per_worker, spec.recipe.use_gpu))
    summary, gains = summarise(outcomes)
    result = Result(spec.output_uri, splits.classes, outcomes, summary, gains)
    if syn_x is not None and len(syn_x) >= 2:
        result.quality = _quality(spec, ctx, splits.train_x, syn_x, states[spec.seeds[0]], len(splits.classes))
    _write(spec, ctx, result)
    return result


def _quality(spec: Spec, ctx: Context, real: np.ndarray, fake: np.ndarray, state: dict | None,
             num_classes: int) -> dict[str, Any]:
    recipe = spec.recipe
    extractor, name = quality.make_extractor(spec.fid_extractor, spec.inception_weights_uri, ctx.store, recipe.backbone,
                                             recipe.image_size, state, num_classes)
    summary, memo = quality.quality_report(real, fake, extractor, name)
    out = join(spec.output_uri, "quality")
    hist = figure_png(quality.histogram_figure(memo))
    ctx.store.write_bytes(join(out, "memorisation_hist.png"), hist)
    ctx.tracker.log_png(hist, "quality/memorisation_hist.png")
    pairs = figure_png(labeled_grid_figure(quality.closest_pairs(real, fake, memo, spec.memorisation_pairs),
                                           "synthetic tiles closest to a real training tile (copy check)"))
    ctx.store.write_bytes(join(out, "closest_pairs.png"), pairs)
    ctx.tracker.log_png(pairs, "quality/closest_pairs.png")
    ctx.store.write_json(join(out, "memorisation.json"), memo)
    return summary


def _write(spec: Spec, ctx: Context, result: Result) -> None:
    """Write plots, the table and the JSON result; log them to MLflow."""
    out = result.output_uri
    table = result.table()
    for arm in result.summary:
        cm = np.sum([o.test["confusion_matrix"] for o in result.outcomes if o.arm == arm], axis=0)
        png = figure_png(confusion_figure(cm.tolist(), result.classes, f"{arm}: test confusion\n(summed over seeds)"))
        ctx.tracker.log_png(png, f"confusion_{arm}.png")
        ctx.store.write_bytes(join(out, f"confusion_{arm}.png"), png)
    # The figures (percent, points) are logged by the runner: histodiff.headline.evaluation_figures.
    ctx.tracker.log_text(table, "evaluation_table.txt")
    ctx.tracker.log_dict(asdict(result), "evaluation.json")
    ctx.store.write_bytes(join(out, "table.txt"), (table + "\n").encode())
    ctx.store.write_json(join(out, "evaluation.json"), asdict(result))
