"""MLflow pyfunc wrapper for an exported histodiff model (an MLflow "model from code" file).

The registered model holds either the exported directory itself (small models) or a
pointer to it in storage (``pointer.json``: URI + sha256), so large weights are never
uploaded twice. ``mlflow.pyfunc.load_model("models:/histodiff-denoiser@champion")``
returns a model whose ``unwrap_python_model()`` gives :class:`ExportedModel`;
``predict(pd.DataFrame({"field": ["sha256"]}))`` returns ``{"sha256": ...}`` and an empty
``field`` column all the metadata.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

# Classes for the kinds whose exports are plain diffusers models; other kinds name their
# class in histodiff.json ("class": "module:Name").
KIND_CLASSES = {
    "autoencoder": "diffusers:AutoencoderKL",
    "denoiser": "diffusers:UNet2DModel",
}


class ExportedModel(mlflow.pyfunc.PythonModel):
    """A registered histodiff export: its local directory, its metadata, and a torch loader."""

    def load_context(self, context):  # no type hints: MLflow would try to infer a schema
        """Resolve the exported directory (bundled or pointed to) and check its hash."""
        artifacts = context.artifacts
        if "export" in artifacts:
            self.model_dir = artifacts["export"]
        else:
            from histodiff.storage import Store  # pointer mode reads storage: needs histodiff installed

            with open(artifacts["pointer"]) as f:
                pointer = json.load(f)
            self.model_dir = Store().download_dir(pointer["uri"], os.path.join(os.path.dirname(artifacts["pointer"]),
                                                                               "export"))
        with open(os.path.join(self.model_dir, "histodiff.json")) as f:
            self.meta = json.load(f)

    def load_torch(self) -> Any:
        """Return the torch model (safetensors weights) for this export."""
        spec = self.meta.get("class") or KIND_CLASSES.get(self.meta.get("kind", ""))
        if not spec:
            raise ValueError(f"export at {self.model_dir!r} names no model class; load it with "
                             "histodiff.checkpoint.load_exported(<class>, model_dir)")
        module, _, name = spec.partition(":")
        cls = getattr(importlib.import_module(module), name)
        model = cls.from_pretrained(self.model_dir, use_safetensors=True)
        model.eval()
        return model

    def predict(self, context, model_input: pd.DataFrame, params=None):  # DataFrame: MLflow infers no schema
        """Return the export's metadata (kind, sha256, local dir), or the fields that ``model_input`` names.

        The input is a DataFrame with an optional ``field`` column (the signature); weights come
        from ``load_torch()``.
        """
        meta = {**self.meta, "model_dir": self.model_dir}
        columns = getattr(model_input, "columns", ())
        fields = [f for f in model_input["field"].tolist() if f] if "field" in columns else []
        return {f: meta.get(f) for f in fields} if fields else meta


set_model(ExportedModel())
