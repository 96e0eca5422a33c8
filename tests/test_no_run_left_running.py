"""No MLflow run is left RUNNING: a killed driver's run is continued by its rerun, or ended KILLED and linked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from bench.toys import write_synthetic_latents as write_latents
from histodiff import checkpoint as ckpt
from histodiff.config import load_config
from histodiff.runner import attempt_uri
from histodiff.storage import Store
from test_denoiser import SMALL
from test_fault_tolerance import _kill_by_env, kill_after_a_checkpoint

RAY_TRAIN_NOISE = "Failed to query Ray Train Controller actor state"


def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


@pytest.mark.slow
def test_killed_driver_run_is_continued_by_the_rerun(tmp_path):
    """SIGKILL `histodiff run pretrain` (its process group) after a checkpoint; the rerun ends its run FINISHED."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [f"paths.root={tmp_path}", "name=killed", f"tracking.tracking_uri={uri}", "tracking.experiment=killed",
                 f"tracking.buffer_dir={tmp_path}/buffer", "denoiser.report_every=4", *SMALL, "denoiser.steps=40",
                 "denoiser.checkpoint_every=8", "ray.num_cpus=2"]
    cfg = load_config("tiny", overrides)
    write_latents(cfg.paths.latents, 256)
    ray_tmp = f"/tmp/hdrun-{os.getpid()}"
    cmd, env = kill_after_a_checkpoint(overrides, cfg, ray_tmp, tmp_path / "first.log")
    (killed,) = _runs(uri, "killed")
    assert killed.info.status == "RUNNING"  # what a SIGKILL leaves: nothing in the process could close it
    records = os.path.dirname(attempt_uri(cfg, "any"))
    (name,) = os.listdir(records)  # the runner's record of the attempt in progress names its run
    assert json.loads(open(os.path.join(records, name)).read())["run_id"] == killed.info.run_id

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    _kill_by_env("RAY_TMPDIR", ray_tmp)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert ckpt.model_meta(cfg.paths.denoiser, Store())["step"] == 40
    (run,) = _runs(uri, "killed")  # the same run, continued: no second run, none RUNNING
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert second.stdout.count(f"run_id: {run.info.run_id}") == 1
    assert not os.listdir(records)  # the record goes with the finished attempt
    # The loss history continues where the killed driver's stopped (Ray Train resumed from a checkpoint).
    from mlflow.tracking import MlflowClient

    steps = sorted({m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run.info.run_id, "loss")})
    assert steps[-1] == 40 and set(range(8, 41, 8)) <= set(steps)
    # Ray Train's controller-state noise is filtered where it is printed, in the driver and its workers.
    console = (tmp_path / "first.log").read_text() + second.stdout + second.stderr
    assert console.count(RAY_TRAIN_NOISE) == 0 and "Exception in thread PlacementGroupCleanerMonitor" not in console


_KILLED_ATTEMPT = """
import os, signal, functools
from histodiff import tracking
from histodiff.config import load_config
from histodiff.runner import resumable_run
from histodiff.storage import Store
cfg = load_config("tiny", {overrides!r})
opener = functools.partial(tracking.stage_run, cfg, "encode")
with resumable_run(cfg, Store(), "encode-test", "spec-one", opener) as tracker:
    print(tracker.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: the run stays RUNNING
"""


def test_a_killed_attempt_with_another_spec_is_ended_killed_and_linked(tmp_path):
    import functools

    from histodiff import tracking
    from histodiff.runner import resumable_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [f"paths.root={tmp_path}", f"tracking.tracking_uri={uri}", "tracking.experiment=attempts",
                 f"tracking.buffer_dir={tmp_path}/buffer"]
    proc = subprocess.run([sys.executable, "-c", _KILLED_ATTEMPT.format(overrides=overrides)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    dead = proc.stdout.split()[0]
    assert {r.info.run_id: r.info.status for r in _runs(uri, "attempts")} == {dead: "RUNNING"}
    cfg = load_config("tiny", overrides)
    opener = functools.partial(tracking.stage_run, cfg, "encode")
    with resumable_run(cfg, Store(), "encode-test", "spec-two", opener) as tracker:  # another spec: a new run
        pass
    runs = {r.info.run_id: r for r in _runs(uri, "attempts")}
    assert runs[dead].info.status == "KILLED" and runs[tracker.run_id].info.status == "FINISHED"
    assert runs[dead].data.tags["histodiff.superseded_by"] == tracker.run_id
    assert runs[tracker.run_id].data.tags["histodiff.previous_run_id"] == dead
    assert not Store().exists(attempt_uri(cfg, "encode-test"))
    assert json.dumps([r.info.status for r in runs.values()]).count("RUNNING") == 0
