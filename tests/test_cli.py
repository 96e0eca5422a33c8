"""The ``histodiff`` command: parsing, errors, a real stage run, the benchmark merge, MLflow hints."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bench import runner
from histodiff import stages
from histodiff.cli import main, mlflow_hint, parse_args
from histodiff.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_parser_knows_every_stage_and_command():
    args = parse_args(["run", "pretrain", "a.b=1", "--config", "paper", "denoiser.steps=3"])
    assert (args.stage, args.config, args.overrides) == ("pretrain", "paper", ["a.b=1", "denoiser.steps=3"])
    assert parse_args(["submit", "sweep", "--address", "http://h:8265"]).stage == "sweep"
    assert parse_args(["bench", "tracking"]).area == "tracking"
    bench = parse_args(["bench", "validate", "a.b=1", "--quick", "c=2"])
    assert (bench.area, bench.overrides, bench.quick) == ("validate", ["a.b=1", "c=2"], True)
    for bad in (["run", "no-such-stage"], ["run", "ingest", "--confg", "tiny"], ["bench", "x", "--nope"],
                ["bench", "validate", "y"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_a_bad_override_exits_2_with_the_key_named(capsys):
    assert main(["run", "ingest", "--config", "tiny", "denoiser.stepz=3"]) == 2
    assert "denoiser.stepz" in capsys.readouterr().err


def test_mlflow_hint_names_the_ui_command_experiment_and_run(tmp_path):
    cfg = load_config("tiny", [f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db"])
    hint = mlflow_hint(cfg, "abc123", "7")
    # This environment's mlflow (a fresh machine has none on PATH), the absolute store, the run's URL.
    assert f"/mlflow ui --backend-store-uri sqlite:///{tmp_path}/m.db" in hint
    assert "histodiff-tiny" in hint and "tiny/pipeline" in hint and "abc123" in hint
    assert "http://127.0.0.1:5000/#/experiments/7/runs/abc123?workflowType=machine_learning" in hint
    assert "viewStateShareKey=histodiff" in hint
    assert "histodiff-<kind>@champion" in hint


@pytest.fixture
def user_error(capsys, monkeypatch):
    """Run the command in-process; return (exit code, stderr lines, stdout); logging left as it was."""
    import logging

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    names = ["", "histodiff", "histodiff.console", "ray", "mlflow"]
    levels = {n: logging.getLogger(n).level for n in names}
    handlers = list(logging.getLogger().handlers)

    def run(argv: list[str]) -> tuple[int, list[str], str]:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's errors
            code = exc.code
        out = capsys.readouterr()
        return code, [line for line in out.err.splitlines() if line.strip()], out.out

    yield run
    logging.getLogger().handlers[:] = handlers
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


def test_an_unknown_stage_is_one_line_exit_2(user_error):
    code, err, _ = user_error(["run", "foo"])
    assert code == 2 and len(err) == 1 and "'foo'" in err[0] and "ingest" in err[0]
    code, err, _ = user_error(["run", "pipeline", "--stages", "ingest,foo", "tracking.enabled=false"])
    assert code == 2 and err == [f"histodiff: --stages: unknown stage 'foo'; choose from {','.join(stages.NAMES)}"]


def test_an_override_without_equals_is_one_line_exit_2(user_error):
    code, err, _ = user_error(["run", "ingest", "denoiser.steps"])
    assert code == 2 and len(err) == 1 and "'denoiser.steps' has no '='" in err[0] and "denoiser.steps=VALUE" in err[0]
    code, err, _ = user_error(["run", "ingest", "denoiser.stepz=3"])
    assert code == 2 and len(err) == 1 and "denoiser.stepz" in err[0]


def test_missing_data_names_the_folder_and_the_fix(user_error, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder where the demo never ran
    code, err, _ = user_error(["run", "ingest", "--config", "tiny", "tracking.enabled=false"])
    assert code == 2 and len(err) == 1
    assert f"{tmp_path}/outputs/builtin/unlabeled" in err[0] and "histodiff demo" in err[0] and "paths." in err[0]
    assert "Traceback" not in err[0]


def test_an_unreachable_cluster_is_one_line_exit_2(user_error):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{sock.getsockname()[1]}"
    code, err, _ = user_error(["submit", "ingest", "--address", address, "tracking.tracking_uri=http://mlflow:5000"])
    assert code == 2 and len(err) == 1 and address in err[0] and "RAY_ADDRESS" in err[0]


def test_submit_takes_the_address_from_ray_address(user_error, monkeypatch):
    import histodiff.submit

    seen = {}
    monkeypatch.setattr(histodiff.submit, "submit", lambda stage, address, *a, **k: seen.setdefault("a", address) and 0)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert user_error(["submit", "ingest"])[0] == 0 and seen["a"] == "http://head:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    code, err, _ = user_error(["submit", "ingest"])
    assert code == 2 and len(err) == 1 and "--address" in err[0] and "RAY_ADDRESS" in err[0]


def test_verbose_shows_the_traceback_of_a_user_error(user_error):
    code, err, _ = user_error(["--verbose", "run", "pipeline", "--stages", "foo", "tracking.enabled=false"])
    assert code == 2 and err[0].startswith("Traceback") and err[-1].startswith("histodiff: --stages")


def test_version_and_help_with_an_example_and_no_markup(user_error):
    code, _, out = user_error(["--version"])
    assert code == 0 and out.startswith("histodiff ")
    for command in ("run", "submit", "demo", "sweep", "bench"):
        code, _, out = user_error([command, "--help"])
        assert code == 0 and "example: histodiff " in out and "``" not in out and ":mod:" not in out
    code, _, out = user_error(["run", "--help"])
    assert "optional dotted overrides" in out and "[KEY=VALUE ...]" in out


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
    assert measured["tmp_ratio"]["measured"].endswith(runner.code_version())
    merged = json.loads(out.read_text())
    assert set(merged) == {"other_area_key", "tmp_ratio"}
    with pytest.raises(ValueError, match="unknown benchmark area"):
        runner.run_benchmarks(str(out), only="nope")
    area.run = lambda workdir: {"bad": {"value": 1}}
    with pytest.raises(RuntimeError, match="tmparea"):
        runner.run_benchmarks(str(out), only="tmparea", workdir=str(tmp_path / "w"))
    assert set(json.loads(out.read_text())) == {"other_area_key", "tmp_ratio"}  # a failed area loses nothing


def test_benchmark_figures_name_the_code_they_were_measured_with(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "bench" / "areas").mkdir(parents=True)
    monkeypatch.setattr(runner, "AREAS_DIR", repo / "bench" / "areas")
    assert runner.code_version() == "code of unknown version"  # not a git checkout
    (repo / "f.py").write_text("x = 1\n")

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", "f.py")
    git("commit", "-q", "-m", "one")
    commit = git("rev-parse", "--short", "HEAD")
    assert runner.code_version() == f"code {commit}"
    (repo / "new.py").write_text("")  # untracked: not part of the measured code
    assert runner.code_version() == f"code {commit}"
    (repo / "f.py").write_text("x = 2\n")
    assert runner.code_version() == f"code {commit} + uncommitted changes"


def test_benchmark_overrides_measure_a_variant_beside_the_results(tmp_path, monkeypatch):
    seen = {}

    def run(workdir, quick=False, overrides=()):
        seen.update(quick=quick, overrides=overrides)
        return {"tmp_gain": {"value": 1.5, "unit": "points", "goal": "higher", "measured": "today"}}

    area = types.ModuleType("bench.areas.tmparea")
    area.run = run
    monkeypatch.setitem(sys.modules, "bench.areas.tmparea", area)
    monkeypatch.setattr(runner, "areas", lambda: ["tmparea", "plain"])
    out, work = tmp_path / "results.json", tmp_path / "w"
    out.write_text(json.dumps({"tmp_gain": {"value": 0.0, "unit": "points", "goal": "higher", "measured": "m"}}))
    measured = runner.run_benchmarks(str(out), only="tmparea", workdir=str(work), overrides=("a.b=1", "c=2"))
    assert seen == {"quick": False, "overrides": ("a.b=1", "c=2")}
    assert measured["tmp_gain"]["measured"] == f"today, {runner.code_version()} (overrides: a.b=1 c=2)"
    assert json.loads(out.read_text())["tmp_gain"]["value"] == 0.0  # a variant never replaces a result
    assert json.loads((work / "tmparea-variant.json").read_text())["tmp_gain"]["value"] == 1.5
    runner.run_benchmarks(str(out), only="tmparea", workdir=str(work), quick=True, overrides=("a.b=1",))
    assert seen == {"quick": True, "overrides": ("a.b=1",)} and (work / "tmparea-quick.json").exists()
    with pytest.raises(ValueError, match="need one benchmark area"):
        runner.run_benchmarks(str(out), workdir=str(work), overrides=("a.b=1",))
    plain = types.ModuleType("bench.areas.plain")
    plain.run = lambda workdir: {}
    monkeypatch.setitem(sys.modules, "bench.areas.plain", plain)
    with pytest.raises(ValueError, match="'plain' takes no overrides"):
        runner.run_benchmarks(str(out), only="plain", workdir=str(work), overrides=("a.b=1",))
    # Part of a protocol (validate's budgets and arms) is never a result either, and needs an area that takes it.
    with pytest.raises(ValueError, match="'tmparea' takes no budgets"):
        runner.run_benchmarks(str(out), only="tmparea", workdir=str(work), subset={"budgets": (2, 5)})
    area.run = lambda workdir, budgets=(): seen.update(budgets=budgets) or {
        "tmp_gain": {"value": 2.5, "unit": "points", "goal": "higher", "measured": "now"}}
    measured = runner.run_benchmarks(str(out), only="tmparea", workdir=str(work), subset={"budgets": (2, 5)})
    assert seen["budgets"] == (2, 5) and measured["tmp_gain"]["measured"].endswith(" (budgets: 2 5)")
    assert json.loads(out.read_text())["tmp_gain"]["value"] == 0.0
    assert json.loads((work / "tmparea-variant.json").read_text())["tmp_gain"]["value"] == 2.5


def test_validate_subset_options_fail_with_one_clear_error_before_anything_starts(tmp_path, capsys):
    from bench.areas import validate as validate_area

    with pytest.raises(SystemExit):
        main(["bench", "validate", "--budgets", "2,five"])
    assert "argument --budgets: '2,five' is not a comma-separated list of whole numbers" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"validate arms \['augmnted'\] unknown: choose from"):
        validate_area.run(str(tmp_path), arms=("augmnted",))
    with pytest.raises(ValueError, match=r"validate budgets \[0\]"):
        validate_area.run(str(tmp_path), budgets=(0, 5))
    assert list(tmp_path.iterdir()) == []


def test_validate_rejects_a_misspelled_override_before_it_starts_anything(tmp_path):
    from bench.areas import validate as validate_area
    from histodiff.config import ConfigError

    with pytest.raises(ConfigError, match="synthesis.strenght: unknown key"):
        validate_area.run(str(tmp_path), quick=True, overrides=("synthesis.strenght=0.7",))
    assert list(tmp_path.iterdir()) == []  # no shards, no Ray, no generator


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
