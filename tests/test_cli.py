"""The ``histodiff`` command: parsing, errors, a real stage run, the benchmark merge, MLflow hints."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from bench import runner
from histodiff.cli import main, mlflow_hint, parse_args
from histodiff.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_parser_knows_every_stage_and_command():
    args = parse_args(["run", "pretrain", "a.b=1", "--config", "paper", "denoiser.steps=3"])
    assert (args.stage, args.config, args.overrides) == ("pretrain", "paper", ["a.b=1", "denoiser.steps=3"])
    assert parse_args(["submit", "sweep", "--address", "http://h:8265"]).stage == "sweep"
    assert parse_args(["bench", "tracking"]).area == "tracking"
    for bad in (["run", "no-such-stage"], ["run", "ingest", "--confg", "tiny"], ["bench", "x", "y=1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_a_bad_override_exits_2_with_the_key_named(capsys):
    assert main(["run", "ingest", "--config", "tiny", "denoiser.stepz=3"]) == 2
    assert "denoiser.stepz" in capsys.readouterr().err


def test_mlflow_hint_names_the_ui_command_experiment_and_run(tmp_path):
    cfg = load_config("tiny", [f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"])
    hint = mlflow_hint(cfg, "abc123")
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/m.db" in hint
    assert "experiment: histodiff-tiny" in hint and "tiny/pipeline" in hint and "abc123" in hint
    assert "histodiff-<kind>@champion" in hint


@pytest.mark.slow
def test_run_ingest_through_the_cli(ray_local, builtin_data, tmp_path, capsys):
    code = main(["run", "ingest", "--config", "tiny", f"paths.root={tmp_path}", "paths.unlabeled_sources=[]",
                 f"paths.labeled_source={builtin_data['labeled_test']}", "paths.labeled_test_source=null",
                 "tracking.enabled=false"])
    printed = capsys.readouterr().out
    assert code == 0
    assert f"{tmp_path}/shards/labeled" in printed
    manifest = json.loads((tmp_path / "shards" / "labeled" / "_manifest.json").read_text())
    assert manifest["num_tiles"] > 0


def test_benchmark_runner_merges_and_keeps_other_areas(tmp_path, monkeypatch):
    area = types.ModuleType("bench.areas.tmparea")
    area.run = lambda workdir: {"tmp_ratio": {"value": 2.5, "unit": "x", "goal": "higher", "measured": "now"}}
    monkeypatch.setitem(sys.modules, "bench.areas.tmparea", area)
    monkeypatch.setattr(runner, "areas", lambda: ["tmparea"])
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"other_area_key": {"value": 1, "unit": "s", "goal": "g", "measured": "m"}}))
    measured = runner.run_benchmarks(str(out), only="tmparea", workdir=str(tmp_path / "w"))
    assert measured["tmp_ratio"]["value"] == 2.5
    merged = json.loads(out.read_text())
    assert set(merged) == {"other_area_key", "tmp_ratio"}
    with pytest.raises(ValueError, match="unknown benchmark area"):
        runner.run_benchmarks(str(out), only="nope")
    area.run = lambda workdir: {"bad": {"value": 1}}
    with pytest.raises(RuntimeError, match="tmparea"):
        runner.run_benchmarks(str(out), only="tmparea", workdir=str(tmp_path / "w"))
    assert set(json.loads(out.read_text())) == {"other_area_key", "tmp_ratio"}  # a failed area loses nothing


def test_bench_runs_from_a_checkout_and_says_so_elsewhere(tmp_path, monkeypatch, capsys):
    area = types.ModuleType("bench.areas.tmparea")
    area.run = lambda workdir: {"tmp_ratio": {"value": 2.5, "unit": "x", "goal": "higher", "measured": "now"}}
    monkeypatch.setitem(sys.modules, "bench.areas.tmparea", area)
    monkeypatch.setattr(runner, "areas", lambda: ["tmparea"])
    monkeypatch.setattr(sys, "path", [*sys.path])  # the command puts the checkout on it
    monkeypatch.chdir(ROOT)
    out = tmp_path / "results.json"
    assert main(["bench", "tmparea", "--output", str(out), "--workdir", str(tmp_path / "w")]) == 0
    assert "tmp_ratio: 2.5 x" in capsys.readouterr().out and "tmp_ratio" in json.loads(out.read_text())
    monkeypatch.chdir(tmp_path)  # no bench/ here: an installed histodiff has no benchmarks
    assert main(["bench", "tmparea"]) == 2
    err = capsys.readouterr().err
    assert "from a histodiff checkout" in err and len(err.strip().splitlines()) == 1
