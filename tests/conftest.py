"""Shared fixtures: a local Ray, an S3 endpoint on 127.0.0.1, an MLflow server, built-in data.

Every fixture starts a real component. Ray 2.60 writes token-auth state under $HOME/.ray,
so the session gets its own HOME and Ray temp dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

_SESSION_HOME = tempfile.mkdtemp(prefix="hd-home-")
os.environ["HOME"] = _SESSION_HOME
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
# Keep every test off a user's real MLflow store and credentials.
for _var in ("MLFLOW_TRACKING_URI", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            if time.time() > deadline:
                raise RuntimeError(f"{url} did not come up in {timeout}s")
            time.sleep(0.2)


@pytest.fixture
def histodiff_log():
    """The messages histodiff logs during a test (works with ``-p no:logging``, unlike caplog)."""
    import logging

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, logger = Keep(level=logging.INFO), logging.getLogger("histodiff")
    before = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(before)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is ~10x faster than OpenMP spinning."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray with 2 CPUs, shared by the whole session.

    Started after the S3 endpoint, so its workers inherit the endpoint and credentials from the
    environment, as every node of a real cluster has its own (histodiff never ships credentials).
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="hdray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
             runtime_env={"env_vars": {"AWS_EC2_METADATA_DISABLED": "true"}})
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real HTTP S3 endpoint (moto's threaded server) on 127.0.0.1; yields its URL.

    Sets fake credentials and the endpoint in the environment, as a user would.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing-access-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key-DO-NOT-LEAK",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": url,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the test S3 endpoint; yields ``s3://name``."""
    import uuid

    import boto3

    name = f"hd-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


class MlflowServer:
    """A real ``mlflow server`` (or ``mlflow ui``) on 127.0.0.1: start, stop (kill), start again on the same port.

    By default it owns a SQLite backend under ``root``; ``args`` replaces that with the caller's
    own (``("ui", "--backend-store-uri", uri)`` serves a store a run already wrote).
    """

    def __init__(self, root=None, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.args = args or ("server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--artifacts-destination", f"{root}/artifacts")
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> "MlflowServer":
        """Start the server (same port, same backend store) and wait until it answers."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", *self.args, "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ},
            start_new_session=True,  # the server forks job runners; stop the whole group
        )
        _wait_http(f"{self.url}/health", timeout=timeout)  # slow under a loaded 2-core machine
        return self

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server and everything it forked (SIGKILL by default: an outage, not a shutdown)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend, local artifact root); yields its URL."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server.start().url
    finally:
        server.stop(signal.SIGTERM)


@pytest.fixture
def own_mlflow(tmp_path):
    """A real ``mlflow server`` of this test alone, which the test may stop and start again; yields it."""
    server = MlflowServer(tmp_path / "mlflow-server")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory):
    """The built-in tissue data (unlabeled pool + labeled train/test) written once per session."""
    from histodiff.data.builtin import write_builtin_data

    root = tmp_path_factory.mktemp("builtin")
    return write_builtin_data(str(root))
