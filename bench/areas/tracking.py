"""Benchmark: what MLflow logging costs a training loop, with the server up, down from the start, and lost mid-run.

Every arm runs in this process: a SQLite store for the live server, a closed port for a dead one.
"""

from __future__ import annotations

import os
import platform
import socket
import tempfile
import time
from datetime import datetime, timezone

from histodiff import tracking
from histodiff.config import load_config
from histodiff.tracker import Tracker
from histodiff.tracking_buffer import BufferSettings

STEPS = 100


def _loop(tracker: Tracker) -> float:
    """Return the seconds the loop spends in log_metrics over STEPS steps."""
    start = time.perf_counter()
    for step in range(STEPS):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
    return time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(workdir: str) -> dict[str, dict]:
    """Return per-step logging cost (server up; server lost: buffered to disk) and the time a dead server blocks."""
    uri = f"sqlite:///{os.path.abspath(workdir)}/bench-mlflow.db"
    cfg = load_config("tiny", [f"tracking.tracking_uri={uri}", "tracking.experiment=bench-tracking"])
    with tracking.stage_run(cfg, "bench") as tracker:  # warm-up: schema creation, imports
        _loop(tracker)
    with tracking.stage_run(cfg, "bench") as tracker:
        live_s = _loop(tracker)
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # the first failed call costs one connect, not retries
    try:
        with tempfile.TemporaryDirectory() as buffer:
            lost = Tracker("bench-run", f"http://127.0.0.1:{_free_port()}", BufferSettings(buffer, retry_s=3600))
            lost.log_metrics({"loss": 1.0}, step=0)  # the failed call that starts the outage
            buffered_s = _loop(lost)
    finally:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        if retries is not None:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = retries
    dead = load_config("tiny", [f"tracking.tracking_uri=http://127.0.0.1:{_free_port()}",
                                "tracking.request_max_retries=0", "tracking.request_timeout_s=2"])
    start = time.perf_counter()
    with tracking.stage_run(dead, "bench") as tracker:
        _loop(tracker)
    dead_s = time.perf_counter() - start
    when = f"{datetime.now(timezone.utc):%Y-%m-%d} {platform.machine()} {os.cpu_count()} CPUs, shared"
    return {
        "tracking_log_ms_per_step": {"value": round(1000 * live_s / STEPS, 3), "unit": "ms/step",
                                     "goal": "well under a training step (synchronous: nothing is lost)",
                                     "measured": when},
        "tracking_buffered_ms_per_step": {"value": round(1000 * buffered_s / STEPS, 3), "unit": "ms/step",
                                          "goal": "< 1 ms: during an outage calls go to local disk",
                                          "measured": when},
        "tracking_dead_server_total_s": {"value": round(dead_s, 2), "unit": "s",
                                         "goal": f"bounded: one failed connect, then {STEPS} steps at no cost",
                                         "measured": when},
    }
