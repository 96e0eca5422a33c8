"""The whole chain under one MLflow parent run: each stage a nested run, in data-flow order.

Each stage is skipped when it finished with the same spec (:mod:`histodiff.runner`), so
rerunning the pipeline with the same config resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from histodiff import headline, mlflow_ui, tracking
from histodiff.config import HistodiffConfig
from histodiff.errors import UserError
from histodiff.expected import WITHIN
from histodiff.runner import resumable_run, run_stage
from histodiff.stages import NAMES, STAGES
from histodiff.storage import Store

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    """What the pipeline did: each stage's result, timings, registered models, the MLflow run."""

    stages: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    registered: list[str] = field(default_factory=list)
    parent_run_id: str | None = None
    experiment: str = ""
    experiment_id: str | None = None
    figures: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> headline figures


def resolve_stages(stages: list[str] | None) -> list[str]:
    """Return the requested stage names in data-flow order, or raise naming the unknown one."""
    if not stages:
        return list(NAMES)
    unknown = [s for s in stages if s not in NAMES]
    if unknown:
        raise UserError(f"--stages: unknown stage {', '.join(map(repr, unknown))}; choose from {','.join(NAMES)}")
    return [s for s in NAMES if s in stages]


def run_pipeline(cfg: HistodiffConfig, stages: list[str] | None = None) -> PipelineResult:
    """Run the stages in order under one parent run; return their results."""
    names = resolve_stages(stages)
    out = PipelineResult(experiment=cfg.tracking.experiment)
    opener = functools.partial(tracking.parent_run, cfg, "pipeline", params={"pipeline.stages": ",".join(names)})
    # A pipeline killed earlier with the same config and stages continues its parent run.
    with resumable_run(cfg, Store(cfg.storage), f"pipeline-{cfg.name}", f"{cfg.fingerprint()}:{','.join(names)}",
                       opener) as parent:
        out.parent_run_id = parent.run_id
        out.experiment_id = mlflow_ui.prepare_experiment(parent, cfg)
        for i, (stage, name) in enumerate((s, n) for s, n in zip(STAGES, NAMES) if n in names):
            result = run_stage(stage, cfg, parent_run_id=parent.run_id, position=f"{i + 1}/{len(names)}")
            out.stages[name], out.seconds[name] = result, result.seconds
            out.registered += result.registered
            # The parent shows every stage's key figures as stage/name, so one run answers "how did it go".
            out.figures[name] = headline.figures(name, result)
            parent.log_metrics({headline.parent_name(name, k): v for k, v in out.figures[name].items()})
        verdicts = {n: r.expected for n, r in out.stages.items() if r.expected}
        off = [n for n, v in verdicts.items() if v.startswith("OFF")]
        judged = [n for n, v in verdicts.items() if v.startswith(("OFF", WITHIN))]
        overall = f"OFF in {', '.join(off)}" if off else \
            f"{WITHIN} ({len(judged)} stage(s) judged)" if judged else "no expected range for this preset"
        parent.set_tags({mlflow_ui.NOTE_TAG: mlflow_ui.parent_note(cfg, out.stages, out.figures, verdicts),
                         mlflow_ui.EXPECTED_TAG: overall})
        parent.log_dict({"stages": {k: dataclasses.asdict(v) for k, v in out.stages.items()},
                         "seconds": out.seconds, "registered": out.registered,
                         "config_fingerprint": cfg.fingerprint()}, "pipeline_results.json")
    return out
