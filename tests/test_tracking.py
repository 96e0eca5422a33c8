"""MLflow tracking and registry against a real ``mlflow server``: nesting, secrets, crashes, models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pandas as pd
import pytest

from histodiff import checkpoint, registry, tracking
from histodiff.config import load_config
from histodiff.runtime import worker_env
from histodiff.storage import Store

SECRET = "hd-secret-value-NEVER-LOG-4242"


def _cfg(uri: str, **extra: str):
    overrides = [f"tracking.tracking_uri={uri}", f"tracking.experiment=t-{uuid.uuid4().hex[:8]}",
                 f"name=trk{uuid.uuid4().hex[:6]}", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config("tiny", overrides)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(cfg):
    client = _client(cfg.tracking.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    return client.search_runs([exp.experiment_id])


@pytest.mark.slow
def test_parent_and_nested_runs_hold_params_metrics_artifacts_and_no_secrets(mlflow_server, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET + "-token")
    cfg = _cfg(mlflow_server, **{"storage.secret_access_key": SECRET + "-cfg", "storage.access_key_id": "AKIAEXAMPLE"})
    with tracking.parent_run(cfg, "pipeline") as parent:
        with tracking.stage_run(cfg, "ingest", params={"leaky": f"key={SECRET}", "denoiser.steps": 7},
                                parent_run_id=parent.run_id) as stage:
            for step in range(12):
                stage.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            stage.set_tags({"note": f"uses {SECRET}"})
            stage.log_dict({"env": dict(os.environ)}, "env.json")
            stage.log_text(f"token {SECRET}-token", "notes.txt")
    client = _client(mlflow_server)
    runs = {r.data.tags["histodiff.stage"]: r for r in _runs(cfg)}
    assert set(runs) == {"pipeline", "ingest"}
    assert runs["ingest"].data.tags["mlflow.parentRunId"] == runs["pipeline"].info.run_id
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    history = client.get_metric_history(runs["ingest"].info.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(12))
    assert runs["ingest"].data.params["denoiser.steps"] == "7"  # a stage run holds the params it was given
    assert runs["pipeline"].data.params["denoiser.steps"] == str(cfg.denoiser.steps)  # the parent: the config
    # No secret anywhere: params, tags, or the artifacts logged through the tracker.
    texts = []
    for run in runs.values():
        texts += list(run.data.params.values()) + list(run.data.tags.values())
        texts += list(run.data.params)
    local = client.download_artifacts(runs["ingest"].info.run_id, "", str(tmp_path / "a"))
    for name in ("env.json", "notes.txt"):
        texts.append(open(os.path.join(local, name)).read())
    cfg_art = client.download_artifacts(runs["pipeline"].info.run_id, "config.yaml", str(tmp_path / "b"))
    texts.append(open(cfg_art).read())
    blob = "\n".join(texts)
    assert SECRET not in blob and "AKIAEXAMPLE" not in blob
    assert "key=***" in runs["ingest"].data.params["leaky"]
    assert "paths:" in texts[-1]


@pytest.mark.slow
def test_a_crashing_stage_ends_failed_and_keeps_the_error(mlflow_server):
    cfg = _cfg(mlflow_server)
    with pytest.raises(ZeroDivisionError):
        with tracking.stage_run(cfg, "encode"):
            1 / 0
    (run,) = _runs(cfg)
    assert run.info.status == "FAILED"
    assert run.data.tags["histodiff.error"].startswith("ZeroDivisionError")


def test_an_abandoned_run_is_ended_failed_at_exit(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    code = (
        "from histodiff import tracking; from histodiff.config import load_config\n"
        f"cfg = load_config('tiny', ['tracking.tracking_uri={uri}', 'tracking.experiment=atexit'])\n"
        "cm = tracking.stage_run(cfg, 'pretrain'); t = cm.__enter__(); print(t.run_id)\n"
        "raise SystemExit(3)  # the with-block never closes: only atexit can end the run\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 3, proc.stderr[-2000:]
    run_id = proc.stdout.strip().splitlines()[-1]
    assert _client(uri).get_run(run_id).info.status == "FAILED"


def test_a_dead_server_is_reported_and_never_raises(histodiff_log):
    from conftest import free_port

    cfg = _cfg(f"http://127.0.0.1:{free_port()}", **{"tracking.request_max_retries": 0,
                                                              "tracking.request_timeout_s": 2})
    old = {k: os.environ.pop(k, None) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    start = time.perf_counter()
    try:
        with tracking.stage_run(cfg, "pretrain") as tracker:
            for step in range(50):
                tracker.log_metrics({"loss": 1.0}, step=step)
            value = 42
    finally:
        for k, v in old.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    assert value == 42 and not tracker.active
    assert time.perf_counter() - start < 30
    assert [m for m in histodiff_log if "unreachable" in m] and len(histodiff_log) == 1  # one line, no more


def test_worker_env_carries_settings_and_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env = worker_env(None, f"sqlite:///{tmp_path}/x.db")
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/x.db" and env["AWS_REGION"] == "eu-west-1"
    assert worker_env(None, "sqlite:///rel.db")["MLFLOW_TRACKING_URI"] == "sqlite:///" + os.path.abspath("rel.db")
    assert SECRET not in json.dumps(env)  # Ray logs runtime_env: credentials never go through it


def test_result_metrics_flattens_numbers_only():
    from dataclasses import dataclass

    @dataclass
    class R:
        uri: str
        loss: float
        nested: dict
        ok: bool

    got = tracking.result_metrics(R("s3://x", 0.5, {"a": 1, "b": "no", "c": float("nan")}, True))
    assert got == {"loss": 0.5, "nested.a": 1.0, "ok": 1.0}


@pytest.mark.slow
def test_exported_denoiser_is_registered_as_champion_and_loads_back(mlflow_server, tmp_path, monkeypatch):
    from diffusers import UNet2DModel
    import mlflow.pyfunc

    cfg = _cfg(mlflow_server, **{"tracking.registry_prefix": f"hd{uuid.uuid4().hex[:6]}",
                                 "paths.root": str(tmp_path / "out")})
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"))
    store = Store()
    sha = checkpoint.export_model(model, cfg.paths.denoiser, {"kind": "denoiser"}, store)
    with tracking.stage_run(cfg, "pretrain") as tracker:
        first = registry.register_export(cfg.tracking, store, tracker, "denoiser", cfg.paths.denoiser)
        again = registry.register_export(cfg.tracking, store, tracker, "denoiser", cfg.paths.denoiser)
    assert first is not None and first.bundled and first.sha256 == sha and again is None
    name = registry.registered_name(cfg.tracking, "denoiser")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # what a user of the registry sets
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert loaded.predict(registry.input_example()) == {"sha256": sha}
    assert loaded.metadata.signature is not None and loaded.metadata.model_id
    torch_model = loaded.unwrap_python_model().load_torch()
    assert sum(p.numel() for p in torch_model.parameters()) == sum(p.numel() for p in model.parameters())
    version = _client(mlflow_server).get_model_version_by_alias(name, "champion")
    assert version.tags["histodiff.sha256"] == sha and version.run_id == tracker.run_id

    # Above max_model_upload_mb only a pointer goes to MLflow; loading follows it to storage.
    model2 = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D"))
    sha2 = checkpoint.export_model(model2, cfg.paths.denoiser, {"kind": "denoiser"}, store)
    big = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"max_model_upload_mb": 0.0})})
    with tracking.stage_run(big, "pretrain") as tracker:
        second = registry.register_export(big.tracking, store, tracker, "denoiser", big.paths.denoiser)
    assert second is not None and not second.bundled and second.version == "2"
    champion = registry.load_champion(big, "denoiser")
    client = _client(mlflow_server)
    model_id = champion.metadata.model_id  # the version's source is this LoggedModel of the stage's run
    assert client.get_logged_model(model_id).source_run_id == tracker.run_id
    files = [f.path for f in client.list_logged_model_artifacts(model_id, "artifacts")]
    assert files == ["artifacts/pointer.json"]
    meta = champion.predict(pd.DataFrame({"field": []}, dtype=str))
    assert meta["sha256"] == sha2
    assert json.loads(open(os.path.join(meta["model_dir"], "histodiff.json")).read())["kind"] == "denoiser"


@pytest.mark.gpu
def test_champion_denoiser_loads_onto_cuda_and_runs_in_bf16(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from diffusers import UNet2DModel

    from histodiff.runtime import autocast

    cfg = _cfg(f"sqlite:///{tmp_path}/m.db", **{"paths.root": str(tmp_path / "out")})
    model = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"))
    checkpoint.export_model(model, cfg.paths.denoiser, {"kind": "denoiser"}, Store())
    with tracking.stage_run(cfg, "pretrain") as tracker:
        assert registry.register_export(cfg.tracking, Store(), tracker, "denoiser", cfg.paths.denoiser) is not None
    unet = registry.load_champion(cfg, "denoiser").unwrap_python_model().load_torch().cuda()
    device = torch.device("cuda")
    x = torch.randn(4, 3, 8, 8, device=device)
    with torch.no_grad(), autocast(device):
        eps = unet(x, torch.full((4,), 10, device=device)).sample
    assert eps.shape == x.shape and torch.isfinite(eps.float()).all()
