"""Ray Tune sweep: do-no-harm recommendation, failing trials, MLflow nesting, resume."""

from __future__ import annotations

import math
import uuid

import pytest

from bench import toys as toy
from histodiff.storage import Store
from histodiff import sweep
from histodiff.config import ConfigError, _merge, config_from_dict, load_config, parse_overrides
from histodiff.sweep_report import error_kinds, heatmap_figure, recommend, summary_text, table_csv


def _trial(**kw):
    base = {"guidance_scale": 1.0, "threshold": 0.5, "synthetic_fraction": 0.5, "status": "OK"}
    base.update(kw)
    base["key"] = sweep.point_key(base)
    return base


def test_grid_always_holds_no_synthetic_and_trial_paths_are_separate(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "sweep.guidance_scales=[1,3]", "sweep.thresholds=[0.5,0.9]",
                               "sweep.synthetic_fractions=[0.5,0,0.25]"])
    points = sweep.search_points(cfg.sweep, cfg.evaluation.synthetic_fraction)
    assert len(points) == 2 * 2 * 2 + 1 and points[-1] == sweep.NO_SYNTHETIC
    keys = {sweep.point_key(p) for p in points}
    assert len(keys) == len(points) and "no-synthetic" in keys
    trial = sweep.trial_config(cfg, {"guidance_scale": 3.0, "threshold": 0.9, "synthetic_fraction": 0.5})
    assert trial.synthesis.guidance_scale == 3.0 and trial.synthesis.selector.threshold == 0.9
    assert trial.evaluation.synthetic_fraction == 0.5
    assert trial.paths.synthetic == f"{tmp_path}/sweep/trials/s3_t0.9_f0.5/synthetic"
    assert trial.paths.checkpoints.startswith(f"{tmp_path}/sweep/trials/s3_t0.9_f0.5/")
    assert trial.paths.denoiser == cfg.paths.denoiser  # trials share the pretrained models


def test_recommendation_does_no_harm_and_reports_test_gain_separately():
    # Every setting hurts on validation: recommend no synthetic tiles, even though one helps on test.
    harmful = [_trial(threshold=0.5, val_gain=-0.02, test_gain=0.05), _trial(threshold=0.9, val_gain=-0.01,
                                                                             test_gain=0.01)]
    best, val, test = recommend(harmful)
    assert best["key"] == "no-synthetic" and val == 0.0 and test == 0.0
    # The best on validation wins, whatever its test gain; failed trials are never chosen.
    mixed = harmful + [_trial(threshold=0.8, val_gain=0.03, test_gain=-0.01),
                       _trial(threshold=0.7, val_gain=0.5, test_gain=0.5, status="ERROR")]
    best, val, test = recommend(mixed)
    assert best["threshold"] == 0.8 and val == 0.03 and test == -0.01


def test_table_and_heatmap_show_failed_cells():
    trials = [_trial(guidance_scale=1.0, threshold=0.5, val_gain=0.01, test_gain=0.0),
              _trial(guidance_scale=3.0, threshold=0.5, val_gain=None, test_gain=None, status="ERROR", error="boom"),
              {**sweep.NO_SYNTHETIC, "key": "no-synthetic", "val_gain": 0.0, "test_gain": 0.0, "status": "OK"}]
    csv = table_csv(trials).splitlines()
    assert csv[0].startswith("key,guidance_scale") and csv[1].startswith("s1_t0.5_f0.5,") and csv[-1].endswith("boom")
    fig = heatmap_figure(trials)
    values = fig.axes[0].images[0].get_array()
    assert values.shape == (1, 2) and math.isclose(float(values[0, 0]), 1.0) and bool(values.mask[0, 1])


def test_trial_resources_hold_what_a_trial_starts():
    tiny = load_config("tiny")
    # The driver, then one bundle per synthesis actor; evaluation tasks take turns on those bundles.
    assert sweep.trial_bundles(tiny) == [{"CPU": 0.5}, {"CPU": 1.0}]
    assert sweep.max_concurrent(tiny, {"CPU": 2.0}) == 1 and sweep.max_concurrent(tiny, {"CPU": 16.0}) == 10
    paper = load_config("paper")
    bundles = sweep.trial_bundles(paper)
    assert len(bundles) == 1 + paper.synthesis.num_actors and bundles[1] == {"CPU": 8.0, "GPU": 1.0}
    assert sweep.max_concurrent(paper, {"CPU": 200.0, "GPU": 16.0}) == 2  # 8 GPUs and 64.5 CPUs per trial
    with pytest.raises(ConfigError, match="synthesis.num_actors=8"):
        sweep.max_concurrent(paper, {"CPU": 128.0, "GPU": 4.0})


def test_a_sweep_with_failed_trials_recommends_nothing_and_names_each_kind_of_error():
    trials = [_trial(threshold=0.5, val_gain=0.03, test_gain=0.01),
              _trial(threshold=0.8, status="ERROR", error="ValueError: Cannot schedule SynthesisWorker"),
              _trial(threshold=0.9, status="ERROR", error="ValueError: Cannot schedule again"),
              _trial(guidance_scale=3.0, status="ERROR", error="FileNotFoundError: no denoiser"),
              {**sweep.NO_SYNTHETIC, "key": "no-synthetic", "val_gain": 0.0, "test_gain": 0.0, "status": "OK"}]
    kinds = error_kinds(trials)
    assert {k: v["count"] for k, v in kinds.items()} == {"ValueError": 2, "FileNotFoundError": 1}
    assert kinds["ValueError"]["first"].endswith("SynthesisWorker")
    result = sweep.SweepResult(trials, None, None, None, 3, "x")
    text = summary_text(result)
    assert "no recommendation: 3 of 5 trials failed" in text and "recommended" not in text
    assert "2 x ValueError" in text and "1 x FileNotFoundError" in text
    assert not result.all_synthetic_failed
    result.trials[0]["status"] = "ERROR"
    assert result.all_synthetic_failed


def test_a_bad_search_space_is_reported_with_its_file(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("guidance_scales: [1.0]\nthresholds: oops\n")
    with pytest.raises(ConfigError, match="space.yaml"):
        sweep.load_space(load_config("tiny"), str(space))


@pytest.mark.slow
def test_sweep_survives_a_failing_trial_nests_runs_and_resumes(ray_local, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = load_config("tiny", [f"paths.root={tmp_path}", f"tracking.tracking_uri={mlflow_server}",
                               f"tracking.experiment=sweep-{uuid.uuid4().hex[:8]}", "sweep.guidance_scales=[2.0]",
                               "sweep.thresholds=[0.5,0.8,0.9]", "sweep.max_concurrent_trials=2"])
    space = tmp_path / "space.yaml"
    space.write_text("sweep:\n  synthetic_fractions: [0.5]\n")
    cfg = sweep.load_space(cfg, str(space))

    def cheap_trial(trial_cfg, parent_run_id):  # a closure, so Ray ships it by value to the trial workers
        threshold = trial_cfg.synthesis.selector.threshold
        if threshold == 0.8:
            raise RuntimeError("trial failed on purpose")
        return {"val_gain": 0.02 if threshold == 0.9 else -0.01, "test_gain": 0.015 if threshold == 0.9 else 0.0}

    auto = cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={"max_concurrent_trials": None})})
    assert sweep.max_concurrent(auto) == 1  # 2 CPUs; each trial: 1 worker CPU + 0.5 for its driver
    result = sweep.run(cfg, trial_fn=cheap_trial)
    assert len(result.trials) == 4 and result.num_failed == 1
    # One trial failed: the sweep recommends nothing, however good the others look.
    assert result.recommended is None and "no recommendation: 1 of 4 trials failed" in summary_text(result)
    failed = [t for t in result.trials if t["status"] == "ERROR"]
    assert failed[0]["threshold"] == 0.8 and "on purpose" in failed[0]["error"]
    assert {t["key"]: t["val_gain"] for t in result.trials if t["status"] == "OK"} == {
        "s2_t0.5_f0.5_a0.5": -0.01, "s2_t0.9_f0.5_a0.5": 0.02, "no-synthetic": 0.0}  # tiny: anchored, strength 0.5

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)

    def runs():
        return client.search_runs([exp.experiment_id])

    parents = [r for r in runs() if r.data.tags.get("histodiff.stage") == "sweep"]
    children = [r for r in runs() if r.data.tags.get("histodiff.stage") == "trial"]
    assert len(parents) == 1 and parents[0].info.run_id == result.parent_run_id
    assert len(children) == 4 and {c.data.tags["mlflow.parentRunId"] for c in children} == {result.parent_run_id}
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    assert all(r.info.status != "RUNNING" for r in runs())
    arts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"heatmap.png", "results.csv", "results.json", "summary.txt", "config.yaml"} <= arts
    assert parents[0].data.metrics["num_failed"] == 1 and parents[0].data.tags["histodiff.recommended"] == "none"
    assert all(pg["state"] == "REMOVED" for pg in ray_local.util.placement_group_table().values())

    # Rerunning resumes the finished experiment: no trial runs again, the parent is reused.
    again = sweep.run(cfg, trial_fn=cheap_trial)
    assert again.parent_run_id == result.parent_run_id and len(again.trials) == 4
    assert len([r for r in runs() if r.data.tags.get("histodiff.stage") == "trial"]) == 4
    assert len([r for r in runs() if r.data.tags.get("histodiff.stage") == "sweep"]) == 1


def _toy_sweep_config(root, mlflow_server, *overrides):
    """Return a sweep config on the toy exports (tiny models, 8 px tiles) with a real labeled test split."""
    cfg = toy.write_toy_inputs(str(root))
    return config_from_dict(_merge(cfg.public_dict(), parse_overrides([
        "tracking.enabled=true", f"tracking.tracking_uri={mlflow_server}",
        f"tracking.experiment=sweep-real-{uuid.uuid4().hex[:8]}", "data.test_fraction=0.25",
        "evaluation.backbone=test_resnet", "evaluation.image_size=8", "evaluation.steps=6", "evaluation.epochs=2",
        "evaluation.batch_size=4", "evaluation.seeds=[0,1]", "sweep.guidance_scales=[0.0,1.0]",
        "sweep.thresholds=[0.0,0.2]", "sweep.synthetic_fractions=[0.5]", *overrides])))


@pytest.mark.slow
def test_sweep_runs_the_real_synthesis_and_evaluation_in_every_trial(ray_local, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = _toy_sweep_config(tmp_path / "toy", mlflow_server)
    result = sweep.run(cfg)  # the real trial function: synthesis actors and evaluation tasks inside each trial
    assert [t["status"] for t in result.trials] == ["OK"] * 5, [t["error"] for t in result.trials]
    assert result.num_failed == 0 and result.recommended is not None
    grid = [t for t in result.trials if t["synthetic_fraction"]]
    assert len(grid) == 4 and all(math.isfinite(t["val_gain"]) and math.isfinite(t["test_gain"]) for t in grid)
    # Each trial wrote its own synthetic tiles and evaluation.
    from histodiff import storage

    for t in grid:
        trial_root = storage.join(cfg.paths.sweep, "trials", t["key"])
        assert Store().exists(storage.join(trial_root, "synthetic", "accepted", "_manifest.json"))
        assert Store().exists(storage.join(trial_root, "evaluation", "evaluation.json"))
    values = heatmap_figure(result.trials).axes[0].images[0].get_array()
    assert values.shape == (2, 2) and not values.mask.any()  # four numbers, no "failed" cell

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("histodiff.stage"), []).append(r)
    assert len(by_stage["sweep"]) == 1 and len(by_stage["trial"]) == 5
    # The selector is shared (trained before the trials); each synthetic trial runs synthesize and evaluate.
    assert len(by_stage["synthesize"]) == 4 and len(by_stage["evaluate"]) == 4
    trial_ids = {r.info.run_id for r in by_stage["trial"]}
    assert {r.data.tags["mlflow.parentRunId"] for r in by_stage["synthesize"] + by_stage["evaluate"]} <= trial_ids
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(pg["state"] == "REMOVED" for pg in ray_local.util.placement_group_table().values())

    again = sweep.run(cfg)  # resumes the finished experiment: no new trial
    assert again.parent_run_id == result.parent_run_id and len(again.trials) == 5
    assert len(client.search_runs([exp.experiment_id])) == len(runs)


@pytest.mark.slow
def test_sweep_command_exits_non_zero_when_every_synthetic_trial_failed(ray_local, mlflow_server, tmp_path,
                                                                         monkeypatch, capsys):
    from histodiff import cli

    cfg = _toy_sweep_config(tmp_path / "toy", mlflow_server, "sweep.guidance_scales=[1.0]")
    preset = tmp_path / "toy.yaml"
    import yaml

    preset.write_text(yaml.safe_dump(cfg.public_dict()))

    def broken_trial(trial_cfg, parent_run_id):  # a closure: Ray ships it by value into the trials
        raise RuntimeError(f"synthesis broke at threshold {trial_cfg.synthesis.selector.threshold}")

    monkeypatch.setattr(sweep, "synthesize_and_evaluate", broken_trial)
    code = cli.main(["sweep", "--config", str(preset)])
    out = capsys.readouterr().out
    assert code == 1
    assert "no recommendation: 2 of 3 trials failed" in out and "recommended" not in out
    assert "2 x RuntimeError" in out and "synthesis broke" in out


def test_the_space_can_include_anchored_synthesis_strength(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "sweep.guidance_scales=[1]", "sweep.thresholds=[0.5]",
                               "sweep.strengths=[0.5,1.0]"])
    points = sweep.search_points(cfg.sweep, cfg.evaluation.synthetic_fraction, cfg.synthesis.strength)
    keys = [sweep.point_key(p) for p in points]
    assert keys == ["s1_t0.5_f0.5_a0.5", "s1_t0.5_f0.5", "no-synthetic"]
    assert sweep.trial_config(cfg, points[0]).synthesis.strength == 0.5
