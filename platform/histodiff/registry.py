"""MLflow model registry for the exported models: log, register, alias ``champion``.

Each export (``histodiff.checkpoint.export_model``) becomes an MLflow 3 LoggedModel of the stage's
run (a pyfunc model, :mod:`histodiff.pyfunc_model`, with a signature, an input example and a
description), registered as ``<registry_prefix>-<kind>`` with the alias
``tracking.champion_alias``; the version points at the LoggedModel. Exports up to ``tracking.max_model_upload_mb`` are copied into
MLflow; larger ones stay in storage and MLflow keeps their URI and sha256 (a pointer), so
gigabytes are never uploaded twice. Registering the same sha256 again is a no-op.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator

from histodiff import checkpoint
from histodiff.config import HistodiffConfig, TrackingConfig
from histodiff.storage import Store
from histodiff.tracker import Tracker, scrub

log = logging.getLogger(__name__)

_REQUIREMENTS = ("torch", "diffusers", "timm", "safetensors", "pyarrow", "mlflow")
# What each kind is, for the registry's descriptions (the UI shows them on the model's page).
KIND_DESCRIPTIONS = {
    "autoencoder": "KL autoencoder (diffusers AutoencoderKL): encodes tiles to latents and decodes them back.",
    "denoiser": "Unconditional latent denoiser (diffusers UNet2DModel, EMA weights): DDIM sampling of new latents.",
    "latent-classifier": "Noisy-latent classifier: its gradient guides sampling toward a chosen class.",
    "selector": "Tile classifier (timm): keeps the synthetic tiles that confidently match their target class.",
}


@dataclass
class RegisteredModel:
    """One registered model version."""

    name: str
    version: str
    sha256: str
    uri: str
    bundled: bool


def registered_name(tracking_cfg: TrackingConfig, kind: str) -> str:
    """Return the registry name of a model kind, e.g. ``histodiff-denoiser``."""
    return f"{tracking_cfg.registry_prefix}-{kind}"


def pip_requirements() -> list[str]:
    """Return pinned requirements (installed versions) for the pyfunc models."""
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def _export_size_mb(local_dir: str) -> float:
    return sum(p.stat().st_size for p in Path(local_dir).rglob("*") if p.is_file()) / 2**20


def _champion_sha(client, name: str, alias: str) -> str | None:
    try:
        return client.get_model_version_by_alias(name, alias).tags.get("histodiff.sha256")
    except Exception:  # no such model or alias yet
        return None


def model_signature():
    """Return the pyfunc signature: optional metadata field names in, the export's metadata out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "field", required=False)]),
                          outputs=Schema([ColSpec("string", "kind"), ColSpec("string", "sha256"),
                                          ColSpec("string", "model_dir")]))


def input_example():
    """Return the pyfunc input example: ask for the export's sha256."""
    import pandas as pd

    return pd.DataFrame({"field": ["sha256"]})


def register_export(tracking_cfg: TrackingConfig, store: Store, tracker: Tracker, kind: str,
                    uri: str, description: str = "") -> RegisteredModel | None:
    """Log one export as a pyfunc model in the tracker's run and alias it champion; return it.

    Returns None when tracking or registration is off, the export is incomplete, the same
    sha256 is already champion, MLflow fails (reported, never raised), or the server is down:
    then the registration waits with the run's other calls (:mod:`histodiff.tracking_buffer`).
    """
    if not (tracker.active and tracking_cfg.register_models):
        return None
    try:
        checkpoint.model_meta(uri, store)
    except FileNotFoundError:
        return None
    call = {"op": "register", "kind": kind, "uri": uri, "description": description,
            "tracking": tracking_cfg.model_dump(include={"registry_prefix", "champion_alias", "max_model_upload_mb"})}
    if not tracker.ready():
        tracker.defer(call)
        log.info("MLflow is unreachable: registering %s waits with the run's tracking calls",
                    registered_name(tracking_cfg, kind))
        return None
    try:
        return _register_checked(tracking_cfg, store, tracker, kind, uri, description)
    except Exception as exc:  # the registry must never fail a finished stage
        if not tracker.reachable():
            tracker.defer(call)
            return None
        log.warning("registering %s from %s failed: %s", registered_name(tracking_cfg, kind), scrub(uri),
                    scrub(exc)[:300])
        return None


def register_now(call: dict, tracker: Tracker) -> RegisteredModel | None:
    """Make a registration that waited for the server (a buffered ``register`` call); raise on failure."""
    tracking_cfg = TrackingConfig(**call["tracking"])
    return _register_checked(tracking_cfg, tracker.store or Store(), tracker, call["kind"], call["uri"],
                             call.get("description", ""))


def _register_checked(tracking_cfg: TrackingConfig, store: Store, tracker: Tracker, kind: str,
                      uri: str, description: str = "") -> RegisteredModel | None:
    meta = checkpoint.model_meta(uri, store)
    name = registered_name(tracking_cfg, kind)
    alias = tracking_cfg.champion_alias
    sha = str(meta.get("sha256", ""))
    if sha and _champion_sha(tracker.client, name, alias) == sha:
        log.info("%s@%s already holds sha256 %s; not registering again", name, alias, sha[:12])
        return None
    return _register(tracking_cfg, store, tracker, kind, uri, meta, name, alias, sha, description)


def _register(tracking_cfg: TrackingConfig, store: Store, tracker: Tracker, kind: str, uri: str, meta: dict,
              name: str, alias: str, sha: str, description: str) -> RegisteredModel:
    import mlflow.pyfunc
    from mlflow.models import Model

    client = tracker.client
    what = KIND_DESCRIPTIONS.get(kind, f"histodiff {kind} model.")
    text = f"{what} {description}".strip()
    with tempfile.TemporaryDirectory(prefix="histodiff-register-") as tmp:
        local = store.download_dir(uri, os.path.join(tmp, "export"))
        bundled = _export_size_mb(local) <= tracking_cfg.max_model_upload_mb
        if bundled:
            artifacts = {"export": local}
        else:
            pointer = os.path.join(tmp, "pointer.json")
            with open(pointer, "w") as f:
                json.dump({"uri": uri, "sha256": sha, "kind": kind}, f)
            artifacts = {"pointer": pointer}
        tags = {"histodiff.sha256": sha, "histodiff.uri": scrub(uri), "histodiff.bundled": str(bundled)}
        run = client.get_run(tracker.run_id)
        # Created here, not by Model.log: that one files it under the process's active experiment (Default).
        logged = client.create_logged_model(run.info.experiment_id, name=kind, source_run_id=tracker.run_id,
                                            tags={**tags, "mlflow.note.content": text}, params=run.data.params,
                                            model_type=f"histodiff-{kind}")
        # MLflow's model logging resolves the store from the process-wide URI: scope it to this call.
        with _scoped_tracking_uri(tracker.tracking_uri):
            info = Model.log(artifact_path=None, flavor=mlflow.pyfunc, model_id=logged.model_id,
                             run_id=tracker.run_id, python_model=str(Path(__file__).resolve().parent / "pyfunc_model.py"),
                             artifacts=artifacts, pip_requirements=pip_requirements(),
                             signature=model_signature(), input_example=input_example(),
                             metadata={"histodiff_kind": kind, "sha256": sha})
            try:
                client.create_registered_model(name, description=what)
            except Exception:  # already exists
                pass
            version = client.create_model_version(name, source=info.model_uri, run_id=tracker.run_id, tags=tags,
                                                  description=text, model_id=info.model_id)
    client.set_registered_model_alias(name, alias, version.version)
    tracker.set_tags({f"histodiff.model.{kind}.uri": uri, f"histodiff.model.{kind}.sha256": sha})
    log.info("registered %s version %s (@%s, %s, logged model %s)", name, version.version, alias,
             "bundled" if bundled else "pointer to storage", info.model_id)
    return RegisteredModel(name, str(version.version), sha, uri, bundled)


@contextlib.contextmanager
def _scoped_tracking_uri(uri: str) -> Iterator[None]:
    """Use ``uri`` as MLflow's process-wide URI inside the block; restore it and MLFLOW_TRACKING_URI after."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    # MLflow's own restore unsets the variable when no URI was set in code: a cluster's setting would vanish.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def load_champion(cfg: HistodiffConfig, kind: str):
    """Return the pyfunc model registered as ``<prefix>-<kind>@<champion alias>``."""
    import mlflow.artifacts
    import mlflow.pyfunc

    from histodiff.tracking import _mlflow_ready

    uri = _mlflow_ready(cfg)
    local = mlflow.artifacts.download_artifacts(
        f"models:/{registered_name(cfg.tracking, kind)}@{cfg.tracking.champion_alias}", tracking_uri=uri,
        registry_uri=uri)
    return mlflow.pyfunc.load_model(local)
