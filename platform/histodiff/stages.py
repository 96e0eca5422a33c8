"""The pipeline's stages by name, in order: each is a module with ``run(cfg) -> result``."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from histodiff.config import HistodiffConfig

# name -> module holding ``run(cfg: HistodiffConfig)``; the order is the data flow.
STAGES: dict[str, str] = {
    "ingest": "histodiff.data.ingest",
    "autoencoder": "histodiff.train.autoencoder",
    "encode": "histodiff.data.encode",
    "pretrain": "histodiff.train.denoiser",
    "classifier": "histodiff.train.latent_classifier",
    "synthesize": "histodiff.augment.synthesize",
    "evaluate": "histodiff.evaluate.downstream",
}


def get_stage(name: str) -> Callable[[HistodiffConfig], Any]:
    """Return the ``run`` function of a stage, or raise a clear error for an unknown name."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {list(STAGES)}")
    return importlib.import_module(STAGES[name]).run
