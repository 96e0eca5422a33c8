"""The handle on one MLflow run that loses nothing when the tracking server goes away.

Every call goes straight to MLflow (synchronously: an asynchronous call that fails is lost
without the caller knowing). When the server does not answer, the tracker says so in one
line, keeps every later call in order on local disk (:mod:`histodiff.tracking_buffer`), looks
for the server every ``tracking.retry_s`` seconds while calls keep coming, sends the backlog
when it is back and says so in one line. A call the server answers with an error (a changed
param, say) is reported once and skipped: it would fail again. Nothing here ever raises.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from typing import Any

from histodiff import tracking_buffer as tb
from histodiff.tracking_server import quiet_http_noise, reachable, reason, scrub

log = logging.getLogger(__name__)


class Tracker:
    """A handle on one MLflow run; every method is safe to call when tracking is off or the server is down."""

    def __init__(self, run_id: str | None, tracking_uri: str | None, buffer: tb.BufferSettings | None = None,
                 handoff: tuple[Any, str] | None = None, name: str = "") -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.settings = buffer or tb.BufferSettings(tb.default_root())
        self.handoff = handoff  # (store, uri): where a Ray Train worker leaves calls it could not send
        self.name = name or (run_id or "")
        self.store: Any = None  # the runner's Store: a registration made during an outage needs it later
        self._client = None
        self._segment: tb.Segment | None = None
        self._down_since: float | None = None
        self._next_probe = 0.0
        self._warned_rejected = False
        self._models: list[str] = []  # registrations waiting for the server
        self._lock = threading.RLock()  # rank 0's sample logging and its loop share one tracker
        if run_id is not None:
            from mlflow.tracking import MlflowClient

            quiet_http_noise()
            self._client = MlflowClient(tracking_uri=tracking_uri)
            self._segment = tb.Segment(self.settings, run_id, tracking_uri)

    @property
    def active(self) -> bool:
        """Return True when this tracker has a run (calls reach MLflow now or later)."""
        return self._client is not None

    @property
    def client(self) -> Any:
        """Return the underlying MlflowClient (None when tracking is off)."""
        return self._client

    @property
    def folder(self) -> str:
        """Return this run's buffer folder (it exists only while calls wait there)."""
        return self._segment.dir if self._segment else ""

    def reachable(self) -> bool:
        """Return True when the tracking server answers now."""
        return reachable(self.tracking_uri, self.settings.probe_timeout_s)

    # ------------------------------------------------------------------ the one path of every call

    def _own(self) -> list[str]:
        return [self._segment.path] if self._segment is not None and self._segment.path else []

    def _submit(self, op: dict[str, Any]) -> None:
        if self._client is None:
            return
        with self._lock:
            if self._down_since is None and not self._own():
                try:
                    self._send(op, "")
                    return
                except Exception as exc:
                    if self._rejected(op, exc):
                        return
                    self._went_down(exc)
            self._keep(op)
            self._maybe_recover()

    def _send(self, op: dict[str, Any], folder: str) -> None:
        """Make one call (``folder``: where a buffered artifact's file lies); raise on failure."""
        kind = op["op"]
        if kind == "batch":
            from mlflow.entities import Metric, Param, RunTag

            self._client.log_batch(
                self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in op.get("metrics", [])],
                params=[Param(k, v) for k, v in op.get("params", [])],
                tags=[RunTag(k, v) for k, v in op.get("tags", [])], synchronous=True)
        elif kind == "artifact":
            path = os.path.join(folder, op["file"])
            if os.path.isdir(path):
                self._client.log_artifacts(self.run_id, path, op.get("path"))
            else:
                self._client.log_artifact(self.run_id, path, op.get("path"))
        elif kind == "terminate":
            self._client.set_terminated(self.run_id, op["status"], end_time=op.get("end_time"))
        elif kind == "register":
            from histodiff import registry

            registry.register_now(op, self)
        else:
            raise ValueError(f"unknown buffered call {kind!r}")

    def _rejected(self, op: dict[str, Any], exc: Exception) -> bool:
        """Return True (and report once) when the server answered and refused the call."""
        if not self.reachable():
            return False
        if not self._warned_rejected:
            log.warning("MLflow refused %s for run %s (%s); skipped, training goes on", op["op"], self.name,
                        scrub(exc)[:300])
            self._warned_rejected = True
        return True

    def _went_down(self, exc: BaseException | None) -> None:
        now = time.monotonic()
        self._down_since, self._next_probe = now, now + self.settings.retry_s
        if exc is not None and not self._said_by_another():
            log.warning("MLflow at %s is unreachable (%s): training goes on; tracking calls of run %s wait in %s "
                        "and are sent when it is back", scrub(self.tracking_uri), reason(exc), self.name, self.folder)

    def _said_by_another(self) -> bool:
        """Return True when another process of this run (its Ray Train worker) already reported the outage."""
        try:
            return any(seg not in self._own() for seg in tb.segments(self.folder)) or (
                self.handoff is not None and self.handoff[0].exists(self.handoff[1]))
        except OSError:
            return False

    def _batches(self, kind: str, items: list[list[Any]]) -> None:
        size = tb.BATCH_LIMITS[kind]
        for i in range(0, len(items), size):
            self._submit({"op": "batch", kind: items[i : i + size]})

    def _keep(self, op: dict[str, Any]) -> None:
        if not self._segment.append(op) and self._segment.dropped == 1:
            log.warning("the tracking buffer of run %s is full (tracking.buffer_max_mb=%s): later calls are dropped "
                        "until MLflow is back", self.name, self.settings.max_mb)

    def _replay(self, only: list[str] | None) -> int:
        with tb.locked(self.folder) as mine:
            if not mine:
                raise tb.Unreachable("another process is sending this run's calls")
            sent = tb.replay(self.folder, self._send, self._rejected, only)
        self._segment.reset()
        return sent

    def _maybe_recover(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._down_since is None or (now < self._next_probe and not force):
            return
        self._next_probe = now + self.settings.retry_s
        if not self.reachable():
            return
        try:
            sent = self._replay(self._own())
        except tb.Unreachable:
            return
        log.warning("MLflow at %s is back after %.0f s: sent the %d tracking calls of run %s made meanwhile",
                    scrub(self.tracking_uri), now - self._down_since, sent, self.name)
        self._down_since = None
        if self._segment.dropped:
            self.set_tags({"histodiff.tracking.dropped_calls": self._segment.dropped})

    # ------------------------------------------------------------------ what callers use

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params (secrets scrubbed, values truncated to MLflow's limit)."""
        self._batches("params", [[k, scrub(v)[:6000]] for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log numeric metrics at a step."""
        ts = int(time.time() * 1000)
        self._batches("metrics", [[k, float(v), ts, int(step or 0)] for k, v in metrics.items() if v is not None])

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags (secrets scrubbed)."""
        self._batches("tags", [[k, scrub(v)[:5000]] for k, v in tags.items()])

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Upload a local file or directory as an artifact (copied into the buffer during an outage)."""
        self._submit({"op": "artifact", "file": os.path.abspath(local_path), "path": artifact_path})

    def log_png(self, data: bytes, name: str) -> None:
        """Log PNG bytes (e.g. :func:`histodiff.plots.figure_png`) as an artifact at ``name``."""
        self._log_bytes(data, name)

    def log_figure(self, figure: Any, name: str) -> None:
        """Log a matplotlib figure as a PNG artifact at ``name`` (and close it)."""
        from histodiff.plots import figure_png

        if self.active:
            self._log_bytes(figure_png(figure), name)

    def log_image(self, image: Any, name: str) -> None:
        """Log an HWC uint8 array or PIL image as an image artifact at ``name``."""
        from histodiff.plots import image_bytes

        if self.active:
            self._log_bytes(image_bytes(image, name), name)

    def log_dict(self, data: Any, name: str) -> None:
        """Log JSON/YAML-able data as an artifact (YAML for a .yaml/.yml name; secrets scrubbed)."""
        clean = json.loads(scrub(json.dumps(data, default=str)))
        if name.endswith((".yaml", ".yml")):
            import yaml

            text = yaml.safe_dump(clean, default_flow_style=False, sort_keys=False)
        else:
            text = json.dumps(clean, indent=2)
        self._log_bytes(text.encode(), name)

    def log_text(self, text: str, name: str) -> None:
        """Log text as an artifact (secrets scrubbed)."""
        self._log_bytes(scrub(text).encode(), name)

    def log_config(self, cfg: Any) -> None:
        """Log the public config (no secrets) as ``config.yaml``."""
        self.log_dict(cfg.public_dict(), "config.yaml")

    def _log_bytes(self, data: bytes, name: str) -> None:
        if not self.active:
            return
        with tempfile.TemporaryDirectory(prefix="hd-artifact-") as tmp:
            path = os.path.join(tmp, os.path.basename(name))
            with open(path, "wb") as f:
                f.write(data)
            self.log_artifact(path, os.path.dirname(name) or None)

    def defer(self, op: dict[str, Any]) -> None:
        """Keep a call for later without trying it now (a model to register while the server is down)."""
        if self._client is None:
            return
        with self._lock:
            if self._down_since is None:
                self._went_down(None)
            self._keep(op)
            if op.get("op") == "register":
                self._models.append(op["kind"])

    def ready(self) -> bool:
        """Return True when calls reach MLflow directly now (after sending any backlog first)."""
        if self._client is None:
            return False
        with self._lock:
            self._maybe_recover(force=True)
            return self._down_since is None and self.reachable()

    def release(self) -> None:
        """Send what waits; if the server is still down, move it to the handoff URI for the driver (workers)."""
        if self._client is None:
            return
        with self._lock:
            self._maybe_recover(force=True)
            if self._own() and self.handoff is not None:
                self._move(out=True)

    def _move(self, out: bool) -> None:
        """Move this run's waiting calls to (a worker) or from (the driver) the handoff URI."""
        store, uri = self.handoff
        try:
            if out:
                tb.handoff_out(self.folder, store, uri)
                self._segment.reset()
            else:
                tb.handoff_in(store, uri, self.folder)
        except Exception as exc:  # what stays on a node's disk is sent by `histodiff tracking sync` there
            log.warning("could not move the waiting tracking calls of run %s %s storage: %s", self.name,
                        "to" if out else "from", scrub(exc)[:200])

    def close(self, status: str) -> None:
        """End the run with ``status`` after sending every call that waits (its workers' too).

        When the server is still down, the status joins the waiting calls and one line says where
        they are and that ``histodiff tracking sync`` (or the next stage) sends them.
        """
        if self._client is None:
            return
        with self._lock:
            if self.handoff is not None:
                self._move(out=False)
            if (tb.pending_calls(self.folder) or self._down_since is not None) and self.reachable():
                was_down = self._down_since
                try:
                    sent = self._replay(None)
                    self._down_since = None
                    if was_down is not None or sent:
                        log.warning("MLflow at %s is back: sent the %d tracking calls of run %s that waited",
                                    scrub(self.tracking_uri), sent, self.name)
                except tb.Unreachable:
                    pass
            if not tb.pending_calls(self.folder) and self._down_since is None:
                try:
                    self._client.set_terminated(self.run_id, status)
                    tb.forget_if_empty(self.folder)
                    return
                except Exception as exc:
                    if self._rejected({"op": "terminate"}, exc):
                        return
            self._keep({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})
            tb.update_meta(self.folder, ended=True, status=status)
            models = f", the {'/'.join(self._models)} model to register" if self._models else ""
            log.warning("MLflow at %s is unreachable at the end of run %s: %d calls%s and status %s wait in %s; "
                        "`histodiff tracking sync` (or the next stage) sends them", scrub(self.tracking_uri), self.name,
                        tb.pending_calls(self.folder), models, status, self.folder)


NULL_TRACKER = Tracker(None, None)
