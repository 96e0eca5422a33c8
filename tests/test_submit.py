"""``histodiff submit`` against a real local Ray head (token auth) started by the test."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from histodiff.storage import Store
from histodiff import submit
from histodiff.config import ConfigError
from histodiff.errors import UserError


def test_entrypoint_uses_the_cli_a_preset_or_a_shipped_config_and_joins_the_cluster(tmp_path, monkeypatch):
    command = submit.entrypoint("pretrain", "tiny", ["denoiser.steps=5", "paths.root=s3://b/x y"])
    # A preset goes by name: the package shipped as py_modules carries the presets.
    assert shlex.split(command) == ["python", "-m", "histodiff.cli", "run", "pretrain", "--config", "tiny",
                                    "denoiser.steps=5", "paths.root=s3://b/x y", "ray.address=auto"]
    sweep = shlex.split(submit.entrypoint("sweep", "paper", [], space="tuning/search_space.yaml"))
    assert sweep[3:5] == ["sweep", "--config"] and sweep[sweep.index("--space") + 1] == "tuning/search_space.yaml"
    with pytest.raises(ConfigError, match="unknown preset"):
        submit.entrypoint("ingest", "tinny", [])
    # --stages: the pipeline's subset, checked and put in data-flow order before anything is submitted.
    first = shlex.split(submit.entrypoint("pipeline", "tiny", [], stages="autoencoder,ingest"))
    assert first[first.index("--stages") + 1] == "ingest,autoencoder"
    with pytest.raises(UserError, match="unknown stage 'foo'"):
        submit.entrypoint("pipeline", "tiny", [], stages="ingest,foo")
    with pytest.raises(UserError, match="pipeline only"):
        submit.entrypoint("ingest", "tiny", [], stages="ingest")
    shipped = tmp_path / "shipped"
    (shipped / "configs").mkdir(parents=True)
    (shipped / "configs" / "mine.yaml").write_text("name: mine\n")
    outside = tmp_path / "mine.yaml"
    outside.write_text("name: mine\n")
    monkeypatch.setattr(submit, "working_dir", lambda: shipped)
    command = submit.entrypoint("ingest", str(shipped / "configs" / "mine.yaml"), [])
    assert shlex.split(command)[shlex.split(command).index("--config") + 1] == "configs/mine.yaml"
    with pytest.raises(ConfigError, match="outside"):
        submit.entrypoint("ingest", str(outside), [])


def test_runtime_env_ships_the_package_and_no_secret(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-never-shipped")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    env = submit.runtime_env()
    assert submit.checkout_root() == Path(__file__).resolve().parents[1]  # the tests run from a checkout
    assert env["py_modules"] == [str(submit.PACKAGE_DIR)] and env["working_dir"] == str(submit.checkout_root())
    assert (submit.PACKAGE_DIR / "presets" / "tiny.yaml").is_file()  # the presets travel with the package
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "s3cr3t-never-shipped" not in repr(env) and ".venv" in env["excludes"]
    assert "torch>=2.4" in submit.runtime_env(pip=True)["pip"]
    assert submit.auth_headers("tok") == {"Authorization": "Bearer tok"}
    # An installed histodiff (no checkout around it) ships the current directory and its metadata's requirements.
    monkeypatch.setattr(submit, "checkout_root", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert submit.runtime_env()["working_dir"] == str(tmp_path)
    deps = submit.dependencies()
    assert any(d.replace(" ", "").startswith("torch>=") for d in deps) and not any("pytest" in d for d in deps)


@pytest.fixture
def ray_head(tmp_path):
    """A real Ray head on 127.0.0.1 with token auth and its own temp dir; yields (dashboard URL, token)."""
    import time
    import urllib.request

    from conftest import free_port

    token = uuid.uuid4().hex + uuid.uuid4().hex
    port, dash = free_port(), free_port()
    temp_dir = f"/tmp/hdsub-{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    # As on a cluster image, `python` in a job's entrypoint is the interpreter with the dependencies.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=1", f"--temp-dir={temp_dir}", "--block", "--disable-usage-stats",
         # Own agent ports: the session's local Ray already holds Ray's default ones.
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{dash}/api/version",
                                         headers={"Authorization": f"Bearer {token}"})
        deadline = time.time() + 300
        while True:  # the version endpoint answers only with the token: this also checks token auth
            try:
                urllib.request.urlopen(request, timeout=5)
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the Ray head on port {dash} did not come up")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{dash}", token
    finally:
        # Stop only this head: its `ray start --block` process and its process group, never `ray stop`.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        subprocess.run(["rm", "-rf", temp_dir], check=False)


@pytest.mark.slow
def test_submit_runs_ingest_on_a_token_auth_cluster(ray_head, builtin_data, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from histodiff.cli import main
    from histodiff.data.shards import read_manifest

    address, token = ray_head
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"  # the job runs on this machine: a file is enough
    experiment = f"submit-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    code = main(["submit", "ingest", "--address", address, "--token", token, "--config", "tiny",
                 f"paths.root={out}", "paths.unlabeled_sources=[]", f"paths.labeled_source={builtin_data['labeled_test']}",
                 "paths.labeled_test_source=null", f"tracking.tracking_uri={tracking_uri}",
                 f"tracking.experiment={experiment}", "ray.num_cpus=null"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    assert "submitted job" in printed and "SUCCEEDED" in printed
    manifest = read_manifest(str(out / "shards" / "labeled"), Store())
    assert manifest.num_tiles > 0 and manifest.classes
    client = MlflowClient(tracking_uri=tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.data.tags["histodiff.stage"] == "ingest" and run.info.status == "FINISHED"

    # A wrong token is refused by the cluster, and no job runs: one line naming the token, exit 2.
    assert main(["submit", "ingest", "--address", address, "--token", "wrong", "--config", "tiny", "--no-wait"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("histodiff:")]
    assert len(err) == 1 and "auth token" in err[0] and address in err[0]
