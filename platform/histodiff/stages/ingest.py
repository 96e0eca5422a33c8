"""Stage ``ingest``: folders or S3 prefixes of tile images -> Parquet tile shards, one directory per set.

Sets: the unlabeled pool (``paths.unlabeled_sources``), the labeled set (``paths.labeled_source``,
one folder per class) and an optional labeled test set. Every source is listed and checked here,
before any Ray work starts; the listing (every file's URI, label and dataset) is part of the
spec, by hash, so new or removed files rerun the stage. The work is :mod:`histodiff.data.ingest`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

from histodiff.config import HistodiffConfig
from histodiff.data.ingest import CONVERTED_CSV, SKIPPED_CSV, IngestSettings, ingest_set, items_fingerprint
from histodiff.data.sources import IngestError, list_labeled, list_unlabeled
from histodiff.headline import metric_name
from histodiff.runner import Context, Spec as StageSpec, StageResult
from histodiff.storage import Store, join

log = logging.getLogger(__name__)

VERSION = 1


class IngestSet(BaseModel):
    """One set to ingest: where its shards go and what was listed (by hash; the list itself rides along)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    out_uri: str
    listing: str
    items: SkipValidation[list[tuple[str, str | None, str]]] = Field(default_factory=list, exclude=True)


class Spec(StageSpec):
    """The sets to ingest and the tile settings."""

    settings: IngestSettings
    sets: list[IngestSet]


@dataclass
class Result(StageResult):
    """The shard directories written (or reused) per set, their tile counts and skip reports."""

    outputs: dict[str, str] = field(default_factory=dict)
    num_tiles: dict[str, int] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)


def spec(cfg: HistodiffConfig, store: Store) -> Spec:
    """Return the ingest spec after listing and checking every source (missing, empty, bad layout)."""
    p, settings = cfg.paths, IngestSettings.from_config(cfg)
    exts = settings.extensions
    listed: list[tuple[str, list, str]] = []
    if p.unlabeled_sources:
        listed.append(("unlabeled", list_unlabeled(p.unlabeled_sources, store, exts), p.unlabeled_shards))
    if p.labeled_source:
        listed.append(("labeled", list_labeled(p.labeled_source, store, exts), p.labeled_shards))
    if p.labeled_test_source:
        listed.append(("labeled_test", list_labeled(p.labeled_test_source, store, exts), p.labeled_test_shards))
    if not listed:
        raise IngestError("nothing to ingest: set paths.unlabeled_sources, paths.labeled_source "
                          "or paths.labeled_test_source")
    if p.labeled_source and p.labeled_test_source:
        train, test = {it[1] for it in listed[-2][1]}, {it[1] for it in listed[-1][1]}
        if not test <= train:
            raise IngestError(f"labeled test source {p.labeled_test_source!r} has classes {sorted(test - train)} "
                              f"that the labeled source {p.labeled_source!r} lacks")
    sets = [IngestSet(name=name, out_uri=out, listing=items_fingerprint(items, settings), items=items)
            for name, items, out in listed]
    return Spec(output_uri=sets[0].out_uri, settings=settings, sets=sets)


def work(spec: Spec, ctx: Context) -> Result:
    """Ingest every set into tile shards; return their URIs, counts and reports (skipped files named)."""
    result = Result()
    for s in spec.sets:
        manifest, reused = ingest_set(s.name, s.items, s.out_uri, ctx.store, spec.settings)
        result.outputs[s.name] = s.out_uri
        result.num_tiles[s.name] = manifest.num_tiles
        result.classes[s.name] = manifest.classes
        result.reports[s.name] = manifest.report
        result.reused[s.name] = reused
        metrics = {metric_name(s.name, "tiles_written"): manifest.num_tiles,
                   metric_name(s.name, "files_seen"): manifest.report["seen"]}
        for key in ("skipped", "converted"):
            metrics.update({metric_name(s.name, key, r): n for r, n in manifest.report[key].items()})
        ctx.tracker.log_metrics(metrics)
        ctx.tracker.log_dict(manifest.report, f"ingest/{s.name}_report.json")
        for csv_name in (SKIPPED_CSV, CONVERTED_CSV):
            uri = join(s.out_uri, csv_name)
            if ctx.store.exists(uri):
                ctx.tracker.log_text(ctx.store.read_bytes(uri).decode(), f"ingest/{s.name}_{csv_name}")
        log.info("%s -> %s: %d tiles%s; skipped %s; converted %s", s.name, s.out_uri, manifest.num_tiles,
                 " (reused)" if reused else "", manifest.report["skipped"] or "none",
                 manifest.report["converted"] or "none")
    return result
