"""The MLflow UI as a user sees it, in headless Chromium, on a store a real (small) pipeline run made.

The pipeline runs ingest, autoencoder (a few steps) and evaluate (on a stand-in synthetic set:
noise tiles with the real classes, so no diffusion training is needed) with tracking to SQLite;
then ``mlflow ui`` serves that store and Chromium renders the experiment link the demo prints
and a stage run's page. The rendered DOM must be the runs view (not GenAI's traces dashboard),
with the stage runs nested under the parent and the gain column. Screenshots are kept in the
test's temporary folder (their paths are printed). `make ui-check` installs Chromium first.
"""

from __future__ import annotations

import html
import re
import shutil
import signal
import subprocess

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make ui-check` installs it)")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1600,1000", "--virtual-time-budget=60000"]


def _write_stand_in_synthetic(root: str, classes: list[str], tile_size: int) -> None:
    from histodiff.data import shards
    from histodiff.storage import Store

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (8 * len(classes), tile_size, tile_size, 3), dtype=np.uint8)
    labels = [classes[i % len(classes)] for i in range(len(tiles))]
    uri = f"{root}/synthetic/accepted"
    table = shards.tiles_table(tiles, labels, "stand-in", [f"noise-{i}" for i in range(len(tiles))])
    shards.write_table(table, f"{uri}/{shards.shard_name(0)}", Store())
    shards.write_manifest(shards.Manifest(uri, [shards.shard_name(0)], len(tiles), sorted(classes), tile_size,
                                          fingerprint="stand-in"), Store())


def _text(dom: str) -> str:
    dom = re.sub(r"<style.*?</style>|<script.*?</script>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def _render(url: str, png: str, profile: str) -> str:
    """Return the rendered page's text; save its screenshot at ``png`` (one fresh browser profile per page)."""
    base = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}"]
    subprocess.run([*base, f"--screenshot={png}", url], capture_output=True, timeout=180, check=True)
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, timeout=180, check=True, text=True).stdout
    return _text(dom)


@pytest.fixture
def ui_store(ray_local, builtin_data, tmp_path):
    """A SQLite store holding one real pipeline run (ingest, autoencoder, evaluate); yields (cfg, result)."""
    from histodiff.config import load_config
    from histodiff.pipeline import run_pipeline

    root = str(tmp_path / "out")
    _write_stand_in_synthetic(root, ["BACK", "STR", "TUM"], 32)
    cfg = load_config("tiny", [
        f"paths.root={root}", f"paths.unlabeled_sources=[{builtin_data['unlabeled']}]",
        f"paths.labeled_source={builtin_data['labeled_train']}",
        f"paths.labeled_test_source={builtin_data['labeled_test']}",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "autoencoder.steps=4", "autoencoder.checkpoint_every=4",
        "autoencoder.batch_size=8", "evaluation.epochs=1", "evaluation.steps=3", "evaluation.image_size=16",
        "evaluation.backbone=test_resnet", "evaluation.seeds=[0]", "evaluation.batch_size=8",
        "evaluation.memorisation_pairs=2", "evaluation.controls=[]",
        "evaluation.synthetic_weighting=none"])  # the stand-in tiles have no synthesis lineage
    return cfg, run_pipeline(cfg, ["ingest", "autoencoder", "evaluate"])


@pytest.fixture
def mlflow_ui_server(ui_store):
    """``mlflow ui`` on the test's store, as a user starts it; yields its base URL."""
    from conftest import MlflowServer

    cfg, _ = ui_store
    server = MlflowServer(args=("ui", "--backend-store-uri", cfg.tracking.tracking_uri))
    try:
        yield server.start().url
    finally:
        server.stop(signal.SIGTERM)


def test_the_experiment_opens_on_its_runs_with_the_gain_and_a_stage_run_shows_its_figures(
        ui_store, mlflow_ui_server, tmp_path):
    from histodiff import mlflow_ui

    cfg, result = ui_store
    link = mlflow_ui.experiment_url(mlflow_ui_server, result.experiment_id)  # the link the demo prints
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = _render(link, str(shots / "experiment.png"), str(tmp_path / "profile-1"))
    print(f"\nscreenshots: {shots}")
    # The runs view of the model-training mode, not GenAI's traces dashboard.
    assert "Model training" in page and "Runs" in page
    for genai_only in ("Detect Issues", "Judges", "Sessions", "Tool calls"):
        assert genai_only not in page
    # The stage runs, nested under the pipeline run and expanded; the gain column and its value.
    for stage in ("pipeline", "ingest", "autoencoder", "evaluate"):
        assert f"{cfg.name}/{stage}" in page
    assert "evaluate/gain_balanced_accuracy_points" in page
    gain = result.figures["evaluate"]["gain_balanced_accuracy_points"]
    assert f"{gain:.4g}"[:4] in page
    # The experiment's description says what the runs are and where the gain is.
    assert "preset" in page and "percentage points" in page

    stage = result.stages["autoencoder"]
    page = _render(mlflow_ui.run_url(mlflow_ui_server, result.experiment_id, stage.run_id),
                   str(shots / "autoencoder_run.png"), str(tmp_path / "profile-2"))
    assert f"{cfg.name}/autoencoder" in page and "psnr_db" in page and "histodiff.expected" in page
    assert "Evaluations" not in page  # GenAI's run page
    assert "Stage autoencoder of preset tiny" in page and f"{cfg.tracking.registry_prefix}-autoencoder" in page

    # The experiment's Models tab lists the logged model (MLflow 3), ready, with the run that made it.
    page = _render(link.replace("/runs?", "/models?"), str(shots / "models.png"), str(tmp_path / "profile-3"))
    assert "autoencoder Ready" in page and f"{cfg.name}/autoencoder" in page
    for png in ("experiment.png", "autoencoder_run.png", "models.png"):
        assert (shots / png).stat().st_size > 10_000
