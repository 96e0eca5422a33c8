"""How histodiff's runs read in the MLflow UI: the experiment opens on its runs, with the gain.

MLflow 3.17's UI opens every experiment in its GenAI mode (a traces dashboard) unless the URL
says ``workflowType=machine_learning``; older and hosted UIs read the experiment tag
``mlflow.experimentKind`` instead, so histodiff sets both. The runs table shows no metric column
until one is chosen; a shared view (experiment tag ``mlflow.sharedViewState.<key>``, opened by
``viewStateShareKey=<key>``) chooses the gain and the expected-range verdict. The evaluate
stage's run is tagged ``mlflow.runType=evaluation`` (it is one), and the UI expands the parent
of such a run, so the stage runs show under ``<name>/pipeline`` on the first visit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from histodiff.headline import PRIMARY, PRIMARY_PARENT
from histodiff.tracking_server import scrub

log = logging.getLogger(__name__)

KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"
VIEW_KEY = "histodiff"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
WORKFLOW = "workflowType=machine_learning"
EXPECTED_TAG = "histodiff.expected"
DEFAULT_UI = "http://127.0.0.1:5000"

COLUMNS = (f"metrics.`{PRIMARY_PARENT}`", f"metrics.`{PRIMARY}`", f"metrics.`{PRIMARY_PARENT}_ci_low`",
           f"metrics.`{PRIMARY_PARENT}_ci_high`", "metrics.`evaluate/quality_fid`", f"tags.`{EXPECTED_TAG}`")


def experiment_description(cfg: Any) -> str:
    """Return the experiment's description (markdown): what its runs are and where the gain is."""
    return (f"**histodiff, preset `{cfg.name}`**: latent diffusion + classifier guidance turns unlabeled "
            f"tiles into labeled training data. Each `{cfg.name}/pipeline` run holds one stage run per step "
            f"(ingest ... evaluate). The number that matters is `{PRIMARY_PARENT}`: balanced accuracy of a "
            "classifier trained on real + synthetic tiles minus real only, in percentage points, with its 95% "
            f"interval (`_ci_low`, `_ci_high`). `{EXPECTED_TAG}` says whether each stage reached the range a "
            f"healthy run of this preset reaches. Models: `{cfg.tracking.registry_prefix}-<kind>"
            f"@{cfg.tracking.champion_alias}` in the Model registry.")


def prepare_experiment(tracker: Any, cfg: Any) -> str | None:
    """Tag the tracker's experiment (kind, description, the gain view); return its id (None when untracked).

    The tags describe the experiment, not a run: when the server does not answer they are set by the
    next run instead (nothing a run measured is lost), so a failure here is logged and passed over.
    """
    if not tracker.active:
        return None
    try:
        exp_id = tracker.client.get_run(tracker.run_id).info.experiment_id
        view = {"selectedColumns": list(COLUMNS), "orderByKey": "attributes.start_time", "orderByAsc": False}
        for key, value in ((KIND_TAG, KIND), (NOTE_TAG, experiment_description(cfg)), (VIEW_TAG, json.dumps(view))):
            tracker.client.set_experiment_tag(exp_id, key, value)
    except Exception as exc:  # an unreachable server: the run itself is buffered by the tracker
        log.warning("could not tag the MLflow experiment for the UI (%s); the next run will", scrub(exc)[:200])
        return None
    return exp_id


def stage_tags(stage: str) -> dict[str, str]:
    """Return the MLflow tags a stage run carries for the UI."""
    return {"mlflow.runType": "evaluation"} if stage == "evaluate" else {}


def ui_base(tracking_uri: str) -> str:
    """Return the address of the UI for a tracking URI (a local ``mlflow ui`` for a file store)."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI


def experiment_url(tracking_uri: str, experiment_id: str) -> str:
    """Return the URL of the experiment's runs table with the gain column."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?{WORKFLOW}&viewStateShareKey={VIEW_KEY}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Return the URL of one run's page, in the UI's model-training mode."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW}"


def ui_command(tracking_uri: str) -> str:
    """Return the shell command that serves the UI for a local store, with the mlflow of this environment."""
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    if not os.path.isfile(exe):
        exe = "mlflow"
    elif exe.startswith(os.getcwd() + os.sep):
        exe = os.path.relpath(exe)  # `.venv/bin/mlflow`: a fresh machine has no mlflow on PATH
    return f"{exe} ui --backend-store-uri {tracking_uri}"


def _pct(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def gain_table(evaluation: Any) -> str:
    """Return the evaluation as a markdown table: arms in percent, gains in points with their 95% interval."""
    metrics = list(next(iter(evaluation.summary.values())).keys())
    n = len({o.seed for o in evaluation.outcomes})
    lines = [f"| arm ({n} seed(s), test split, %) | " + " | ".join(metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for arm, values in evaluation.summary.items():
        lines.append(f"| {arm} | " + " | ".join(_pct(*values[m]) for m in metrics) + " |")
    for arm, gains in evaluation.gains.items():
        cells = [f"**{100 * gains[m]['mean']:+.1f}** [{100 * gains[m]['ci_low']:+.1f}, {100 * gains[m]['ci_high']:+.1f}]"
                 for m in metrics]
        lines.append(f"| gain {arm} − baseline (points, 95% CI) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parent_note(cfg: Any, stages: dict[str, Any], figures: dict[str, dict[str, float]],
                verdicts: dict[str, str]) -> str:
    """Return the pipeline run's description (markdown): the gain table, then each stage's figures and verdict."""
    from histodiff.headline import summary_text

    out = [f"## histodiff `{cfg.name}` pipeline"]
    evaluation = stages.get("evaluate")
    if evaluation is not None and evaluation.summary:
        out += ["", "### Downstream gain", "", gain_table(evaluation)]
    out += ["", "### Stages", "", "| stage | key figures | expected range | seconds |", "|---|---|---|---|"]
    for name, values in figures.items():
        out.append(f"| {name} | {summary_text(name, values) or '-'} | {verdicts.get(name, '-')} | "
                   f"{values.get('seconds', 0):.0f} |")
    return "\n".join(out)
