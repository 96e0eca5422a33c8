"""MLflow tracking: every MLflow call in histodiff lives here.

Stages use :func:`stage_run` (a nested run under the pipeline's parent when there is one)
and the :class:`Tracker` it yields. With ``tracking.enabled=false`` the tracker is a no-op.
Logging failures (a dead server) are reported once and never kill the stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from typing import Any, Iterator

from histodiff.config import HistodiffConfig
from histodiff.runtime import absolute_tracking_uri

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "HISTODIFF_PARENT_RUN_ID"


class Tracker:
    """A handle on one MLflow run; every method is safe to call when tracking is off."""

    def __init__(self, run_id: str | None, tracking_uri: str | None) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self._client = None
        self._warned = False
        if run_id is not None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri)

    @property
    def active(self) -> bool:
        """Return True when calls reach MLflow."""
        return self._client is not None

    def _safe(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._client is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # tracking must never kill training
            if not self._warned:
                log.warning("MLflow %s failed (%s); training goes on, further failures are silent", what, exc)
                self._warned = True
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (values truncated to MLflow's limit)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._safe("log_params", self._client.log_batch, self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics at a step."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self._safe("log_metrics", self._client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags."""
        for k, v in tags.items():
            self._safe("set_tag", self._client.set_tag, self.run_id, k, str(v))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a local file or directory as an artifact."""
        if os.path.isdir(local_path):
            self._safe("log_artifacts", self._client.log_artifacts, self.run_id, local_path, artifact_path)
        else:
            self._safe("log_artifact", self._client.log_artifact, self.run_id, local_path, artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        """Log a matplotlib figure as a PNG artifact."""
        self._safe("log_figure", self._client.log_figure, self.run_id, figure, name)

    def log_image(self, image: Any, name: str) -> None:
        """Log an HWC uint8 array or PIL image as a PNG artifact."""
        self._safe("log_image", self._client.log_image, self.run_id, image, artifact_file=name)

    def log_dict(self, data: Any, name: str) -> None:
        """Log JSON/YAML-able data as an artifact."""
        self._safe("log_dict", self._client.log_dict, self.run_id, data, name)

    def log_text(self, text: str, name: str) -> None:
        """Log text as an artifact."""
        self._safe("log_text", self._client.log_text, self.run_id, text, name)


NULL_TRACKER = Tracker(None, None)


def _mlflow_ready(cfg: HistodiffConfig) -> str:
    import mlflow

    uri = absolute_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri)
    mlflow.set_tracking_uri(uri)
    return uri


@contextlib.contextmanager
def stage_run(cfg: HistodiffConfig, stage: str, params: dict[str, Any] | None = None) -> Iterator[Tracker]:
    """Open a run for one stage (nested under the active or env-given parent); yield a Tracker.

    The run ends FINISHED, or FAILED when the body raises.
    """
    if not cfg.tracking.enabled:
        yield NULL_TRACKER
        return
    from mlflow.tracking import MlflowClient

    uri = _mlflow_ready(cfg)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
    tags = {"histodiff.stage": stage, "histodiff.name": cfg.name}
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(exp_id, run_name=f"{cfg.name}/{stage}", tags=tags)
    tracker = Tracker(run.info.run_id, uri)
    tracker.log_params({**cfg.flat_params(), **(params or {})})
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker._safe("set_terminated", client.set_terminated, run.info.run_id, status)



def figure_to_png(figure: Any, path: str) -> str:
    """Save a matplotlib figure to a PNG path and close it; return the path."""
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def temp_json(data: Any) -> str:
    """Write data to a temporary JSON file; return its path."""
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    return path
