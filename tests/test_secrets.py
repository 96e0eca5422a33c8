"""Nothing leaked: no credential in Ray's session folder, the outputs, the MLflow store, the console or an error."""

from __future__ import annotations

import io
import logging
import os
import pickle
import subprocess
import sys
import uuid

import numpy as np
import pytest
from PIL import Image

from histodiff import runtime, submit, tracking
from histodiff.config import StorageConfig
from histodiff.storage import Store
from histodiff.train.common import storage_path_and_fs
from conftest import free_port
from test_fault_tolerance import _kill_by_env

SECRET = f"hd-Distinctive-S3cret-{uuid.uuid4().hex[:12]}"


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _files(root: str) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names
            if os.path.isfile(os.path.join(d, n)) and not os.path.islink(os.path.join(d, n))]


@pytest.mark.slow
def test_ingest_from_s3_leaks_the_secret_nowhere(s3_server, s3_bucket, tmp_path):
    store = Store()
    for i in range(12):
        store.write_bytes(f"{s3_bucket}/pool/tile-{i:02d}.png", _png(i))
    ray_tmp = f"/tmp/hdsec-{os.getpid()}"  # its own embedded Ray: the session folder to search is known
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ENDPOINT_URL_S3": s3_server}
    overrides = [f"paths.root={s3_bucket}/out", f"paths.unlabeled_sources=[{s3_bucket}/pool]",
                 "paths.labeled_source=null", "paths.labeled_test_source=null", "ray.num_cpus=2",
                 f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.buffer_dir={tmp_path}/buffer"]
    try:
        proc = subprocess.run([sys.executable, "-m", "histodiff.cli", "run", "ingest", "--config", "tiny", *overrides],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    finally:
        _kill_by_env("RAY_TMPDIR", ray_tmp)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert "written: " in console or "reports" in console
    searched = _files(ray_tmp) + _files(str(tmp_path))  # Ray's sessions; the MLflow store (db + mlruns), the buffer
    assert len(searched) > 50 and any(p.endswith("runtime_env_agent.log") for p in searched)
    assert any(p.endswith("mlflow.db") for p in searched) and any("/mlruns/" in p for p in searched)
    hits = [p for p in searched if SECRET.encode() in open(p, "rb").read()]
    outputs = store.list_files(f"{s3_bucket}/out")
    assert len(outputs) >= 4  # shards, manifest, skip and conversion reports, the stage marker
    hits += [u for u in outputs if SECRET.encode() in store.read_bytes(u)]
    assert hits == [] and SECRET not in console
    # the settings did travel: the workers found the endpoint through runtime_env, with no credential
    agent = next(p for p in searched if p.endswith("runtime_env_agent.log"))
    assert s3_server in open(agent).read()


def test_credentials_in_the_endpoint_url_are_redacted_in_the_error(tmp_path):
    endpoint = f"http://AKIDINURL:{SECRET}@127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run([sys.executable, "-m", "histodiff.cli", "run", "ingest", "--config", "tiny",
                           f"paths.root={tmp_path}/out", "paths.unlabeled_sources=[s3://bucket/pool]",
                           f"storage.endpoint_url={endpoint}", "storage.connect_timeout_s=1", "storage.max_attempts=1",
                           "tracking.enabled=false"], env=env, capture_output=True, text=True, timeout=300)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 2, console[-3000:]  # a user's input error (histodiff.errors)
    assert "histodiff: cannot" in proc.stderr and "http://***@127.0.0.1" in proc.stderr
    assert "check storage.endpoint_url" in proc.stderr and "Traceback" not in console
    assert SECRET not in console and "AKIDINURL" not in console


def test_nothing_that_travels_to_ray_carries_a_key(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET + "-env")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://AKIDENV:{SECRET}-envurl@127.0.0.1:9000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:{SECRET}-mlflow@mlflow:5000")
    cfg = StorageConfig(endpoint_url=f"http://AKIDCFG:{SECRET}-url@127.0.0.1:9000",
                        access_key_id="AKIDCONFIG", secret_access_key=SECRET + "-cfg")
    store = Store(cfg)
    assert store.s3() is not None  # the driver's own filesystem may hold keys; nothing below may
    _, fs, _ = storage_path_and_fs("s3://bucket/ck", store)
    tracker = tracking.Tracker(None, None)
    travelling = [store, store.for_ray("s3://bucket/x").fs, fs, runtime.worker_env(cfg, "sqlite:///m.db"),
                  submit.runtime_env(), tracking.loop_config(tracker, store)]
    blob = b"".join(pickle.dumps(item) for item in travelling)
    assert SECRET.encode() not in blob and b"AKIDCONFIG" not in blob and b"AKIDCFG" not in blob
    assert pickle.loads(pickle.dumps(store)).cfg.endpoint_url == "http://127.0.0.1:9000"  # the setting does travel
    assert SECRET not in repr(store)


def test_ray_train_noise_is_dropped_and_real_warnings_kept():
    runtime.quiet_ray_train()
    runtime.quiet_ray_train()  # idempotent
    name = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
    kept: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record.getMessage())

    logger = logging.getLogger(name)
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # the console's quiet mode (another test) may have raised it
    try:
        logger.warning("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
                       "Continuing to monitor.")
        logger.warning("Detected that the Ray Train controller actor (abc) is dead. Cleaning up placement group.")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert kept == ["Detected that the Ray Train controller actor (abc) is dead. Cleaning up placement group."]
    assert len([f for f in logger.filters if isinstance(f, runtime._DropMessage)]) == 1


def test_keys_written_into_the_endpoint_work_and_stay_out_of_messages(s3_server, s3_bucket):
    Store().write_bytes(f"{s3_bucket}/k/a.bin", b"data")
    host = s3_server.split("://", 1)[1]
    store = Store(StorageConfig(endpoint_url=f"http://AKIDINURL:{SECRET}@{host}"))
    assert store.read_bytes(f"{s3_bucket}/k/a.bin") == b"data"  # the keys in the URL are used, the URL is not
    with pytest.raises(Exception) as info:
        store.read_bytes(f"{s3_bucket}/k/missing.bin")
    assert SECRET not in str(info.value) and SECRET not in repr(store)
