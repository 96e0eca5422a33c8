"""histodiff.train.common: trainer construction, checkpoint upload/retry, resume from complete checkpoints."""

from __future__ import annotations

import json
import os

import fsspec.implementations.local as fsspec_local
import pyarrow.fs as pafs
import pytest
import torch

from histodiff import checkpoint as ckpt
from histodiff.config import load_config
from histodiff.storage import Store
from histodiff.train import common


class _FlakyLocal(fsspec_local.LocalFileSystem):
    """A local filesystem that records writes and fails the first ``failures`` of them."""

    def __init__(self, failures: int = 0, error: str = "SlowDown: please reduce your request rate", **kw):
        super().__init__(skip_instance_cache=True, **kw)
        self.failures, self.error, self.writes = failures, error, []

    def _open(self, path, mode="rb", **kw):
        if "w" in mode:
            if self.failures > 0:
                self.failures -= 1
                raise OSError(self.error)
            self.writes.append(os.path.basename(path))
        return super()._open(path, mode, **kw)


def _flaky_fs(**kw) -> tuple[pafs.FileSystem, _FlakyLocal]:
    inner = _FlakyLocal(**kw)
    return pafs.PyFileSystem(pafs.FSSpecHandler(inner)), inner


def _local_checkpoint(path, step: int) -> str:
    ckpt.save_checkpoint(str(path), {"model": {"w": torch.full((4,), float(step))}}, {"step": step})
    return str(path)


def test_with_retries_backs_off_then_succeeds():
    delays, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during PutObject")
        return "ok"

    assert common.with_retries(flaky, "upload", attempts=5, backoff_s=0.5, sleep=delays.append) == "ok"
    assert delays == [0.5, 1.0]


def test_with_retries_fails_clearly_after_bounded_attempts(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-123")
    delays = []

    def broken():
        raise OSError("connection reset (key very-secret-value-123)")

    with pytest.raises(common.CheckpointUploadError) as err:
        common.with_retries(broken, "checkpoint upload to 'b/run'", attempts=3, backoff_s=1.0, sleep=delays.append)
    assert delays == [1.0, 2.0]
    text = str(err.value)
    assert "3 attempt(s) in a row" in text and "'b/run'" in text and "very-secret-value-123" not in text


def test_with_retries_does_not_retry_permanent_errors():
    delays = []
    with pytest.raises(common.CheckpointUploadError, match="1 attempt"):
        common.with_retries(lambda: (_ for _ in ()).throw(OSError("AccessDenied")), "x", 5, 1.0, delays.append)
    assert delays == []


def test_copy_checkpoint_writes_marker_last_and_replaces_partial(tmp_path):
    src = _local_checkpoint(tmp_path / "src", 3)
    dest = tmp_path / "run" / common.checkpoint_dir_name(3)
    dest.mkdir(parents=True)
    (dest / "stale.safetensors").write_bytes(b"half")
    fs, inner = _flaky_fs()
    common.copy_checkpoint_dir(src, fs, str(dest))
    assert inner.writes[-1] == ckpt.COMPLETE and len(inner.writes) == 3
    assert sorted(os.listdir(dest)) == sorted(os.listdir(src))
    assert ckpt.load_checkpoint(str(dest))[1] == {"step": 3}


def test_transient_upload_failures_are_retried_to_a_complete_checkpoint(tmp_path):
    src = _local_checkpoint(tmp_path / "src", 5)
    dest = str(tmp_path / "run" / common.checkpoint_dir_name(5))
    fs, inner = _flaky_fs(failures=2)
    delays = []
    common.with_retries(lambda: common.copy_checkpoint_dir(src, fs, dest), "upload", 4, 0.25, delays.append)
    assert delays == [0.25, 0.5]
    assert ckpt.is_complete(dest) and inner.writes[-1] == ckpt.COMPLETE


def test_list_complete_checkpoints_ignores_partial_and_foreign_dirs(tmp_path):
    run = tmp_path / "run"
    _local_checkpoint(run / common.checkpoint_dir_name(2), 2)
    _local_checkpoint(run / common.checkpoint_dir_name(10), 10)
    partial = _local_checkpoint(run / common.checkpoint_dir_name(12), 12)
    os.remove(os.path.join(partial, ckpt.COMPLETE))
    _local_checkpoint(run / "checkpoint_2026-01-01", 99)
    found = common.list_complete_checkpoints(pafs.LocalFileSystem(), str(run))
    assert [s for s, _ in found] == [2, 10]
    assert common.list_complete_checkpoints(pafs.LocalFileSystem(), str(tmp_path / "missing")) == []


def test_storage_path_is_absolute_locally_and_bucket_relative_on_s3(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["paths.checkpoints=rel/ck", "name=x"])
    path, fs, uri = common.storage_path_and_fs(cfg.paths.checkpoints, Store())
    assert fs is None and path == str(tmp_path / "rel" / "ck") == uri
    store = Store(load_config("tiny", ["storage.endpoint_url=http://127.0.0.1:1"]).storage)
    path, fs, uri = common.storage_path_and_fs("s3://bucket/pre/fix", store)
    assert path == "bucket/pre/fix" and isinstance(fs, pafs.S3FileSystem)
    with pytest.raises(ValueError, match="names no bucket"):
        common.storage_path_and_fs("s3://", store)


def _ctx(cfg):
    from histodiff.runner import Context

    return Context(Store(cfg.storage), cfg.ray, name=cfg.name, checkpoints_uri=cfg.paths.checkpoints)


def test_build_trainer_maps_the_config(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}", "name=unit", "ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.threads_per_worker=1",
                               "ray.max_failures=3", "ray.checkpoints_to_keep=4"])
    trainer = common.build_trainer(_ctx(cfg), lambda c: None, {"a": 1}, "unit-stage")
    rc, sc = trainer.run_config, trainer.scaling_config
    assert rc.name == "unit-stage" and rc.storage_path == str(tmp_path / "checkpoints")
    assert rc.failure_config.max_failures == 3 and rc.checkpoint_config.num_to_keep == 4
    assert sc.num_workers == 2 and sc.resources_per_worker == {"CPU": 0.5} and not sc.use_gpu
    assert trainer.train_loop_config["a"] == 1 and trainer.train_loop_config["upload_attempts"] == 5
    assert trainer.train_loop_config["threads_per_worker"] == 1 and trainer.train_loop_config["callbacks"] == ()


def test_helpers_are_no_ops_outside_ray(tmp_path):
    info = common.worker_info()
    assert (info.rank, info.world_size, info.in_ray) == (0, 1, False)
    common.report({"loss": 1.0}, 1, {"model": {"w": torch.ones(1)}}, {})  # logs only
    assert common.latest_complete_checkpoint() is None
    assert common.restore(None) is None
    assert common.restore(_local_checkpoint(tmp_path / "c", 4))[1]["step"] == 4


@pytest.mark.slow
def test_rank0_checkpoints_resume_past_a_partial_one(ray_local, tmp_path):
    def _loop(config):  # nested: cloudpickle ships it by value (workers cannot import test modules)
        info = common.worker_info()
        restored = common.restore(common.latest_complete_checkpoint())
        start = restored[1]["step"] if restored else 0
        for step in range(start + 1, start + config["n"] + 1):
            w = torch.full((3,), float(step * 10 + info.rank))
            common.report({"loss": 1.0 / step}, step, {"model": {"w": w}}, {"rank": info.rank, "start": start}, config)

    cfg = load_config("tiny", [f"paths.root={tmp_path}", "name=unit", "ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.threads_per_worker=1",
                               "tracking.enabled=false"])
    result = common.build_trainer(_ctx(cfg), _loop, {"n": 3}, "unit-common").fit()
    assert result.metrics["step"] == 3
    assert common.completed_steps(cfg.paths.checkpoints, "unit-common", Store()) == [2, 3]  # num_to_keep=2
    run = os.path.join(cfg.paths.checkpoints, "unit-common")
    tensors, state = ckpt.load_checkpoint(os.path.join(run, common.checkpoint_dir_name(3)))
    assert state["rank"] == 0 and torch.equal(tensors["model"]["w"], torch.full((3,), 30.0))
    # A newer, half-written checkpoint (no COMPLETE) must be ignored on resume.
    partial = _local_checkpoint(os.path.join(run, common.checkpoint_dir_name(9)), 9)
    os.remove(os.path.join(partial, ckpt.COMPLETE))
    result = common.build_trainer(_ctx(cfg), _loop, {"n": 2}, "unit-common").fit()
    assert result.metrics["step"] == 5
    final = json.load(open(os.path.join(run, common.checkpoint_dir_name(5), ckpt.STATE)))
    assert final["start"] == 3
