"""Nothing lost when the MLflow server goes away: a real server killed and restarted around real training.

Each test starts its own ``mlflow server`` (``own_mlflow``) so it can SIGKILL it and start it
again on the same port and backend store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from bench import toys as toy
from histodiff import tracking
from histodiff import tracking_buffer as tb
from histodiff.config import load_config
from histodiff.runner import run_stage
from histodiff.stages import pretrain
from test_denoiser import SMALL

OUTAGE = "is unreachable ("
BACK = "is back after"
END = "is unreachable at the end of run"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _cfg(root, server, *extra: str):
    return load_config("tiny", [
        f"paths.root={root}", f"paths.latents={root}/latents/labeled/train", f"paths.denoiser={root}/pretrained",
        f"tracking.tracking_uri={server.url}", f"tracking.experiment=outage-{uuid.uuid4().hex[:6]}",
        f"tracking.registry_prefix=o{uuid.uuid4().hex[:6]}", f"tracking.buffer_dir={root}/buffer",
        "tracking.retry_s=1", "tracking.request_timeout_s=5", "name=outage", "ray.num_workers=1",
        "ray.cpus_per_worker=1", "ray.threads_per_worker=1", *SMALL, "denoiser.batch_size=4",
        "denoiser.report_every=1", "denoiser.sample_every=5", *extra])


def at_step(step: int, request: str, answer: str):
    """Return a training-loop callback that, at ``step``, asks the test (a file) and waits for its answer."""
    def wait(rank: int, s: int) -> None:  # shipped by value into the Ray Train worker
        if rank != 0 or s != step:
            return
        open(request, "w").close()
        deadline = time.time() + 400
        while not os.path.exists(answer) and time.time() < deadline:
            time.sleep(0.1)

    return wait


def _serve(requests: dict[str, tuple], stop: threading.Event) -> threading.Thread:
    """Answer each request file by running its action, then touching its answer file."""
    def loop() -> None:
        pending = dict(requests)
        while pending and not stop.is_set():
            for req, (action, answer) in list(pending.items()):
                if os.path.exists(req):
                    action()
                    open(answer, "w").close()
                    del pending[req]
            time.sleep(0.1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def in_order(history) -> list[int]:
    """Return the steps of a metric history after checking their timestamps never go back as the step rises."""
    by_step = sorted(history, key=lambda m: m.step)
    assert all(a.timestamp <= b.timestamp for a, b in zip(by_step, by_step[1:])), "logged out of order"
    return [m.step for m in by_step]


def _console(capfd, until: str, timeout: float = 30) -> str:
    """Return what reached the console, waiting a little for Ray to forward the workers' last lines."""
    text, deadline = "", time.time() + timeout
    while True:
        out, err = capfd.readouterr()
        text += out + err
        if until in text or time.time() > deadline:
            return text
        time.sleep(0.5)


def test_a_tracker_buffers_in_order_through_an_outage_and_says_so_twice(own_mlflow, tmp_path, histodiff_log):
    cfg = _cfg(tmp_path, own_mlflow)
    with tracking.stage_run(cfg, "probe") as tracker:
        tracker.log_metrics({"loss": 0.0}, step=0)
        own_mlflow.stop()
        for step in range(1, 6):
            tracker.log_metrics({"loss": float(step)}, step=step)
        tracker.log_params({"later": "yes"})
        tracker.set_tags({"phase": "outage"})
        tracker.log_text("written while down", "notes/outage.txt")
        tracker.log_image(__import__("numpy").zeros((4, 4, 3), "uint8"), "images/outage.png")
        assert tb.pending_calls(tracker.folder) == 9 and tracker.folder.startswith(str(tmp_path / "buffer"))
        own_mlflow.start()
        time.sleep(1.1)  # tracking.retry_s: the next call looks for the server again
        tracker.log_metrics({"loss": 6.0}, step=6)
    history = _client(own_mlflow.url).get_metric_history(tracker.run_id, "loss")
    assert in_order(history) == list(range(7)) and all(m.value == m.step for m in history)
    run = _client(own_mlflow.url).get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["later"] == "yes" and run.data.tags["phase"] == "outage"
    files = {a.path for d in ("notes", "images") for a in _client(own_mlflow.url).list_artifacts(tracker.run_id, d)}
    assert files == {"notes/outage.txt", "images/outage.png"}
    assert not os.path.exists(tracker.folder)  # sent, so nothing waits any more
    assert len([m for m in histodiff_log if OUTAGE in m]) == 1 and len([m for m in histodiff_log if BACK in m]) == 1


@pytest.mark.slow
def test_server_killed_mid_training_loses_no_step_and_no_image(own_mlflow, ray_local, tmp_path, capfd):
    toy.write_toy_inputs(str(tmp_path))
    cfg = _cfg(tmp_path, own_mlflow, "denoiser.steps=30", "denoiser.checkpoint_every=30")
    files = {name: str(tmp_path / name) for name in ("stop", "stopped", "start", "started")}
    stop = threading.Event()
    _serve({files["stop"]: (own_mlflow.stop, files["stopped"]),
            files["start"]: (own_mlflow.start, files["started"])}, stop)
    try:
        # Down from step 10 (before its report) until step 20 has trained: steps 10-20 are logged while down.
        result = run_stage(pretrain, cfg, callbacks=(at_step(10, files["stop"], files["stopped"]),
                                                     at_step(20, files["start"], files["started"])))
    finally:
        stop.set()
    console = _console(capfd, BACK)
    client = _client(own_mlflow.url)
    history = sorted(client.get_metric_history(result.run_id, "loss"), key=lambda m: m.step)
    assert in_order(history) == list(range(1, 31))  # every step, in order, none twice
    assert client.get_run(result.run_id).data.metrics["loss"] == history[-1].value == pytest.approx(result.final_loss)
    samples = sorted(a.path for a in client.list_artifacts(result.run_id, "samples"))
    assert samples == [f"samples/step_{s:07d}.png" for s in (5, 10, 15, 20, 25, 30)]
    assert client.get_run(result.run_id).info.status == "FINISHED" and result.registered
    assert console.count(OUTAGE) == 1 and console.count(BACK) == 1, console[-4000:]
    assert "Retrying (" not in console and "ERROR mlflow" not in console
    print(f"outage test: {len(history)} loss steps, {len(samples)} sample images; console lines:",
          *[line for line in console.splitlines() if OUTAGE in line or BACK in line], sep="\n  ")


@pytest.mark.slow
def test_server_down_past_the_end_is_finished_by_tracking_sync(own_mlflow, ray_local, tmp_path, capfd,
                                                                histodiff_log):
    toy.write_toy_inputs(str(tmp_path))
    cfg = _cfg(tmp_path, own_mlflow, "denoiser.steps=12", "denoiser.checkpoint_every=12")
    stop = threading.Event()
    _serve({str(tmp_path / "stop"): (own_mlflow.stop, str(tmp_path / "stopped"))}, stop)
    with tracking.parent_run(cfg, "pipeline") as parent:
        result = run_stage(pretrain, cfg, parent_run_id=parent.run_id,
                           callbacks=(at_step(6, str(tmp_path / "stop"), str(tmp_path / "stopped")),))
    stop.set()
    console = _console(capfd, OUTAGE)  # the worker's line, relayed by Ray
    said = "\n".join(histodiff_log)  # the driver's own lines (whether or not a handler also prints them)
    assert said.count(END) == 2, said[-4000:]  # the stage's run, then the parent's: one line each
    assert console.count(OUTAGE) == 1 and said.count(OUTAGE) == 0  # said by the worker; its driver stays quiet
    assert "Retrying (" not in console and "ERROR mlflow" not in console
    print("past-the-end test: console lines:", *[line for line in console.splitlines() if "MLflow" in line],
          sep="\n  ")
    assert result.registered == [] and result.run_id
    waiting = tracking.waiting_runs(cfg)
    assert sorted(waiting) == sorted([result.run_id, parent.run_id])

    own_mlflow.start()
    t = cfg.tracking
    overrides = [f"paths.root={tmp_path}", f"tracking.tracking_uri={own_mlflow.url}",
                 f"tracking.experiment={t.experiment}", f"tracking.buffer_dir={t.buffer_dir}",
                 f"tracking.registry_prefix={t.registry_prefix}"]
    sync = subprocess.run([sys.executable, "-m", "histodiff.cli", "tracking", "sync", "--config", "tiny", *overrides],
                          capture_output=True, text=True, timeout=600)
    assert sync.returncode == 0, sync.stdout[-3000:] + sync.stderr[-3000:]
    assert "nothing waits" in sync.stdout
    client = _client(own_mlflow.url)
    stage_run, parent_run = client.get_run(result.run_id), client.get_run(parent.run_id)
    assert stage_run.info.status == parent_run.info.status == "FINISHED"
    assert stage_run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert in_order(client.get_metric_history(result.run_id, "loss")) == list(range(1, 13))
    name = f"{cfg.tracking.registry_prefix}-denoiser"
    version = client.get_model_version_by_alias(name, "champion")
    assert version.run_id == result.run_id and version.tags["histodiff.sha256"] == result.sha256
    assert tracking.waiting_runs(cfg) == []
