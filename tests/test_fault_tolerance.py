"""Fault recovery of the pretrain stage on real Ray: a killed worker, a crashed run resumed, S3 storage."""

from __future__ import annotations

import os
import shutil

import pytest

from histodiff.storage import Store
from bench.toys import write_synthetic_latents as write_latents
from histodiff import checkpoint as ckpt
from histodiff import storage
from histodiff.config import load_config
from histodiff.runner import run_stage
from histodiff.stages import pretrain
from histodiff.train import common
from test_denoiser import ray_cfg

pytestmark = pytest.mark.slow


def fault_at(rank: int, step: int, marker: str, mode: str = "kill"):
    """Return a training-loop callback that kills (SIGKILL) or raises once, at one rank and step."""
    def inject(r: int, s: int) -> None:  # a closure: Ray ships it by value into the Train workers
        import signal

        if r != rank or s != step:
            return
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # fire once: the replacement worker passes this step again
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault at rank {r} step {s}")

    return inject


def _steps(cfg):
    spec = pretrain.spec(cfg, Store())
    return common.completed_steps(cfg.paths.checkpoints, pretrain.run_name(spec, cfg.name), Store())


def _run_uri(cfg):
    return storage.join(cfg.paths.checkpoints, pretrain.run_name(pretrain.spec(cfg, Store()), cfg.name))


def test_killed_worker_is_replaced_and_loses_at_most_one_interval(ray_local, tmp_path, monkeypatch):
    cfg = ray_cfg(tmp_path, "name=kill", "denoiser.steps=10", "denoiser.checkpoint_every=4", "ray.max_failures=2")
    write_latents(cfg.paths.latents, 256)
    marker = tmp_path / "fired"
    result = run_stage(pretrain, cfg, callbacks=(fault_at(1, 6, str(marker)),))
    assert marker.exists()  # the SIGKILL really happened
    assert result.step == 10
    (resumed_step, resumed_loss), = result.resumed_from
    assert resumed_step == 4 and 6 - resumed_step <= cfg.denoiser.checkpoint_every
    probe = dict((int(s), v) for s, v in result.probe_losses)
    assert sorted(probe) == [0, 4, 8, 10]
    assert resumed_loss == pytest.approx(probe[4], rel=1e-4)  # restored exactly the step-4 weights


def test_crashed_run_resumes_on_rerun_and_skips_a_partial_checkpoint(ray_local, tmp_path, monkeypatch):
    cfg = ray_cfg(tmp_path, "name=crash", "denoiser.steps=12", "denoiser.checkpoint_every=4", "ray.max_failures=0")
    write_latents(cfg.paths.latents, 256)
    with pytest.raises(Exception, match="injected fault"):
        run_stage(pretrain, cfg, callbacks=(fault_at(0, 7, str(tmp_path / "fired"), mode="raise"),))
    assert _steps(cfg) == [4]
    assert not Store().exists(storage.join(cfg.paths.denoiser, ckpt.MODEL_META))
    # A worker that died mid-upload of step 8 left a directory without COMPLETE (and bad weights).
    run = _run_uri(cfg)
    partial = os.path.join(run, common.checkpoint_dir_name(8))
    shutil.copytree(os.path.join(run, common.checkpoint_dir_name(4)), partial)
    os.remove(os.path.join(partial, ckpt.COMPLETE))
    open(os.path.join(partial, "model.safetensors"), "wb").write(b"truncated")
    result = run_stage(pretrain, cfg)
    assert result.step == 12
    (resumed_step, resumed_loss), = result.resumed_from
    probe = dict((int(s), v) for s, v in result.probe_losses)
    assert resumed_step == 4 and sorted(probe) == [0, 4, 8, 12]
    # The loss does not jump back: training continued from the step-4 weights, not from scratch.
    assert resumed_loss == pytest.approx(probe[4], rel=1e-4) and resumed_loss < probe[0]


def test_checkpoints_and_export_on_s3(ray_local, s3_bucket, tmp_path):
    cfg = ray_cfg(tmp_path, "name=s3", "denoiser.steps=4", "denoiser.checkpoint_every=2",
                  f"paths.checkpoints={s3_bucket}/ck", f"paths.denoiser={s3_bucket}/models/denoiser")
    write_latents(cfg.paths.latents, 64)
    result = run_stage(pretrain, cfg)
    assert result.step == 4 and result.run_uri == _run_uri(cfg) and result.run_uri.startswith(f"{s3_bucket}/ck/s3-")
    assert _steps(cfg) == [2, 4]
    marker = storage.join(result.run_uri, common.checkpoint_dir_name(4), ckpt.COMPLETE)
    assert Store().read_bytes(marker) == b"ok\n"
    meta = ckpt.model_meta(cfg.paths.denoiser, Store())
    assert meta["step"] == 4 and meta["sha256"] == result.sha256


def test_killed_driver_resumes_on_rerun(tmp_path):
    """SIGKILL the whole `histodiff run pretrain` process group after a checkpoint; the rerun resumes from it."""
    import subprocess

    from test_denoiser import SMALL

    overrides = [f"paths.root={tmp_path}", "name=driver", "tracking.enabled=false", "denoiser.report_every=100",
                 *SMALL, "denoiser.steps=40", "denoiser.checkpoint_every=8", "ray.num_cpus=2"]
    cfg = load_config("tiny", overrides)
    write_latents(cfg.paths.latents, 256)
    ray_tmp = f"/tmp/hdkill-{os.getpid()}"
    cmd, env = kill_after_a_checkpoint(overrides, cfg, ray_tmp, tmp_path / "first.log")
    killed_at = _steps(cfg)
    assert killed_at and killed_at[-1] < 40
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    _kill_by_env("RAY_TMPDIR", ray_tmp)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert ckpt.model_meta(cfg.paths.denoiser, Store())["step"] == 40
    steps = _steps(cfg)
    _, st = common.restore(os.path.join(_run_uri(cfg), common.checkpoint_dir_name(steps[-1])))
    (resumed_step, resumed_loss), = st["resumed_from"]
    probe = dict((int(s), v) for s, v in st["probe_losses"])
    # The global step continued from a checkpoint the killed run wrote, and the loss did not jump back.
    assert resumed_step in killed_at and resumed_step < 40
    assert resumed_loss == pytest.approx(probe[resumed_step], rel=1e-4) and resumed_loss < probe[0]


def kill_after_a_checkpoint(overrides: list[str], cfg, ray_tmp: str, log_path) -> tuple[list[str], dict]:
    """Run `histodiff run pretrain` with ``overrides``; SIGKILL its whole process group once a checkpoint is complete.

    The command gets its own Ray temp root (``RAY_TMPDIR=ray_tmp``), so the embedded Ray it starts
    can be found, and cleaned up, by that path. Returns (command, environment) for the rerun.
    """
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "histodiff.cli", "run", "pretrain", "--config", "tiny", *overrides]
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not _steps(cfg):
            assert proc.poll() is None, open(log_path).read()[-3000:]
            assert time.time() < deadline, "no checkpoint within 600 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its session, mid-run
        proc.wait()
    finally:
        _kill_by_env("RAY_TMPDIR", ray_tmp)  # Ray's daemons and workers, which leave the session
    return cmd, env


def _kill_by_env(name: str, value: str) -> None:
    """SIGKILL every process whose environment has name=value (Ray renames its workers' command lines)."""
    import signal

    needle = f"{name}={value}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
