"""Ray Tune sweep of synthesis + evaluation over guidance scale x selection threshold (x ratio).

Each trial runs ``augment.synthesize`` then ``evaluate.downstream`` with one setting and
reports the *validation* gain in balanced accuracy (augmented minus real-only, paired by
seed). "No synthetic tiles" is always in the space (its gain is 0 by definition), so the
recommendation may be "don't augment". The recommended setting's *test* gain is reported
separately: the search never looks at it. Every trial is a nested MLflow run under one
sweep parent; a failing trial is recorded and the sweep goes on; rerunning resumes.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from histodiff import tracking
from histodiff.config import ConfigError, HistodiffConfig, SweepConfig, config_from_dict
from histodiff.storage import Store, is_s3, join
from histodiff.sweep_report import recommend, write_report

log = logging.getLogger(__name__)

TrialFn = Callable[[HistodiffConfig, "str | None"], dict[str, float]]
NO_SYNTHETIC = {"guidance_scale": None, "threshold": None, "synthetic_fraction": 0.0, "strength": None}
# The trial's own process mostly waits on the Ray actors and tasks it starts.
TRIAL_DRIVER_CPU = 0.5


@dataclass
class SweepResult:
    """Every trial's outcome, the recommendation (validation) and its test gain, where it lies.

    ``recommended`` is None when any trial failed: a sweep with holes recommends nothing.
    """

    trials: list[dict[str, Any]]
    recommended: dict[str, Any] | None
    recommended_val_gain: float | None
    recommended_test_gain: float | None
    num_failed: int
    output_uri: str
    parent_run_id: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def all_synthetic_failed(self) -> bool:
        """Return True when no trial with synthetic tiles finished (the sweep measured nothing)."""
        synthetic = [t for t in self.trials if t.get("synthetic_fraction")]
        return bool(synthetic) and all(t["status"] != "OK" for t in synthetic)


def load_space(cfg: HistodiffConfig, path: str) -> HistodiffConfig:
    """Return cfg with its ``sweep`` section overridden by a search-space YAML file."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"search space {path!r} cannot be read: {exc}") from None
    data = data.get("sweep", data)
    merged = {**cfg.sweep.model_dump(), **data}
    try:
        sweep = SweepConfig.model_validate(merged)
    except Exception as exc:
        raise ConfigError(f"search space {path!r} is invalid: {exc}") from None
    return cfg.model_copy(update={"sweep": sweep})


def search_points(sweep: SweepConfig, default_fraction: float, default_strength: float = 1.0) -> list[dict[str, Any]]:
    """Return the grid: every scale x threshold x fraction x strength point, then "no synthetic tiles"."""
    fractions = [f for f in (sweep.synthetic_fractions or [default_fraction]) if f > 0]
    strengths = sweep.strengths or [default_strength]
    points = [{"guidance_scale": s, "threshold": t, "synthetic_fraction": f, "strength": st}
              for s, t, f, st in itertools.product(sweep.guidance_scales, sweep.thresholds, fractions, strengths)]
    return points + [dict(NO_SYNTHETIC)]


def point_key(point: dict[str, Any]) -> str:
    """Return a short, path-safe name for a search point (``_a<strength>`` only for anchored synthesis)."""
    if not point.get("synthetic_fraction"):
        return "no-synthetic"
    anchored = f"_a{point['strength']:g}" if point.get("strength", 1.0) < 1.0 else ""
    return f"s{point['guidance_scale']:g}_t{point['threshold']:g}_f{point['synthetic_fraction']:g}{anchored}"


def trial_config(cfg: HistodiffConfig, point: dict[str, Any]) -> HistodiffConfig:
    """Return the config of one trial: the point's settings and its own output paths."""
    data = cfg.public_dict()
    root = join(cfg.paths.sweep, "trials", point_key(point))
    data["paths"].update(synthetic=join(root, "synthetic"), evaluation=join(root, "evaluation"),
                         checkpoints=join(root, "checkpoints"))
    data["evaluation"]["synthetic_fraction"] = float(point["synthetic_fraction"] or 0.0)
    data["evaluation"]["controls"] = []  # a trial measures the augmented arm's gain; controls are the protocol's
    if point.get("guidance_scale") is not None:
        data["synthesis"]["guidance_scale"] = float(point["guidance_scale"])
    if point.get("threshold") is not None:
        data["synthesis"]["selector"]["threshold"] = float(point["threshold"])
    if point.get("strength") is not None:
        data["synthesis"]["strength"] = float(point["strength"])
    out = config_from_dict(data)
    # public_dict drops credentials; keep the caller's (they never reach MLflow: flat_params drops them).
    return out.model_copy(update={"storage": cfg.storage})


def gains_from_evaluation(result: Any) -> dict[str, float]:
    """Return the validation and test gains in balanced accuracy from an EvaluationResult."""
    by_seed: dict[str, dict[int, float]] = {}
    for o in result.outcomes:
        by_seed.setdefault(o.arm, {})[o.seed] = o.val_balanced_accuracy
    base, aug = by_seed.get("baseline", {}), by_seed.get("augmented", {})
    paired = [aug[s] - base[s] for s in aug if s in base]
    if not paired:
        raise ValueError("the evaluation holds no augmented arm paired with the baseline; cannot compute a gain")
    test = result.gains.get("augmented", {}).get("balanced_accuracy", {})
    return {"val_gain": sum(paired) / len(paired), "test_gain": float(test.get("mean", float("nan"))),
            "val_baseline": sum(base.values()) / len(base)}


def synthesize_and_evaluate(cfg: HistodiffConfig, parent_run_id: str | None) -> dict[str, float]:
    """Run synthesis then evaluation for one trial config (their runs nested in the trial's); return its gains."""
    from histodiff.runner import run_stage
    from histodiff.stages import evaluate, synthesize

    run_stage(synthesize, cfg, parent_run_id=parent_run_id)
    return gains_from_evaluation(run_stage(evaluate, cfg, parent_run_id=parent_run_id))


def _trial(config: dict[str, Any], base: dict[str, Any], parent_run_id: str | None, trial_fn: TrialFn) -> None:
    """Tune function trainable: one trial as a nested MLflow run; reports ``val_gain``."""
    from ray import tune

    point = config["point"]
    cfg = trial_config(config_from_dict(base), point)
    params = {f"sweep.{k}": v for k, v in point.items()}
    with tracking.stage_run(cfg, "trial", params=params, parent_run_id=parent_run_id,
                            run_name=f"{cfg.name}/trial {point_key(point)}") as tracker:
        if not point.get("synthetic_fraction"):
            gains = {"val_gain": 0.0, "test_gain": 0.0}  # real-only against itself: no training needed
        else:
            gains = trial_fn(cfg, tracker.run_id)
        tracker.log_metrics(gains)
    tune.report({**gains, "key": point_key(point)})


def _error_line(error: BaseException) -> str:
    """Return the last line of a trial's error (the exception itself, not Ray's traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return tracking.scrub(lines[-1] if lines else type(error).__name__)[:500]


def trial_bundles(cfg: HistodiffConfig) -> list[dict[str, float]]:
    """Return the placement-group bundles of one trial: its driver, then one per worker it starts.

    A trial's synthesis actors and evaluation tasks are Ray children of the trial, and Tune
    places children inside the trial's placement group. So the group holds a bundle for the
    driver (``TRIAL_DRIVER_CPU``) and ``synthesis.num_actors`` worker bundles of
    ``ray.cpus_per_worker`` CPUs (and one GPU each with ``ray.use_gpu``): the synthesis actors
    take them first, then the evaluation tasks take turns on them.
    """
    worker = {"CPU": float(cfg.ray.cpus_per_worker)}
    if cfg.ray.use_gpu:
        worker["GPU"] = 1.0
    return [{"CPU": TRIAL_DRIVER_CPU}] + [dict(worker) for _ in range(cfg.synthesis.num_actors)]


def trial_demand(cfg: HistodiffConfig) -> dict[str, float]:
    """Return the total resources one trial reserves (the sum of its bundles)."""
    total: dict[str, float] = {}
    for bundle in trial_bundles(cfg):
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def max_concurrent(cfg: HistodiffConfig, cluster: dict[str, float] | None = None) -> int:
    """Return how many trials fit the cluster at once, from the same numbers as :func:`trial_bundles`.

    Raises a clear error when not even one trial fits (it would wait forever).
    """
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    if cluster is None:
        import ray

        cluster = ray.cluster_resources()
    demand = trial_demand(cfg)
    fits = [math.floor(cluster.get(key, 0.0) / need + 1e-9) for key, need in demand.items() if need > 0]
    n = min(fits) if fits else 1
    if n < 1:
        have = {k: cluster.get(k, 0.0) for k in demand}
        raise ConfigError(f"one sweep trial needs {demand} (a driver plus synthesis.num_actors="
                          f"{cfg.synthesis.num_actors} workers of ray.cpus_per_worker={cfg.ray.cpus_per_worker} "
                          f"CPUs{' and a GPU' if cfg.ray.use_gpu else ''}), but the cluster has {have}; lower "
                          "synthesis.num_actors or ray.cpus_per_worker")
    return n


def _tuner(cfg: HistodiffConfig, trainable: Any, name: str, storage_path: str, fs: Any, concurrent: int) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    sweep_cfg = cfg.sweep
    experiment = f"{storage_path.rstrip('/')}/{name}"
    if sweep_cfg.resume and tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        log.info("resuming the sweep at %s", experiment)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False,
                                  storage_filesystem=fs)
    points = search_points(sweep_cfg, cfg.evaluation.synthetic_fraction, cfg.synthesis.strength)
    # grid: every point once (x num_samples); random: num_samples draws from the same points.
    space = {"point": tune.grid_search(points) if sweep_cfg.search == "grid" else tune.choice(points)}
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_gain", mode="max", num_samples=sweep_cfg.num_samples, max_concurrent_trials=concurrent,
            scheduler=ASHAScheduler(max_t=100, grace_period=1) if sweep_cfg.asha else None),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )


def run(cfg: HistodiffConfig, trial_fn: TrialFn | None = None) -> SweepResult:
    """Run (or resume) the sweep; return every trial, the recommendation and its test gain."""
    from ray import tune

    from histodiff.runtime import init_ray

    if not cfg.sweep.guidance_scales or not cfg.sweep.thresholds:
        raise ConfigError("sweep.guidance_scales and sweep.thresholds need at least one value each")
    store = Store(cfg.storage)
    loc = store.for_ray(cfg.paths.sweep)  # Tune pickles the filesystem: no keys in it
    fs = loc.fs if is_s3(cfg.paths.sweep) else None
    store.makedirs(cfg.paths.sweep)
    parent_file = join(cfg.paths.sweep, "parent_run.json")
    previous = store.read_json(parent_file) if store.exists(parent_file) else {}
    init_ray(cfg)
    concurrent = max_concurrent(cfg)  # before any work: a trial that cannot fit is a config error
    with tracking.parent_run(cfg, "sweep", resume_run_id=previous.get("run_id")) as parent:
        if parent.active:
            store.write_json(parent_file, {"run_id": parent.run_id})
        if trial_fn is None:
            # Trials share the selector (the threshold is not part of it): it is a stage of its own,
            # run once here, and the synthesis inputs are checked before any trial takes resources.
            from histodiff.runner import run_stage
            from histodiff.stages import selector, synthesize

            run_stage(selector, cfg, parent_run_id=parent.run_id)
            synthesize.spec(cfg, store)
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=cfg.public_dict(), parent_run_id=parent.run_id,
                                 trial_fn=trial_fn or synthesize_and_evaluate),
            tune.PlacementGroupFactory(trial_bundles(cfg), strategy="PACK"))
        grid = _tuner(cfg, trainable, f"{cfg.name}-sweep", loc.path, fs, concurrent).fit()
        trials = []
        for res in grid:
            point = res.config.get("point", {}) if res.config else {}
            metrics = res.metrics or {}
            trials.append({**point, "key": point_key(point) if point else "?",
                           "val_gain": metrics.get("val_gain"), "test_gain": metrics.get("test_gain"),
                           "status": "ERROR" if res.error else "OK",
                           "error": _error_line(res.error) if res.error else None})
        # Every trial is over: a trial run still RUNNING lost its process (its node died, say).
        tracking.end_orphaned_children(cfg, parent.run_id, "the trial's process died before it ended this run "
                                       "(its node was lost, or it was killed)")
        num_failed = sum(t["status"] != "OK" for t in trials)
        best, best_val, best_test = recommend(trials) if not num_failed else (None, None, None)
        result = SweepResult(trials=trials, recommended=best, recommended_val_gain=best_val,
                             recommended_test_gain=best_test, num_failed=num_failed,
                             output_uri=cfg.paths.sweep, parent_run_id=parent.run_id)
        result.artifacts = write_report(cfg, result, parent)
    return result
