"""MLflow tracking: runs, the buffer's settings and the sync of calls that waited for the server.

The runner (:mod:`histodiff.runner`) opens one :func:`stage_run` per stage, nested under the
pipeline's, sweep's or trial's run whose id it is given, and hands the :class:`Tracker`
(:mod:`histodiff.tracker`) to the stage. :func:`parent_run` opens the pipeline or sweep parent.
With ``tracking.enabled=false`` the tracker is a no-op. When the server goes down, calls wait
on local disk (:mod:`histodiff.tracking_buffer`) and are sent when it is back; what is still
waiting when a command ends (with the runs' final status and the models to register) is sent
by :func:`sync_pending`, which every stage calls first and ``histodiff tracking sync`` runs.
Exported models are registered by :mod:`histodiff.registry`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from typing import Any, Iterator

from histodiff import tracking_buffer as tb
from histodiff.config import HistodiffConfig
from histodiff.runtime import absolute_tracking_uri
from histodiff.storage import Store, join, redact_url
from histodiff.tracker import NULL_TRACKER, Tracker
from histodiff.tracking_server import reachable, reason, scrub

log = logging.getLogger(__name__)

# Runs this process opened and has not ended yet; atexit ends them FAILED (a crash that skips
# ``finally``, e.g. sys.exit from a signal handler, must not leave them RUNNING).
_OPEN_RUNS: dict[str, Tracker] = {}
# Where Ray Train workers leave the calls they could not send, under the stage's checkpoints.
HANDOFF_DIR = "_tracking"


def buffer_settings(cfg: HistodiffConfig) -> tb.BufferSettings:
    """Return where calls wait during an outage, how much may wait, and how often to look for the server."""
    t = cfg.tracking
    root = os.path.abspath(os.path.expanduser(t.buffer_dir)) if t.buffer_dir else tb.default_root()
    return tb.BufferSettings(root, t.buffer_max_mb, t.retry_s, float(min(5, t.request_timeout_s)))


def handoff_uri(checkpoints_uri: str, run_id: str) -> str:
    """Return where Ray Train workers leave a run's waiting calls for the driver."""
    return join(checkpoints_uri, HANDOFF_DIR, run_id)


def loop_config(tracker: Tracker, store: Store | None = None) -> dict:
    """Return the Ray Train loop-config entries that let rank 0 log to the driver's run (and buffer like it)."""
    return {"mlflow_run_id": tracker.run_id, "mlflow_tracking_uri": tracker.tracking_uri,
            "mlflow_run_name": tracker.name, "mlflow_buffer": tracker.settings.as_dict(),
            # Calls a worker could not send go to storage, where the driver (on any machine) finds them.
            "mlflow_handoff": (store, tracker.handoff[1]) if tracker.handoff and store is not None else None}


_WORKER_TRACKERS: dict[str, Tracker] = {}


def worker_tracker(config: dict) -> Tracker:
    """Return this process's tracker on the run named in a :func:`loop_config` (one per process and run)."""
    run_id = config.get("mlflow_run_id")
    if not run_id:
        return NULL_TRACKER
    if run_id not in _WORKER_TRACKERS:  # one tracker: one outage line, one buffer, in call order
        buffer = config.get("mlflow_buffer")
        _WORKER_TRACKERS[run_id] = Tracker(run_id, config.get("mlflow_tracking_uri"),
                                           tb.BufferSettings(**buffer) if buffer else None,
                                           handoff=config.get("mlflow_handoff"), name=config.get("mlflow_run_name", ""))
    return _WORKER_TRACKERS[run_id]


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
    for tracker in list(_OPEN_RUNS.values()):
        with contextlib.suppress(Exception):
            tracker.close("FAILED")
        _OPEN_RUNS.pop(tracker.run_id, None)


atexit.register(_end_open_runs)


def _open_run(cfg: HistodiffConfig, uri: str, run_name: str, tags: dict[str, str],
              resume_run_id: str | None) -> tuple[Any, bool]:
    """Return (the run, whether it is ``resume_run_id`` reopened); (None, False) when MLflow is unreachable."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        exp_id = experiment_id(cfg)
        if resume_run_id:
            try:
                run = client.get_run(resume_run_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                run = None
            if run is not None and run.info.experiment_id == exp_id and run.info.lifecycle_stage == "active":
                client.update_run(resume_run_id, status="RUNNING")
                return run, True
        return client.create_run(exp_id, run_name=run_name, tags={k: scrub(v) for k, v in tags.items()}), False
    except Exception as exc:
        log.warning("MLflow at %s is unreachable (%s): %s runs without tracking", scrub(uri), reason(exc), run_name)
        return None, False


@contextlib.contextmanager
def _run(cfg: HistodiffConfig, run_name: str, tags: dict[str, str], params: dict[str, Any] | None,
         parent_run_id: str | None, resume_run_id: str | None = None,
         checkpoints_uri: str | None = None) -> Iterator[Tracker]:
    """Open (or reopen) one run; yield its Tracker; end it FINISHED, or FAILED when the body raises."""
    uri = _mlflow_ready(cfg)
    if parent_run_id:
        tags = {**tags, "mlflow.parentRunId": parent_run_id}
    run, resumed = _open_run(cfg, uri, run_name, tags, resume_run_id)
    if run is None:
        yield NULL_TRACKER
        return
    run_id = run.info.run_id
    handoff = (Store(cfg.storage), handoff_uri(checkpoints_uri, run_id)) if checkpoints_uri else None
    tracker = Tracker(run_id, uri, buffer_settings(cfg), handoff=handoff, name=run_name)
    _OPEN_RUNS[run_id] = tracker
    if resumed:
        log.info("continuing MLflow run %s (%s) that an earlier attempt left open", run_id, run_name)
    elif params is not None:
        tracker.log_params(params)  # a reopened run has them already: MLflow refuses to change a param
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except BaseException as exc:
        tracker.set_tags({"histodiff.error": f"{type(exc).__name__}: {exc}"[:1000]})
        raise
    finally:
        tracker.close(status)
        _OPEN_RUNS.pop(run_id, None)


@contextlib.contextmanager
def stage_run(cfg: HistodiffConfig, stage: str, params: dict[str, Any] | None = None,
              parent_run_id: str | None = None, run_name: str | None = None,
              resume_run_id: str | None = None) -> Iterator[Tracker]:
    """Open a run for one stage (nested under ``parent_run_id``; ``resume_run_id`` reopens it); yield a Tracker.

    The run ends FINISHED, or FAILED when the body raises (or the process exits).
    """
    if not cfg.tracking.enabled:
        yield NULL_TRACKER
        return
    tags = {"histodiff.stage": stage, "histodiff.name": cfg.name}
    with _run(cfg, run_name or f"{cfg.name}/{stage}", tags, params or {}, parent_run_id, resume_run_id,
              cfg.paths.checkpoints) as tracker:
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


def end_stale_run(cfg: HistodiffConfig, run_id: str, successor: str | None) -> None:
    """End a run that a killed earlier attempt left RUNNING as KILLED, tagged with the run that replaces it."""
    if not cfg.tracking.enabled:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_mlflow_ready(cfg))
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
        if successor:
            client.set_tag(run_id, "histodiff.superseded_by", successor)
            client.set_tag(successor, "histodiff.previous_run_id", run_id)
    except Exception as exc:  # a run that no longer exists, or a server that is down: nothing to close
        log.info("could not close the earlier attempt's MLflow run %s: %s", run_id, reason(exc))


def end_orphaned_children(cfg: HistodiffConfig, parent_run_id: str | None, why: str) -> list[str]:
    """End as KILLED every run nested under ``parent_run_id`` (at any depth) that is still RUNNING; return their ids.

    Called once all the children's processes are over (a sweep's trials after ``Tuner.fit``): a
    child still RUNNING then belonged to a process that died without ending it, for example
    with the node it ran on. ``why`` goes into its ``histodiff.error`` tag.
    """
    if not cfg.tracking.enabled or not parent_run_id:
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_mlflow_ready(cfg))
    ended: list[str] = []
    try:
        exp_id = client.get_run(parent_run_id).info.experiment_id
        todo = [parent_run_id]
        while todo:
            children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{todo.pop()}'", max_results=1000)
            for run in children:
                todo.append(run.info.run_id)
                if run.info.status == "RUNNING":
                    client.set_tag(run.info.run_id, "histodiff.error", why)
                    client.set_terminated(run.info.run_id, "KILLED")
                    ended.append(run.info.run_id)
    except Exception as exc:  # a server that is down: the runs stay as they are, said once
        log.warning("could not close the MLflow runs left open under %s: %s", parent_run_id, reason(exc))
    if ended:
        log.warning("%d MLflow run(s) under %s were left RUNNING by a process that died; ended as KILLED",
                    len(ended), parent_run_id)
    return ended


def sync_pending(cfg: HistodiffConfig, store: Store | None = None) -> list[tuple[str, int]]:
    """Send the calls that earlier commands left waiting for this config's server; return (run id, calls sent).

    Runs of live processes are left alone unless their owner ended them. With a store, calls that
    Ray Train workers left under ``<paths.checkpoints>/_tracking/`` are collected first.
    """
    if not cfg.tracking.enabled:
        return []
    uri, settings = _mlflow_ready(cfg), buffer_settings(cfg)
    if store is not None:
        _collect_handoffs(cfg, store, settings, uri)
    runs = waiting_runs(cfg)
    if not runs:
        return []
    if not reachable(uri, settings.probe_timeout_s):
        log.warning("MLflow at %s is unreachable: the tracking calls of %d run(s) keep waiting in %s",
                    scrub(uri), len(runs), settings.root)
        return []
    done = []
    for run_id in runs:
        path = tb.run_dir(settings.root, run_id)
        meta = tb.read_meta(path)
        if not meta.get("ended") and any(tb.writer_alive(s) for s in tb.segments(path)):
            continue  # a live process still logs to it and sends its own calls
        tracker = Tracker(run_id, uri, settings, name=run_id)
        tracker.store = store
        try:
            sent = tracker._replay(None)
        except tb.Unreachable:
            continue
        tb.forget_if_empty(path)
        log.warning("MLflow tracking sync: sent the %d calls that run %s left waiting%s", sent, run_id,
                    f" (it ended {meta['status']})" if meta.get("status") else "")
        done.append((run_id, sent))
    return done


def waiting_runs(cfg: HistodiffConfig) -> list[str]:
    """Return the ids of runs whose calls wait in the buffer for this config's tracking server."""
    uri, root = redact_url(tracking_uri(cfg)), buffer_settings(cfg).root
    return [r for r in tb.pending_runs(root) if tb.read_meta(tb.run_dir(root, r)).get("tracking_uri") == uri]


def _collect_handoffs(cfg: HistodiffConfig, store: Store, settings: tb.BufferSettings, uri: str) -> None:
    base = join(cfg.paths.checkpoints, HANDOFF_DIR)
    try:
        run_ids = store.list_dirs(base) if store.exists(base) else []
    except OSError:
        return
    for run_id in run_ids:
        path = tb.run_dir(settings.root, run_id)
        tb.handoff_in(store, join(base, run_id), path)
        # Its workers ended and their driver did not collect it: nothing writes to it any more.
        tb.update_meta(path, tracking_uri=redact_url(uri), ended=True)


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
