"""What a user reads: progress lines, the worker-output filter, metric names, expected ranges, MLflow UI links."""

from __future__ import annotations

import dataclasses
import logging
import re
import sys

import pytest

from histodiff import console, expected, headline, mlflow_ui


def test_progress_prints_at_most_every_interval_and_always_a_final_line():
    lines: list[str] = []
    progress = console.Progress("pretrain", 100, "steps", every_s=3600, emit=lines.append)
    for step in range(1, 100):
        progress.update(step, {"loss": 0.5})
    assert lines == []  # inside the interval and not done: silent
    progress.update(100, {"loss": 0.25}, rate=4.0)
    assert lines == []  # short work: the stage's end line says enough
    progress.update(100, {"loss": 0.25}, rate=4.0, force=True)  # the training loop's last report
    assert lines == ["histodiff pretrain  100/100 steps  loss 0.25  4 steps/s"]


def test_progress_line_has_counts_figures_rate_and_eta():
    line = console.progress_line("autoencoder", 40, 200, "steps", 2.0, 80.0, {"loss": 0.0123})
    assert line == "histodiff autoencoder  40/200 steps  loss 0.0123  2 steps/s  ETA 1m20s"
    assert console.duration(3725) == "1h02m" and console.duration(7) == "7s"


def test_synthesis_that_stops_at_its_quota_ends_at_100_percent_saying_so():
    lines: list[str] = []
    progress = console.Progress("synthesize", 192, "tiles", every_s=-1, emit=lines.append)
    progress.update(128)
    progress.finish("quota reached after 128 generated tiles")
    assert lines[0].startswith("histodiff synthesize  128/192 tiles")
    assert "192/192 tiles" in lines[-1] and "quota reached" in lines[-1]


def test_only_histodiff_lines_from_workers_reach_the_console(monkeypatch):
    from ray._private import worker as ray_worker

    printed: list[dict] = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data))
    console._print_histodiff_lines({"lines": [
        "[core_worker.cc:123] E Actor with class name: 'PlacementGroupCleaner' ...",
        "Cannot initialize model with low cpu memory usage because `accelerate` was not found",
        "histodiff pretrain  20/500 steps  loss 0.3  3 steps/s  ETA 2m40s",
        "- split(1, equal=True):   0%|          | 0.00/1.00 [00:00<?, ? row/s]"], "pid": 7, "is_err": False})
    assert [d["lines"] for d in printed] == [["histodiff pretrain  20/500 steps  loss 0.3  3 steps/s  ETA 2m40s"]]
    console._print_histodiff_lines({"lines": ["Reporting training result 3"], "pid": 7, "is_err": False})
    assert len(printed) == 1  # nothing of ours: nothing printed


def test_quiet_by_default_and_everything_with_verbose(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert console.quiet_env()["RAY_DATA_DISABLE_PROGRESS_BARS"] == "1"
    assert console.quiet_env()["DIFFUSERS_VERBOSITY"] == "error"
    from histodiff.runtime import worker_env

    assert worker_env()["DIFFUSERS_VERBOSITY"] == "error"  # workers load diffusers models too
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.verbose() and console.quiet_env() == {}
    assert worker_env()[console.VERBOSE_ENV] == "1"


def test_console_lines_read_as_sentences_and_other_records_keep_their_source():
    fmt = console._Format()
    mine = logging.LogRecord("histodiff.console", logging.INFO, __file__, 1, "pretrain (4/8): started", None, None)
    other = logging.LogRecord("histodiff.storage", logging.WARNING, __file__, 1, "slow", None, None)
    assert fmt.format(mine).endswith(" pretrain (4/8): started") and "INFO" not in fmt.format(mine)
    assert fmt.format(other).endswith(" WARNING histodiff.storage: slow")


def test_one_metric_scheme_with_units_in_the_names():
    assert headline.metric_name("labeled", "skipped", "too small") == "labeled_skipped_too_small"
    assert headline.parent_name("evaluate", headline.PRIMARY) == headline.PRIMARY_PARENT
    summary = {"baseline": {"balanced_accuracy": [0.9, 0.02]}, "augmented": {"balanced_accuracy": [0.93, 0.01]}}
    gains = {"augmented": {"balanced_accuracy": {"mean": 0.03, "ci_low": -0.01, "ci_high": float("nan")}}}
    figures = headline.evaluation_figures(summary, gains, {"fid": 70.5, "extractor": "x"})
    assert figures["gain_balanced_accuracy_points"] == pytest.approx(3.0)
    assert figures["baseline_balanced_accuracy_pct"] == pytest.approx(90.0)
    assert figures["quality_fid"] == 70.5
    assert "gain_balanced_accuracy_points_ci_high" not in figures  # NaN is no metric
    assert all(("/" not in k and "." not in k) for k in figures)


def test_stage_figures_name_their_units_and_selectivity():
    @dataclasses.dataclass
    class Synth:
        generated: dict
        accepted: dict
        seconds: float = 12.0

    got = headline.figures("synthesize", Synth({"A": 32, "B": 64}, {"A": 12, "B": 12}))
    assert got == {"generated_tiles": 96.0, "accepted_tiles": 24.0, "selectivity_pct": 25.0, "seconds": 12.0}
    assert headline.summary_text("synthesize", got) == "generated_tiles 96, accepted_tiles 24, selectivity_pct 25"


def test_pseudolabel_off_says_no_tiles_rather_than_a_confidence_of_zero():
    from histodiff.stages.pseudolabel import Result

    off = headline.figures("pseudolabel", Result(pseudo_labels_uri="x", seconds=0.1))
    assert off == {"pseudo_labeled_tiles": 0.0, "seconds": 0.1}
    on = headline.figures("pseudolabel", Result(pseudo_labels_uri="x", per_class={"A": 3, "B": 2}, mean_confidence=0.8))
    assert on == {"pseudo_labeled_tiles": 5.0, "mean_confidence": 0.8}


def test_tiny_ships_measured_ranges_and_names_the_figure_that_is_off():
    good = expected.check("tiny", "autoencoder", {"psnr_db": 26.4, "ssim": 0.79})
    assert good.ok is True and good.text().startswith(expected.WITHIN)
    bad = expected.check("tiny", "autoencoder", {"psnr_db": 12.0, "ssim": 0.79})
    assert bad.ok is False and "psnr_db 12" in bad.text() and "ssim" not in bad.text()
    assert re.search(r"\d+ demo runs?", expected.load("tiny")["basis"])  # says how many runs they come from
    assert expected.check("tiny", "no-such-stage", {"x": 1}).ok is None


def test_paper_figures_are_literature_values_marked_as_such_and_never_judged():
    verdict = expected.check("paper", "evaluate", {"gain_accuracy_points": 1.0})
    assert verdict.ok is None and "literature" in verdict.text() and "Ye et al." in verdict.text()
    assert "OFF" not in verdict.text()


def test_ui_links_open_the_runs_view_with_the_gain_column(tmp_path, monkeypatch):
    url = mlflow_ui.experiment_url("sqlite:////x/mlflow.db", "3")
    assert url == ("http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
                   "&viewStateShareKey=histodiff")
    assert mlflow_ui.run_url("http://mlflow:5000/", "3", "abc") == \
        "http://mlflow:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert f"metrics.`{headline.PRIMARY_PARENT}`" in mlflow_ui.COLUMNS
    assert mlflow_ui.stage_tags("evaluate") == {"mlflow.runType": "evaluation"} and mlflow_ui.stage_tags("ingest") == {}
    # The UI command names this environment's mlflow, relative to the folder when inside it (.venv/bin/mlflow).
    command = mlflow_ui.ui_command("sqlite:////x/mlflow.db")
    assert command.endswith(" ui --backend-store-uri sqlite:////x/mlflow.db")
    exe = command.split()[0]
    assert exe == "mlflow" or exe.endswith("/mlflow") and (exe.startswith("/") or not exe.startswith(".."))
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "mlflow").write_text("")
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.chdir(tmp_path)
    assert mlflow_ui.ui_command("sqlite:////x/m.db") == ".venv/bin/mlflow ui --backend-store-uri sqlite:////x/m.db"
