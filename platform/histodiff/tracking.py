"""MLflow tracking: every MLflow call in histodiff lives here.

The runner (:mod:`histodiff.runner`) opens one :func:`stage_run` per stage, nested under the
pipeline's, sweep's or trial's run whose id it is given, and hands the :class:`Tracker` to
the stage. :func:`parent_run` opens the pipeline or sweep parent. With
``tracking.enabled=false`` the tracker is a no-op. Logging failures (a dead server) are
reported once and never kill the stage; metrics go through MLflow's asynchronous logging.
Exported models are registered by :mod:`histodiff.registry`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import tempfile
import time
from typing import Any, Iterator

from histodiff.config import HistodiffConfig
from histodiff.runtime import absolute_tracking_uri
from histodiff.storage import redact

log = logging.getLogger(__name__)

# After a failed call, skip calls for this long: a dead server must not cost a timeout per step.
_BACKOFF_S = 60.0
# Runs this process opened and has not ended yet; atexit marks them FAILED (a crash that
# skips ``finally``, e.g. sys.exit from a signal handler, must not leave them RUNNING).
_OPEN_RUNS: dict[str, str] = {}


def scrub(value: Any) -> str:
    """Return ``str(value)`` with every secret found in the environment replaced by ``***``."""
    return redact(str(value))


class Tracker:
    """A handle on one MLflow run; every method is safe to call when tracking is off."""

    def __init__(self, run_id: str | None, tracking_uri: str | None, async_metrics: bool = True) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.async_metrics = async_metrics
        self._client = None
        self._warned = False
        self._skip_until = 0.0
        self._pending: list[Any] = []
        if run_id is not None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri)

    @property
    def active(self) -> bool:
        """Return True when calls reach MLflow."""
        return self._client is not None

    @property
    def client(self) -> Any:
        """Return the underlying MlflowClient (None when tracking is off)."""
        return self._client

    def _safe(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` (or the client method named by it); report failures once, never raise."""
        if self._client is None or time.monotonic() < self._skip_until:
            return None
        try:
            return (getattr(self._client, fn) if isinstance(fn, str) else fn)(*args, **kwargs)
        except Exception as exc:  # tracking must never kill training
            self._skip_until = time.monotonic() + _BACKOFF_S
            if not self._warned:
                log.warning("MLflow %s failed (%s); training goes on, tracking retries in %.0f s",
                            what, scrub(exc)[:300], _BACKOFF_S)
                self._warned = True
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (secrets scrubbed, values truncated to MLflow's limit)."""
        from mlflow.entities import Param

        items = [Param(k, scrub(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._safe("log_params", "log_batch", self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics at a step (asynchronously unless tracking.async_metrics=false)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        if not items:
            return
        ops = self._safe("log_metrics", "log_batch", self.run_id, metrics=items,
                         synchronous=not self.async_metrics)
        if ops is not None:
            self._pending.append(ops)

    def flush(self) -> None:
        """Wait for queued asynchronous metrics (failures are reported, not raised)."""
        pending, self._pending = self._pending, []
        for ops in pending:
            self._safe("flush", ops.wait)

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (secrets scrubbed)."""
        from mlflow.entities import RunTag

        items = [RunTag(k, scrub(v)[:5000]) for k, v in tags.items()]
        if items:
            self._safe("set_tags", "log_batch", self.run_id, tags=items)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a local file or directory as an artifact."""
        if os.path.isdir(local_path):
            self._safe("log_artifacts", "log_artifacts", self.run_id, local_path, artifact_path)
        else:
            self._safe("log_artifact", "log_artifact", self.run_id, local_path, artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        """Log a matplotlib figure as a PNG artifact."""
        self._safe("log_figure", "log_figure", self.run_id, figure, name)

    def log_png(self, data: bytes, name: str) -> None:
        """Log PNG bytes (e.g. :func:`histodiff.plots.figure_png`) as an artifact at ``name``."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, os.path.basename(name))
            with open(path, "wb") as f:
                f.write(data)
            self.log_artifact(path, os.path.dirname(name) or None)

    def log_image(self, image: Any, name: str) -> None:
        """Log an HWC uint8 array or PIL image as a PNG artifact."""
        self._safe("log_image", "log_image", self.run_id, image, artifact_file=name)

    def log_dict(self, data: Any, name: str) -> None:
        """Log JSON/YAML-able data as an artifact (secrets scrubbed)."""
        clean = json.loads(scrub(json.dumps(data, default=str)))
        self._safe("log_dict", "log_dict", self.run_id, clean, name)

    def log_text(self, text: str, name: str) -> None:
        """Log text as an artifact (secrets scrubbed)."""
        self._safe("log_text", "log_text", self.run_id, scrub(text), name)

    def log_config(self, cfg: HistodiffConfig) -> None:
        """Log the public config (no secrets) as ``config.yaml``."""
        self.log_dict(cfg.public_dict(), "config.yaml")


NULL_TRACKER = Tracker(None, None)


def tracking_uri(cfg: HistodiffConfig) -> str:
    """Return the effective tracking URI: the config's, or MLFLOW_TRACKING_URI when the config keeps the default.

    A cluster sets MLFLOW_TRACKING_URI for every job; a config that names a URI wins.
    (histodiff never calls ``mlflow.set_tracking_uri``: it writes that variable process-wide.)
    """
    from histodiff.config import TrackingConfig

    uri = cfg.tracking.tracking_uri
    if uri == TrackingConfig.model_fields["tracking_uri"].default and os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
    return absolute_tracking_uri(uri)


def _mlflow_ready(cfg: HistodiffConfig) -> str:
    # Short timeouts and few retries: MLflow's defaults (120 s, 7 retries) stall a stage for
    # minutes when the server is down. The user's own environment settings still win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.tracking.request_timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.tracking.request_max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    return tracking_uri(cfg)


def experiment_id(cfg: HistodiffConfig) -> str:
    """Return the id of the configured experiment, creating it when missing."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_mlflow_ready(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)


def _end_open_runs() -> None:
    if not _OPEN_RUNS:
        return
    from mlflow.tracking import MlflowClient

    for run_id, uri in list(_OPEN_RUNS.items()):
        with contextlib.suppress(Exception):
            MlflowClient(tracking_uri=uri).set_terminated(run_id, "FAILED")
        _OPEN_RUNS.pop(run_id, None)


atexit.register(_end_open_runs)


@contextlib.contextmanager
def _run(cfg: HistodiffConfig, run_name: str, tags: dict[str, str], params: dict[str, Any] | None,
         parent_run_id: str | None, resume_run_id: str | None = None) -> Iterator[Tracker]:
    """Open (or reopen) one run; yield its Tracker; end it FINISHED, or FAILED when the body raises."""
    uri = _mlflow_ready(cfg)
    probe = Tracker("-", uri)  # reuse the never-raise wrapper for opening the run
    exp_id = probe._safe("get_experiment", experiment_id, cfg)
    if parent_run_id:
        tags = {**tags, "mlflow.parentRunId": parent_run_id}
    run = None
    if resume_run_id and exp_id:
        run = probe._safe("get_run", "get_run", resume_run_id)
        if run is not None and run.info.experiment_id == exp_id:
            probe._safe("update_run", "update_run", resume_run_id, status="RUNNING")
            params = None  # already logged; MLflow refuses to change a param
        else:
            run = None
    if run is None and exp_id:
        run = probe._safe("create_run", "create_run", exp_id, run_name=run_name,
                          tags={k: scrub(v) for k, v in tags.items()})
    if run is None:
        log.warning("MLflow at %s is unreachable: %s runs without tracking", scrub(uri), run_name)
        yield NULL_TRACKER
        return
    tracker = Tracker(run.info.run_id, uri, async_metrics=cfg.tracking.async_metrics)
    _OPEN_RUNS[tracker.run_id] = uri
    if params is not None:
        tracker.log_params(params)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except BaseException as exc:
        tracker.set_tags({"histodiff.error": f"{type(exc).__name__}: {exc}"[:1000]})
        raise
    finally:
        tracker.flush()
        tracker._skip_until = 0.0  # always try to close the run, even after an outage
        tracker._safe("set_terminated", "set_terminated", tracker.run_id, status)
        _OPEN_RUNS.pop(tracker.run_id, None)


@contextlib.contextmanager
def stage_run(cfg: HistodiffConfig, stage: str, params: dict[str, Any] | None = None,
              parent_run_id: str | None = None, run_name: str | None = None) -> Iterator[Tracker]:
    """Open a run for one stage (nested under ``parent_run_id`` when given); yield a Tracker.

    The run ends FINISHED, or FAILED when the body raises (or the process dies).
    """
    if not cfg.tracking.enabled:
        yield NULL_TRACKER
        return
    tags = {"histodiff.stage": stage, "histodiff.name": cfg.name}
    with _run(cfg, run_name or f"{cfg.name}/{stage}", tags, params or {}, parent_run_id) as tracker:
        yield tracker


@contextlib.contextmanager
def parent_run(cfg: HistodiffConfig, kind: str, params: dict[str, Any] | None = None,
               resume_run_id: str | None = None) -> Iterator[Tracker]:
    """Open (or, with ``resume_run_id``, reopen) a top-level run holding the whole config; yield its Tracker."""
    if not cfg.tracking.enabled:
        yield NULL_TRACKER
        return
    tags = {"histodiff.stage": kind, "histodiff.name": cfg.name, "histodiff.kind": "parent"}
    with _run(cfg, f"{cfg.name}/{kind}", tags, {**cfg.flat_params(), **(params or {})}, None,
              resume_run_id) as tracker:
        tracker.log_config(cfg)
        yield tracker


def result_metrics(result: Any, prefix: str = "") -> dict[str, float]:
    """Return the numeric fields of a (nested) result dataclass/dict as flat metrics."""
    import dataclasses

    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    out: dict[str, float] = {}
    if isinstance(result, dict):
        for key, value in result.items():
            out.update(result_metrics(value, f"{prefix}{key}."))
    elif isinstance(result, bool):
        out[prefix.rstrip(".")] = float(result)
    elif isinstance(result, (int, float)) and result == result:  # drop NaN
        out[prefix.rstrip(".")] = float(result)
    return {k: v for k, v in out.items() if k}
