"""The pipeline's stages, in data-flow order. Each is a module: ``VERSION``, ``Spec``, ``spec()``, ``work()``.

A stage's name is its module's name; :mod:`histodiff.runner` runs any of them the same way.
"""

from __future__ import annotations

from types import ModuleType

from histodiff.stages import (autoencoder, classifier, encode, evaluate, ingest, pretrain, pseudolabel, selector,
                              synthesize)

STAGES: tuple[ModuleType, ...] = (ingest, autoencoder, encode, pretrain, pseudolabel, classifier, selector, synthesize,
                                  evaluate)
NAMES: tuple[str, ...] = tuple(s.__name__.rsplit(".", 1)[-1] for s in STAGES)


def by_name(name: str) -> ModuleType:
    """Return the stage called ``name``, or raise a ValueError that lists the stages."""
    for stage, stage_name in zip(STAGES, NAMES):
        if stage_name == name:
            return stage
    raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(NAMES)}")
