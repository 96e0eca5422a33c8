"""Benchmark: what MLflow logging costs a training loop (async vs sync) and what a dead server costs.

Both arms run in the same process on the same SQLite tracking store, side by side.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from datetime import datetime, timezone

from histodiff import tracking
from histodiff.config import load_config

STEPS = 100


def _loop(cfg) -> float:
    """Return the seconds the loop spends in log_metrics over STEPS steps (flush excluded)."""
    with tracking.stage_run(cfg, "bench") as tracker:
        start = time.perf_counter()
        for step in range(STEPS):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
        spent = time.perf_counter() - start
    return spent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(workdir: str) -> dict[str, dict]:
    """Return per-step logging cost (async, sync), their ratio, and the blocked time with a dead server."""
    uri = f"sqlite:///{os.path.abspath(workdir)}/bench-mlflow.db"
    base = [f"tracking.tracking_uri={uri}", "tracking.experiment=bench-tracking"]
    _loop(load_config("tiny", base))  # warm-up: schema creation, imports
    sync_s = _loop(load_config("tiny", [*base, "tracking.async_metrics=false"]))
    async_s = _loop(load_config("tiny", [*base, "tracking.async_metrics=true"]))
    dead = load_config("tiny", [f"tracking.tracking_uri=http://127.0.0.1:{_free_port()}",
                                "tracking.request_max_retries=0", "tracking.request_timeout_s=2"])
    start = time.perf_counter()
    _loop(dead)
    dead_s = time.perf_counter() - start
    when = f"{datetime.now(timezone.utc):%Y-%m-%d} {platform.machine()} {os.cpu_count()} CPUs, shared"
    return {
        "tracking_log_ms_per_step_async": {"value": round(1000 * async_s / STEPS, 3), "unit": "ms/step",
                                           "goal": "well under a training step (< 1 ms)", "measured": when},
        "tracking_log_ms_per_step_sync": {"value": round(1000 * sync_s / STEPS, 3), "unit": "ms/step",
                                          "goal": "reference: synchronous logging", "measured": when},
        "tracking_sync_vs_async_ratio": {"value": round(sync_s / max(async_s, 1e-9), 1), "unit": "x",
                                         "goal": "> 1 (async keeps the loop free)", "measured": when},
        "tracking_dead_server_total_s": {"value": round(dead_s, 2), "unit": "s",
                                         "goal": f"bounded: one failed connect, then {STEPS} steps at no cost",
                                         "measured": when},
    }
