"""The pipeline under one MLflow parent run, against a real MLflow server, with the stages that exist."""

from __future__ import annotations

import uuid

import pytest

from histodiff.config import load_config
from histodiff.pipeline import resolve_stages, run_pipeline

SECRET = "pipeline-secret-NEVER-LOGGED-77"


def test_stages_are_put_in_data_flow_order_and_unknown_names_are_refused():
    assert resolve_stages(["evaluate", "ingest"]) == ["ingest", "evaluate"]
    assert resolve_stages(None)[0] == "ingest" and resolve_stages(None)[-1] == "evaluate"
    with pytest.raises(ValueError, match="ingestt"):
        resolve_stages(["ingestt"])


@pytest.mark.slow
def test_pipeline_nests_stage_runs_registers_the_autoencoder_and_skips_on_rerun(
        ray_local, builtin_data, mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    prefix = f"hd{uuid.uuid4().hex[:6]}"
    cfg = load_config("tiny", [
        f"paths.root={tmp_path}/out", f"paths.unlabeled_sources=[{builtin_data['unlabeled']}]",
        f"paths.labeled_source={builtin_data['labeled_train']}", "paths.labeled_test_source=null",
        f"tracking.tracking_uri={mlflow_server}", f"tracking.experiment=pipe-{uuid.uuid4().hex[:8]}",
        f"tracking.registry_prefix={prefix}", "autoencoder.steps=4", "autoencoder.checkpoint_every=4",
        "autoencoder.batch_size=8"])
    result = run_pipeline(cfg, ["ingest", "autoencoder"])
    assert list(result.stages) == ["ingest", "autoencoder"]
    assert result.registered == [f"{prefix}-autoencoder/1"]

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    by_stage = {r.data.tags["histodiff.stage"]: r for r in runs}
    assert sorted(by_stage) == ["autoencoder", "ingest", "pipeline"] and len(runs) == 3
    parent = by_stage["pipeline"]
    assert parent.info.run_id == result.parent_run_id
    for stage in ("ingest", "autoencoder"):
        assert by_stage[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert {r.info.status for r in runs} == {"FINISHED"}
    # The parent shows each stage's key figures as stage/name; the stage run logs them as name.
    psnr = result.stages["autoencoder"].psnr
    assert parent.data.metrics["autoencoder/psnr_db"] == pytest.approx(psnr, abs=1e-3)  # 3 decimals
    assert by_stage["autoencoder"].data.metrics["psnr_db"] == pytest.approx(psnr, abs=1e-3)
    assert parent.data.metrics["ingest/seconds"] > 0
    assert all("." not in k and k.count("/") == 1 for k in parent.data.metrics)
    # Each stage says how its figures compare with the preset's expected ranges (4 steps: off).
    assert by_stage["ingest"].data.tags["histodiff.expected"].startswith("within the expected range")
    assert "psnr_db" in by_stage["autoencoder"].data.tags["histodiff.expected"]
    assert "autoencoder" in parent.data.tags["mlflow.note.content"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and "mlflow.note.content" in exp.tags
    assert "gain_balanced_accuracy_points" in exp.tags["mlflow.sharedViewState.histodiff"]
    # The autoencoder is an MLflow 3 logged model of its run, with a signature and a description.
    (model,) = client.search_logged_models([exp.experiment_id])
    assert model.source_run_id == by_stage["autoencoder"].info.run_id and model.name == "autoencoder"
    assert "KL autoencoder" in model.tags["mlflow.note.content"] and "tiny" in model.tags["mlflow.note.content"]
    assert {"config.yaml", "pipeline_results.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    # The exported autoencoder is registered from its stage's run, alias champion.
    version = client.get_model_version_by_alias(f"{prefix}-autoencoder", "champion")
    assert version.run_id == by_stage["autoencoder"].info.run_id
    assert version.tags["histodiff.sha256"] == result.stages["autoencoder"].sha256
    # No secret in any param or tag.
    for run in runs:
        assert all(SECRET not in v for v in [*run.data.params.values(), *run.data.tags.values()])

    again = run_pipeline(cfg, ["ingest", "autoencoder"])
    assert again.stages["autoencoder"].skipped and again.stages["autoencoder"].sha256 == version.tags["histodiff.sha256"]
    assert again.registered == []  # the same weights are not registered twice
    assert len(client.search_model_versions(f"name='{prefix}-autoencoder'")) == 1
