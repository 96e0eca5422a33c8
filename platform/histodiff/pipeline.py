"""The whole chain under one MLflow parent run: each stage a nested run, in data-flow order.

Each stage skips work it has already finished (its own outputs carry completion markers),
so rerunning the pipeline with the same config resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from histodiff import registry, tracking
from histodiff.config import HistodiffConfig
from histodiff.stages import STAGES, get_stage

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    """What the pipeline did: each stage's result, timings, registered models, the MLflow run."""

    stages: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    registered: list[str] = field(default_factory=list)
    parent_run_id: str | None = None
    experiment: str = ""


def resolve_stages(stages: list[str] | None) -> list[str]:
    """Return the requested stage names in data-flow order, or raise naming the unknown one."""
    if not stages:
        return list(STAGES)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    return [s for s in STAGES if s in stages]


def run_stage(cfg: HistodiffConfig, name: str, parent_run_id: str | None = None) -> tuple[Any, list[str]]:
    """Run one stage, then register the models it exported; return (result, registered names)."""
    result = get_stage(name)(cfg)
    registered: list[str] = []
    if cfg.tracking.enabled and any(owner == name for _, owner in registry.MODEL_KINDS.values()):
        # Log models into the stage's own (finished) run, so the UI shows them beside its metrics.
        run_id = tracking.find_stage_run(cfg, name, parent_run_id)
        if run_id is None:
            log.warning("no MLflow run of stage %s found; its models are logged to the parent run", name)
            run_id = parent_run_id
        if run_id:
            tracker = tracking.Tracker(run_id, tracking.tracking_uri(cfg))
            registered = [f"{m.name}/{m.version}" for m in registry.register_stage_models(cfg, tracker, name)]
    return result, registered


def _as_data(result: Any) -> Any:
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    return result if isinstance(result, (dict, list, str, int, float, bool, type(None))) else repr(result)


def run_pipeline(cfg: HistodiffConfig, stages: list[str] | None = None) -> PipelineResult:
    """Run the stages in order under one parent run; return their results."""
    names = resolve_stages(stages)
    out = PipelineResult(experiment=cfg.tracking.experiment)
    with tracking.parent_run(cfg, "pipeline", params={"pipeline.stages": ",".join(names)}) as parent:
        out.parent_run_id = parent.run_id
        for i, name in enumerate(names):
            log.info("pipeline stage %d/%d: %s", i + 1, len(names), name)
            start = time.perf_counter()
            result, registered = run_stage(cfg, name, parent.run_id)
            out.seconds[name] = round(time.perf_counter() - start, 3)
            out.stages[name] = result
            out.registered += registered
            # The parent shows every stage's headline numbers, so one run answers "how did it go".
            parent.log_metrics({f"{name}.{k}": v for k, v in tracking.result_metrics(result).items()}, step=i)
            parent.log_metrics({f"{name}.seconds": out.seconds[name]}, step=i)
        parent.log_dict({"stages": {k: _as_data(v) for k, v in out.stages.items()}, "seconds": out.seconds,
                         "registered": out.registered, "config_fingerprint": cfg.fingerprint()},
                        "pipeline_results.json")
    return out
