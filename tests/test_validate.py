"""Method validation on MNIST (bench/validation*.py): data, cell configs, the figures over draws, one real run."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from bench import validation as validate
from bench.validation_report import ARMS, budget_figures, figures, minus_recipe, table_markdown


def test_mnist_tiles_are_padded_rgb_and_splits_are_disjoint():
    x, y = validate.mnist_tiles()
    assert x.shape == (5000, 32, 32, 3) and x.dtype == np.uint8
    assert x[:, :2].max() == 0 and x[:, :, -2:].max() == 0  # 2-pixel zero padding around 28x28
    assert np.array_equal(x[..., 0], x[..., 2])
    idx = validate.split_indices(y, 0, val_per_class=3, test_per_class=4)
    assert np.bincount(y[idx["val"]]).tolist() == [3] * 10 and np.bincount(y[idx["test"]]).tolist() == [4] * 10
    assert len(np.intersect1d(idx["pool"], idx["test"])) == 0 and len(np.intersect1d(idx["pool"], idx["val"])) == 0
    assert len(idx["pool"]) + 70 == 5000
    assert np.array_equal(idx["pool"], validate.split_indices(y, 0, 3, 4)["pool"])


def test_cells_share_the_generator_and_differ_in_budget_draw_and_name(tmp_path):
    data = validate.Data(np.zeros(0), np.zeros(0), {"pool": np.arange(3800), "val": np.arange(200)}, str(tmp_path))
    protocol = validate.Protocol(overrides=("evaluation.seeds=[7]",))
    b2, b19, b19d1 = (validate.cell_config(data, protocol, b, d) for b, d in ((2, 0), (19, 0), (19, 1)))
    shared = validate.cell_config(data, protocol, None)
    assert (b2.data.labels_per_class, b19.data.labels_per_class, b19d1.data.label_draw) == (2, 19, 1)
    assert b2.paths.denoiser == b19.paths.denoiser == shared.paths.denoiser
    assert b2.paths.selector != b19.paths.selector != b19d1.paths.selector
    assert len({b2.name, b19.name, b19d1.name, shared.name}) == 4  # Ray Train run names must not collide
    # every budget's downstream recipe is the same; the selector gets ~150 steps however few the labels
    assert b2.evaluation.steps == b19.evaluation.steps == protocol.eval_steps and b2.evaluation.seeds == [7]
    assert b2.synthesis.selector.epochs == 75 and b19.synthesis.selector.epochs == 13
    assert b2.data.val_fraction == pytest.approx(200 / 4000)
    for item in validate.METHOD_RECIPE:  # the method's recipe reaches every cell
        key, value = item.split("=")
        got = b19
        for part in key.split("."):
            got = getattr(got, part)
        assert str(got) == value


def test_a_variant_never_overwrites_the_recipes_cells_or_another_variants(tmp_path):
    data = validate.Data(np.zeros(0), np.zeros(0), {"pool": np.arange(3800), "val": np.arange(200)}, str(tmp_path))
    recipe = validate.Protocol()
    variants = [validate.Protocol(overrides=(o,)) for o in ("synthesis.strength=1.0", "synthesis.strength=0.7")]
    assert recipe.variant == "" and variants[0].variant != variants[1].variant
    assert variants[0].variant == validate.Protocol(overrides=("synthesis.strength=1.0",)).variant  # stable
    roots = [validate.cell_config(data, p, 2, 0).paths.root for p in (recipe, *variants)]
    assert roots[0] == f"{tmp_path}/b2/d0" and len(set(roots)) == 3  # the recipe's cache keeps its paths
    # the generator is shared by all of them: a variant of the downstream recipe does not retrain it
    assert len({validate.cell_config(data, p, None).paths.denoiser for p in (recipe, *variants)}) == 1
    # ... but a variant of the generator trains its own, and its cells read that one (never the recipe's)
    longer = validate.Protocol(overrides=("denoiser.steps=900",))
    shared, cell = validate.cell_config(data, longer, None), validate.cell_config(data, longer, 2, 0)
    mine = f"{tmp_path}/{longer.variant}".rstrip("/")
    assert validate.generator_root(data, longer) == mine and shared.denoiser.steps == 900
    assert shared.paths.denoiser == cell.paths.denoiser == f"{mine}/models/denoiser"
    assert shared.paths.latents == cell.paths.latents == f"{mine}/latents/pool"
    assert cell.paths.root == f"{mine}/b2/d0" and validate.cell_config(data, recipe, None).denoiser.steps != 900


def test_a_run_of_some_arms_reads_a_cell_with_every_arm_but_not_the_other_way(tmp_path):
    from histodiff.storage import Store

    every, some = validate.Protocol(), validate.Protocol(arms=("augmented",))
    path = str(tmp_path / "cells" / "b2-d0.json")
    Store().write_json(path, {"key": validate.cell_key(every, 2, 0), "outcomes": []})
    assert validate.finished_cell(str(tmp_path), some, 2, 0)["key"] == validate.cell_key(every, 2, 0)
    assert validate.finished_cell(str(tmp_path), every, 2, 0) is not None
    Store().write_json(path, {"key": validate.cell_key(some, 2, 0), "outcomes": []})
    assert validate.finished_cell(str(tmp_path), some, 2, 0) is not None
    assert validate.finished_cell(str(tmp_path), every, 2, 0) is None  # the controls were never trained
    stale = validate.Protocol(arms=("augmented",), seeds=(0,))
    assert validate.finished_cell(str(tmp_path), stale, 2, 0) is None


def test_a_cell_cached_under_another_tiny_preset_is_not_read(tmp_path, monkeypatch):
    """A preset setting the recipe does not override (the downstream learning rate, say) reaches every cell: a cell
    finished before it changed is stale."""
    from histodiff.storage import Store

    protocol = validate.Protocol()
    Store().write_json(str(tmp_path / "cells" / "b2-d0.json"), {"key": validate.cell_key(protocol, 2, 0)})
    assert validate.finished_cell(str(tmp_path), protocol, 2, 0) is not None
    real = validate.load_config
    monkeypatch.setattr(validate, "load_config",
                        lambda preset, overrides: real(preset, [*overrides, "evaluation.lr=0.123"]))
    validate._preset_digest.cache_clear()
    try:
        assert validate.finished_cell(str(tmp_path), protocol, 2, 0) is None
    finally:
        validate._preset_digest.cache_clear()


def _cell(draw: int, gains: dict[str, list[float]], nothing: bool = False) -> dict:
    base = [0.80, 0.82]
    outcomes = [{"arm": "baseline", "seed": s, "test": {"accuracy": a}} for s, a in enumerate(base)]
    for arm in ARMS:
        outcomes += [{"arm": arm, "seed": s, "test": {"accuracy": base[s] + g / 100}}
                     for s, g in enumerate(gains.get(arm, [0.0, 0.0]))]
    report = {"0": {"selectivity": 0.5, "accepted": 0 if nothing else 8, "quota_fill": 0.0 if nothing else 1.0}}
    return {"budget": 5, "draw": draw, "outcomes": outcomes, "synthesis": report, "nothing_accepted": nothing,
            "volumes": {}, "precision_guided": 0.5, "precision_guided_accepted": 0.9, "selector_val_bacc": 0.8,
            "probes": {"latent_knn": 0.7}, "pseudo_label_precision": math.nan}


def test_a_variant_is_compared_with_the_recipe_paired_by_draw_and_seed():
    # recipe: augmented gains +1/+3 (draw 0) and +4/+4 (draw 1); the variant: +2/+2 and +6/+4, and a draw 2
    # that the recipe never ran (left out of the pairing)
    recipe = [_cell(0, {"augmented": [1.0, 3.0]}), _cell(1, {"augmented": [4.0, 4.0]})]
    variant = [_cell(0, {"augmented": [2.0, 2.0]}), _cell(1, {"augmented": [6.0, 4.0]}),
               _cell(2, {"augmented": [9.0, 9.0]})]
    variant[1]["outcomes"][0]["test"]["accuracy"] -= 0.01  # a lower baseline raises the variant's gain by 0.5
    moved = minus_recipe(variant, recipe)
    assert moved["draws"] == [0, 1] and moved["gain_per_draw"] == pytest.approx([0.0, 1.5], abs=1e-9)
    half = 12.7062 * math.sqrt(1.125) / math.sqrt(2)  # t(0.975, df=1) x sd([0, 1.5]) / sqrt(2 draws)
    assert moved["gain_points"] == pytest.approx(0.75)
    assert (moved["gain_ci_low"], moved["gain_ci_high"]) == pytest.approx((0.75 - half, 0.75 + half), rel=1e-4)
    assert minus_recipe(variant, []) is None
    out = figures(variant, validate.Protocol(budgets=(5,), headline=5), 0.1, 12.0, recipe_cells=recipe)
    assert out["validate_curve"]["5"]["augmented"]["minus_recipe"]["gain_points"] == pytest.approx(0.75)
    table = table_markdown(out["validate_curve"])
    assert table.splitlines()[0].endswith("| augmented minus recipe |") and table.endswith(" | +0.8 [-8.8, +10.3] |")
    assert "minus recipe" not in table_markdown(figures(recipe, validate.Protocol(budgets=(5,), headline=5),
                                                        0.1, 12.0)["validate_curve"])


def test_the_gain_interval_is_over_draws_and_a_draw_that_accepted_nothing_counts_as_zero():
    # draw gains (seed-averaged): +2, +4 and 0 (nothing accepted: the augmented arm is the baseline)
    cells = [_cell(0, {"augmented": [1.0, 3.0]}), _cell(1, {"augmented": [4.0, 4.0]}),
             _cell(2, {"augmented": [0.0, 0.0]}, nothing=True)]
    f = budget_figures(cells)
    aug = f["augmented"]
    assert aug["gain_per_draw"] == pytest.approx([2.0, 4.0, 0.0]) and aug["gain_points"] == pytest.approx(2.0)
    half = 4.302653 * 2.0 / math.sqrt(3)  # t(0.975, df=2) x sd([2, 4, 0]) / sqrt(3 draws)
    assert (aug["gain_ci_low"], aug["gain_ci_high"]) == pytest.approx((2.0 - half, 2.0 + half), rel=1e-4)
    assert f["draws_nothing_accepted"] == [2] and f["label_draws"] == 3 and f["seeds"] == 2
    assert f["baseline_acc"] == pytest.approx(81.0) and f["oracle"]["gain_points"] == pytest.approx(0.0)
    protocol = validate.Protocol(budgets=(5,), headline=5)
    out = figures(cells, protocol, 0.1, 12.0)
    assert out["validate_gain_points"] == pytest.approx(2.0) and out["validate_headline_budget"] == 5
    assert out["validate_curve"]["5"]["augmented"]["p_holm"] == pytest.approx(aug["p_value"])
    assert "| 5 | 81.0 |" in table_markdown(out["validate_curve"]) and not f["few_draws"]
    # two draws: the interval is reported but flagged, and the table says it means nothing
    two = budget_figures(cells[:2])
    assert two["few_draws"] and two["label_draws"] == 2
    assert "| 5 (intervals over 2 draws: not meaningful) |" in table_markdown({"5": two})
    # a budget whose cells never ran (a stopped run) is named, not a crash; no cell at all is one clear error
    out = figures(cells, validate.Protocol(budgets=(2, 5), headline=5), 0.1, 12.0)
    assert list(out["validate_curve"]) == ["5"] and out["validate_budgets_without_cells"] == [2]
    with pytest.raises(ValueError, match="no validation cell"):
        figures([], protocol, 0.1, 12.0)


def test_a_cached_input_is_reused_only_with_the_same_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(3)}, {"val_bacc": 0.5}

    first = validate._cached(str(tmp_path), "judge", ["judge", 1], compute)
    again = validate._cached(str(tmp_path), "judge", ["judge", 1], compute)
    assert len(calls) == 1 and torch.equal(again[0]["x"], first[0]["x"]) and again[1] == {"val_bacc": 0.5}
    validate._cached(str(tmp_path), "judge", ["judge", 2], compute)  # another key: computed again
    assert len(calls) == 2


def test_a_tile_teaches_only_when_its_label_is_right_and_the_baseline_does_not_already_predict_it():
    from bench.validation_diagnosis import teaching_stats

    labels, truth = np.array([0, 1, 2, 0]), np.array([0, 1, 0, 0])
    baseline = np.eye(3)[[0, 2, 2, 1]]  # the baseline's calls: 0 (agrees), 2, 2 (agrees with a wrong label), 1
    stats = teaching_stats(labels, truth, baseline, num_classes=3)
    assert stats == {"right": 0.75, "agree": 0.5, "teach": 0.5, "teach_per_class": pytest.approx(2 / 3)}
    assert teaching_stats(labels[:0], truth[:0], baseline[:0], 3)["teach_per_class"] == 0.0


def test_oracle_confident_keeps_per_true_class_the_tiles_the_baseline_is_surest_of(monkeypatch):
    from bench.validation_diagnosis import oracle_confident
    from histodiff.evaluate import controls

    pool_x = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1)
    pool_y = np.array([0, 0, 0, 1, 1, 1])
    # tile 1 is the baseline's surest 1 after tile 5, but its true class is 0: it never joins class 1
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5], [0.1, 0.9]])
    seen = []
    monkeypatch.setattr(controls, "baseline_proba", lambda recipe, k, state, tiles: seen.append(state) or probs)
    extra = oracle_confident(pool_x, pool_y, None, np.array([2, 1]), 2)(0, {"seed": 0})
    assert extra.x[:, 0, 0, 0].tolist() == [0, 2, 5] and extra.y.tolist() == [0, 0, 1]
    assert seen == [{"seed": 0}]  # each seed's own baseline


def test_a_budget_under_one_label_is_refused_before_anything_runs(tmp_path, capsys):
    from bench import validation_ablations, validation_diagnosis

    for main, extra in ((validation_diagnosis.main, []), (validation_ablations.main, ["seed=1"])):
        for bad in ("0,5", "two"):
            with pytest.raises(SystemExit):
                main([*extra, "--workdir", str(tmp_path / "never"), "--budgets", bad])
            assert "budgets" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


SMOKE = validate.Protocol(
    budgets=(2,), headline=2, draws=2, seeds=(0,), eval_steps=4, val_per_class=3, test_per_class=3, judge_steps=5, pool_limit=400,
    base_overrides=("autoencoder.steps=4", "autoencoder.checkpoint_every=4", "denoiser.steps=4",
                    "denoiser.checkpoint_every=4", "denoiser.warmup_steps=1", "denoiser.sample_every=4",
                    "denoiser.report_every=2", "evaluation.epochs=2", "classifier.steps=4",
                    "classifier.checkpoint_every=4", "classifier.report_every=2", "synthesis.selector.epochs=1",
                    "synthesis.accepted_per_class=2", "synthesis.max_samples_per_class=4", "synthesis.batch_size=8",
                    "synthesis.num_inference_steps=2", "pseudo_labels.per_class=2", "synthesis.selector.threshold=0.0"))


@pytest.mark.slow
def test_the_protocol_runs_every_arm_of_every_draw_for_real(ray_local, tmp_path, monkeypatch, capsys):
    """The whole protocol at smoke size on the real stages and real Ray: figures for every arm, cells cached;
    then `histodiff bench validate KEY=VALUE` (a variant, the protocol at smoke size) on the same workdir."""
    from bench.areas import validate as validate_area
    from bench.runner import code_version
    from histodiff.cli import main

    work = tmp_path
    tmp_path = work / "validate" / "full"  # where `histodiff bench validate --workdir WORK` keeps the recipe's run
    out = validate.run_validation(str(tmp_path), SMOKE)
    curve = out["validate_curve"]["2"]
    assert curve["label_draws"] == 2 and curve["seeds"] == 1 and curve["draws_nothing_accepted"] == []
    assert all(v["augmented"] == v["oracle"] == v["duplicated_real"] > 0 for v in curve["volumes"])  # same volume
    for arm in ARMS:  # an arm may be absent only when no draw produced it; at smoke size all do
        assert arm in curve, arm
        assert curve[arm]["gain_ci_low"] <= curve[arm]["gain_points"] <= curve[arm]["gain_ci_high"]
    assert 0 <= out["guidance_precision_guided"] <= 1 and 0 <= out["guidance_precision_unguided"] <= 1
    assert out["validate_wall_s"] > 0 and {"autoencoder", "encode", "pretrain", "judge_val_bacc"} <= set(out["validate_generator"])
    cells = sorted((tmp_path / "cells").glob("*.json"))  # SMOKE is the recipe at smoke size: no variant
    assert [c.name for c in cells] == ["b2-d0.json", "b2-d1.json"]
    # A second run reuses the cells of the same protocol version and recipe (nothing retrained).
    # So are the judge and the unguided pool (keyed by their inputs): the same precision, nothing rewritten.
    cached = sorted((tmp_path / "cache").glob("*"))
    assert [c.name for c in cached] == ["judge.json", "judge.safetensors", "unguided_pool.json",
                                        "unguided_pool.safetensors"]
    stamps = [c.stat().st_mtime for c in cells + cached]
    again = validate.run_validation(str(tmp_path), SMOKE)
    assert [c.stat().st_mtime for c in cells + cached] == stamps
    assert again["guidance_precision_unguided"] == out["guidance_precision_unguided"]
    assert again["validate_generator"]["judge_val_bacc"] == out["validate_generator"]["judge_val_bacc"]
    # As JSON: a p-value is NaN when every draw's gain is the same (a tiny run often gains 0), and NaN != NaN.
    assert json.dumps(again["validate_curve"]["2"]["augmented"]) == json.dumps(curve["augmented"])
    # A variant of the downstream evaluation only reads the recipe's finished per-cell stages (their specs are
    # the same): its own cells, no stage of its own; a variant of the synthesis gets its own stages.
    weighting = dataclasses.replace(SMOKE, overrides=("evaluation.synthetic_weighting=none",))
    markers = sorted(tmp_path.glob("b2/d*/**/_stage.json"))
    marker_stamps = [m.stat().st_mtime for m in markers]
    monkeypatch.setattr(validate_area, "Protocol", lambda overrides=(): dataclasses.replace(SMOKE, overrides=overrides))
    results = work / "results.json"
    capsys.readouterr()
    assert main(["bench", "validate", "evaluation.synthetic_weighting=none", "--workdir", str(work),
                 "--output", str(results), "--budgets", "2", "--arms", "augmented"]) == 0
    # ... prints its table, which says how far its augmented arm moved from the recipe's (paired over the two
    # draws both ran), and writes its figures beside the results (never into them), naming the code and variant
    printed = capsys.readouterr().out
    assert "| augmented minus recipe |" in printed and "\n| 2 (intervals over 2 draws: not meaningful) | " in printed
    variant = json.loads((work / "validate-variant.json").read_text())
    assert variant["validate_curve"]["value"]["2"]["augmented"]["minus_recipe"]["draws"] == [0, 1]
    assert variant["validate_wall_s"]["measured"].endswith(
        f", {code_version()} (overrides: evaluation.synthetic_weighting=none) (budgets: 2) (arms: augmented)")
    # an ablation trains the augmented arm alone beside the baseline: no control arm in its figures
    assert [arm for arm in ARMS if arm in variant["validate_curve"]["value"]["2"]] == ["augmented"]
    # The ablation table is rebuilt from the finished cells of the recipe and of that ablation: nothing redone.
    from bench import validation_ablations

    cells_now = sorted(tmp_path.glob("**/cells/*.json"))
    stamps = [c.stat().st_mtime for c in cells_now]
    assert validation_ablations.main(["evaluation.synthetic_weighting=none", "--workdir", str(tmp_path),
                                      "--budgets", "2", "--output", str(results)], protocol=SMOKE) == 0
    assert sorted(tmp_path.glob("**/cells/*.json")) == cells_now and [c.stat().st_mtime for c in cells_now] == stamps
    rows = json.loads(results.read_text())["validate_ablations"]["value"]["2"]
    assert sorted(rows) == ["evaluation.synthetic_weighting=none", "the recipe"]  # the JSON sorts its keys
    assert rows["evaluation.synthetic_weighting=none"]["minus_recipe_draws"] == [0, 1]
    assert "| evaluation.synthetic_weighting=none | " in capsys.readouterr().out
    # Why an arm gains what it gains (issue 15): the recipe's finished per-cell stages are read, the baseline and
    # four arms train, and each arm's extra tiles are measured against each seed's own baseline.
    from bench import validation_diagnosis

    assert validation_diagnosis.main(["--workdir", str(tmp_path), "--budgets", "2", "--output", str(results)],
                                     protocol=SMOKE) == 0
    assert [m.stat().st_mtime for m in markers] == marker_stamps  # no per-cell stage trained again
    diagnosis = json.loads(results.read_text())["validate_diagnosis"]["value"]["2"]
    assert diagnosis["draws"] == 2 and diagnosis["seeds"] == 1
    for arm in validation_diagnosis.ARMS:
        a = diagnosis[arm]
        assert a["gain"][1] <= a["gain"][0] <= a["gain"][2] and a["teach"] <= a["right"], arm
    # the true labels of pool tiles are read from the pool, not judged
    assert diagnosis["oracle"]["right"] == diagnosis["oracle_confident"]["right"] == 1.0
    assert "| oracle_confident | " in capsys.readouterr().out
    diagnosed = sorted((tmp_path / "diagnosis").glob("*.json"))
    assert [c.name for c in diagnosed] == ["b2-d0.json", "b2-d1.json"]
    stamps = [c.stat().st_mtime for c in diagnosed]
    assert validation_diagnosis.main(["--workdir", str(tmp_path), "--budgets", "2", "--output", str(results)],
                                     protocol=SMOKE) == 0
    assert [c.stat().st_mtime for c in diagnosed] == stamps  # a rerun reads the finished cells
    results.unlink()
    assert not results.exists() and "minus_recipe" not in curve["augmented"]  # the recipe: nothing to compare with
    assert sorted(p.name for p in (tmp_path / weighting.variant / "cells").glob("*.json")) == ["b2-d0.json", "b2-d1.json"]
    assert not (tmp_path / weighting.variant / "b2").exists() and len(markers) >= 8
    assert [m.stat().st_mtime for m in markers] == marker_stamps  # skipped by fingerprint, not rewritten
    data = validate.prepare_data(str(tmp_path), SMOKE)
    anchored = dataclasses.replace(SMOKE, overrides=("synthesis.strength=1.0",))
    assert validate.cell_config(data, anchored, 2, 0).paths.root == f"{tmp_path}/{anchored.variant}b2/d0"


def test_the_oracle_ceiling_command_runs_for_real(tmp_path, capsys):
    """`python -m bench.oracle_ceiling` at tiny size: the real splits, the downstream recipe, one table per step count."""
    from bench import oracle_ceiling

    out = tmp_path / "ceiling.json"
    assert oracle_ceiling.main(["--workdir", str(tmp_path / "w"), "--budget", "2", "--volumes", "2,4", "--steps", "10",
                                "--draws", "1", "--output", str(out)]) == 0
    table = json.loads(out.read_text())
    assert list(table) == ["10"] and set(table["10"]) == {"baseline", "oracle2", "oracle4"}
    assert 0 <= table["10"]["baseline"] <= 100 and '"oracle4"' in capsys.readouterr().out


@pytest.mark.slow
def test_the_fid_curve_command_continues_one_denoiser_run_for_real(ray_local, tmp_path, capsys):
    """`python -m bench.fid_curve` at smoke size: the real stages on real Ray; the second step count resumes the
    first one's run from its checkpoint instead of training from scratch; a table and a plot."""
    from bench import fid_curve

    out = tmp_path / "fid.json"
    assert fid_curve.main(["--workdir", str(tmp_path / "w"), "--steps", "8,4", "--samples", "8", "--output", str(out)],
                          protocol=SMOKE) == 0
    table = json.loads(out.read_text())
    assert list(table["steps"]) == ["4", "8"] and table["samples"] == 8 and table["pool"] == 400
    first, second = table["steps"]["4"], table["steps"]["8"]
    assert first["resumed_from"] == [] and second["resumed_from"] == [4]
    for row in (first, second):
        assert math.isfinite(row["fid"]) and row["fid"] >= 0 and row["probe_loss"] > 0
        assert 0 <= row["class_share_min_max"][0] <= row["class_share_min_max"][1] <= 1
    assert (tmp_path / "fid.png").stat().st_size > 0 and '"fid"' in capsys.readouterr().out
    with pytest.raises(SystemExit):  # bad input: refused by argparse before anything trains
        fid_curve.main(["--workdir", str(tmp_path / "never"), "--steps", "0"])
    assert not (tmp_path / "never").exists()
