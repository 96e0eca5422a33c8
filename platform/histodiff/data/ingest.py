"""Ingest stage: folders or S3 prefixes of tile images -> Parquet tile shards (data/shards.py).

The driver lists every source once and checks it (missing path or bucket, credentials,
endpoint, empty prefix, class folders without images) before any Ray work starts. The
sorted file list is cut into fixed chunks of ``data.tiles_per_shard`` files; Ray tasks
decode, convert, resize and crop each chunk, and the driver drops duplicates globally
(first occurrence in list order wins) before a second task writes ``part-<chunk>.parquet``
and a progress record. ``_manifest.json`` is written last. A rerun with the same inputs
and settings (the fingerprint) reuses the manifest, or the finished chunks after a crash.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from histodiff import storage
from histodiff.config import HistodiffConfig, StorageConfig
from histodiff.data import shards

log = logging.getLogger(__name__)

VERSION = 1
PROGRESS_DIR = "_progress"
# Skips that mean a broken input; past data.max_bad_fraction of them the job fails.
BAD_REASONS = ("empty", "not_image", "truncated", "corrupt", "unreadable", "too_small")
GRAY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class IngestError(ValueError):
    """A bad ingest input, reported with the URI and what to do."""


@dataclass
class IngestResult:
    """The shard directories written (or reused) per set, their tile counts and skip reports."""

    outputs: dict[str, str] = field(default_factory=dict)
    num_tiles: dict[str, int] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)


def prepare_tile(data: bytes, tile_size: int, min_source_size: int,
                 saturation_threshold: int | None) -> tuple[np.ndarray | None, str | None, str | None]:
    """Return (uint8 HWC RGB tile or None, skip reason or None, conversion or None) for file bytes."""
    if not data:
        return None, "empty", None
    try:
        img = Image.open(io.BytesIO(data))
    except Exception:  # PIL raises UnidentifiedImageError, or anything for garbage headers
        return None, "not_image", None
    try:
        img.load()
    except OSError as exc:
        return None, ("truncated" if "truncat" in str(exc).lower() else "corrupt"), None
    except Exception:
        return None, "corrupt", None
    conversion = None
    if img.mode != "RGB":
        if img.mode in GRAY_MODES:
            conversion = "grayscale"
            if img.mode.startswith("I") or img.mode == "F":  # 16-bit/float: rescale to 8 bits
                arr = np.asarray(img, dtype=np.float64)
                span = max(float(arr.max() - arr.min()), 1e-9)
                img = Image.fromarray(((arr - arr.min()) / span * 255).round().astype(np.uint8))
        elif img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
            conversion = "rgba"
            rgba = img.convert("RGBA")
            # Composite over white: transparent areas of a slide scan are glass.
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        else:
            conversion = img.mode.lower().replace(";", "")
        img = img.convert("RGB")
    if min(img.size) < min_source_size:
        return None, "too_small", conversion
    w, h = img.size
    scale = tile_size / min(w, h)
    # Paper protocol: resize the smallest side to the tile size, then center-crop.
    nw, nh = max(tile_size, round(w * scale)), max(tile_size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - tile_size) // 2, (nh - tile_size) // 2
    tile = np.asarray(img.crop((left, top, left + tile_size, top + tile_size)))
    if saturation_threshold is not None:
        sat = np.asarray(Image.fromarray(tile).convert("HSV"))[..., 1].mean()
        if sat < saturation_threshold:
            return None, "low_saturation", conversion
    return tile, None, conversion


def _process_chunk(items: list[tuple[str, str | None, str]], params: dict[str, Any],
                   storage_cfg: StorageConfig) -> tuple[Any, dict[str, Any]]:
    """Return (Arrow table of good tiles, stats) for one chunk of (uri, label, dataset) items."""
    rows: dict[str, list] = {name: [] for name in shards.TILE_SCHEMA.names}
    skipped: Counter = Counter()
    converted: Counter = Counter()
    for uri, label, dataset in items:
        try:
            data = storage.read_bytes(uri, storage_cfg)
        except storage.StorageError:
            skipped["unreadable"] += 1
            continue
        tile, reason, conversion = prepare_tile(data, params["tile_size"], params["min_source_size"],
                                                params["saturation_threshold"])
        if conversion:
            converted[conversion] += 1
        if tile is None:
            skipped[reason] += 1
            continue
        rows["image"].append(shards.encode_png(tile))
        rows["label"].append(label)
        rows["dataset"].append(dataset)
        rows["source"].append(uri)
        rows["sha1"].append(shards.pixel_sha1(tile))
        rows["height"].append(int(tile.shape[0]))
        rows["width"].append(int(tile.shape[1]))
    import pyarrow as pa

    table = pa.Table.from_pydict(rows, schema=shards.TILE_SCHEMA)
    return table, {"sha1": rows["sha1"], "skipped": dict(skipped), "converted": dict(converted)}


def _write_chunk(table: Any, keep: list[bool], shard_uri: str | None, progress_uri: str,
                 progress: dict[str, Any], storage_cfg: StorageConfig) -> None:
    """Write one shard (the kept rows) and then its progress record."""
    import pyarrow as pa

    if shard_uri is not None:
        shards.write_table(table.filter(pa.array(keep, type=pa.bool_())), shard_uri, storage_cfg)
    storage.write_json(progress_uri, progress, storage_cfg)


def _source_name(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) or uri




def _list_images(uri: str, what: str, cfg: HistodiffConfig) -> list[str]:
    storage.check_readable(uri, cfg.storage)
    files = storage.list_files(uri, cfg.storage, cfg.data.extensions)
    if not files:
        raise IngestError(f"{what} {uri!r} holds no image files ({', '.join(cfg.data.extensions)}); "
                          "check the path, or set data.extensions")
    return files


def list_unlabeled(cfg: HistodiffConfig) -> list[tuple[str, str | None, str]]:
    """Return the sorted (uri, None, dataset) items of every unlabeled source."""
    items = []
    for source in cfg.paths.unlabeled_sources:
        files = _list_images(source, "unlabeled source", cfg)
        items += [(f, None, _source_name(source)) for f in files]
    return sorted(items)


def list_labeled(source: str, cfg: HistodiffConfig) -> list[tuple[str, str | None, str]]:
    """Return the sorted (uri, class, dataset) items of a one-folder-per-class source."""
    files = _list_images(source, "labeled source", cfg)
    # list_files returns "s3://" + path or a local absolute path under the resolved base
    base = storage.resolve(source, cfg.storage).path.rstrip("/")
    by_class: dict[str, list[str]] = {}
    for f in files:
        path = f[5:] if storage.is_s3(f) else f
        rel = path[len(base) + 1 :].replace(os.sep, "/")
        if "/" not in rel:
            raise IngestError(f"labeled source {source!r} holds image files directly in it ({rel!r}); it needs "
                              "one folder per class (the NCT-CRC layout: <source>/<CLASS>/<tile>.tif)")
        by_class.setdefault(rel.split("/", 1)[0], []).append(f)
    folders = [d for d in storage.list_dirs(source, cfg.storage) if not d.startswith((".", "_"))]
    empty = sorted(set(folders) - set(by_class))
    if empty:
        raise IngestError(f"class folder(s) {empty} of labeled source {source!r} hold no image files "
                          f"({', '.join(cfg.data.extensions)}); add tiles or remove the folder(s)")
    name = _source_name(source)
    return sorted((f, label, name) for label, fs in by_class.items() for f in fs)


def _fingerprint(items: list[tuple[str, str | None, str]], cfg: HistodiffConfig) -> str:
    d = cfg.data
    params = [VERSION, d.tile_size, d.min_source_size, d.saturation_threshold, d.tiles_per_shard]
    h = hashlib.sha256(json.dumps(params).encode())
    for item in items:
        h.update(json.dumps(item).encode())
    return h.hexdigest()[:16]


def _clear_stale(out_uri: str, cfg: StorageConfig) -> None:
    """Remove an earlier run's outputs (manifest first, so the directory reads incomplete)."""
    storage.delete(storage.join(out_uri, shards.MANIFEST), cfg)
    storage.delete(storage.join(out_uri, PROGRESS_DIR), cfg)
    if storage.exists(out_uri, cfg):
        for f in storage.list_files(out_uri, cfg, [".parquet"]):
            if posixpath.basename(f).startswith("part-"):
                storage.delete(f, cfg)


def _finished_chunks(out_uri: str, fingerprint: str, cfg: StorageConfig) -> dict[int, dict[str, Any]]:
    """Return {chunk index: progress record} of chunks an earlier run with this fingerprint finished."""
    # One listing each for records and shards: never a request per chunk.
    records = storage.list_files(storage.join(out_uri, PROGRESS_DIR), cfg, [".json"])
    parts = {posixpath.basename(u) for u in storage.list_files(out_uri, cfg, [".parquet"])} if records else set()
    done = {}
    for uri in records:
        rec = storage.read_json(uri, cfg)
        if rec.get("fingerprint") == fingerprint and (rec["shard"] is None or rec["shard"] in parts):
            done[int(posixpath.basename(uri)[len("chunk-"):-len(".json")])] = rec
    return done


def _report_add(report: dict[str, Any], stats: dict[str, Any]) -> None:
    for key in ("skipped", "converted"):
        for reason, n in stats.get(key, {}).items():
            report[key][reason] = report[key].get(reason, 0) + n


def _check_bad(name: str, report: dict[str, Any], total: int, max_bad_fraction: float) -> None:
    bad = sum(report["skipped"].get(r, 0) for r in BAD_REASONS)
    # Checked after every chunk: fail as soon as the bad count can no longer end under the limit.
    if bad > max_bad_fraction * total:
        by_reason = {r: report["skipped"][r] for r in BAD_REASONS if report["skipped"].get(r)}
        raise IngestError(f"{name}: {bad} of {total} files are unusable {by_reason}, more than "
                          f"data.max_bad_fraction={max_bad_fraction}; fix the source or raise the limit")


def ingest_set(name: str, items: list[tuple[str, str | None, str]], out_uri: str,
               cfg: HistodiffConfig) -> tuple[shards.Manifest, bool]:
    """Return (manifest, reused) after writing one shard directory from the listed items."""
    import ray
    from tqdm.auto import tqdm

    from histodiff.runtime import worker_env

    scfg = cfg.storage
    fingerprint = _fingerprint(items, cfg)
    manifest_uri = storage.join(out_uri, shards.MANIFEST)
    if storage.exists(manifest_uri, scfg):
        old = shards.read_manifest(out_uri, scfg)
        if old.fingerprint == fingerprint:
            log.info("%s: %s is complete for these inputs (%d tiles); skipping", name, out_uri, old.num_tiles)
            return old, True
        log.info("%s: inputs or settings changed since %s was written; rebuilding it", name, out_uri)
        _clear_stale(out_uri, scfg)
    per = cfg.data.tiles_per_shard
    chunks = [items[i : i + per] for i in range(0, len(items), per)]
    params = {"tile_size": cfg.data.tile_size, "min_source_size": cfg.data.min_source_size,
              "saturation_threshold": cfg.data.saturation_threshold}
    opts = {"num_cpus": 1, "runtime_env": {"env_vars": worker_env(cfg)}}
    process = ray.remote(_process_chunk).options(num_returns=2, **opts)
    write = ray.remote(_write_chunk).options(**opts)
    window = max(2, int(ray.available_resources().get("CPU", 1)) * 2)

    report: dict[str, Any] = {"seen": 0, "written": 0, "skipped": {}, "converted": {}}
    seen_sha1: set[str] = set()
    shard_names: list[str] = []
    futures: dict[int, tuple[Any, Any]] = {}
    done = _finished_chunks(out_uri, fingerprint, scfg)
    if done:
        log.info("%s: resuming; %d of %d chunks were finished by an earlier run", name, len(done), len(chunks))
    todo = [i for i in range(len(chunks)) if i not in done]
    next_submit = 0

    def submit_until(limit: int) -> None:
        nonlocal next_submit
        while next_submit < len(todo) and todo[next_submit] <= limit:
            i = todo[next_submit]
            futures[i] = process.remote(chunks[i], params, scfg)
            next_submit += 1

    writes = []
    with tqdm(total=len(items), desc=f"ingest {name}", unit="file") as bar:
        for i, chunk in enumerate(chunks):
            if i in done:
                rec = done[i]
                stats = rec["stats"]
                keep_sha1 = rec["kept_sha1"]
            else:
                # Keep a bounded window of chunks in flight ahead of the in-order consumer.
                submit_until(i + window)
                table_ref, stats_ref = futures.pop(i)
                stats = ray.get(stats_ref)
                keep = []
                for s in stats["sha1"]:
                    keep.append(s not in seen_sha1)
                    seen_sha1.add(s)
                keep_sha1 = [s for s, k in zip(stats["sha1"], keep) if k]
                dups = len(keep) - len(keep_sha1)
                stats = {"skipped": {**stats["skipped"], **({"duplicate": dups} if dups else {})},
                         "converted": stats["converted"], "seen": len(chunk)}
                shard = shards.shard_name(i) if keep_sha1 else None
                rec = {"fingerprint": fingerprint, "shard": shard, "kept_sha1": keep_sha1, "stats": stats}
                writes.append(write.remote(table_ref, keep, storage.join(out_uri, shard) if shard else None,
                                           storage.join(out_uri, PROGRESS_DIR, f"chunk-{i:05d}.json"), rec, scfg))
            seen_sha1.update(keep_sha1)
            if rec["shard"]:
                shard_names.append(rec["shard"])
            report["seen"] += len(chunk)
            report["written"] += len(keep_sha1)
            _report_add(report, stats)
            _check_bad(name, report, len(items), cfg.data.max_bad_fraction)
            bar.update(len(chunk))
    ray.get(writes)
    if report["written"] == 0:
        raise IngestError(f"{name}: none of the {len(items)} files gave a usable tile (report: {report}); "
                          "check the sources, data.min_source_size and data.saturation_threshold")
    labels = {it[1] for it in items if it[1] is not None}
    manifest = shards.Manifest(uri=out_uri, shards=shard_names, num_tiles=report["written"],
                               classes=sorted(labels), tile_size=cfg.data.tile_size, report=report,
                               fingerprint=fingerprint, extra={"set": name, "ingest_version": VERSION})
    shards.write_manifest(manifest, scfg)
    return manifest, False


def _plan(cfg: HistodiffConfig) -> list[tuple[str, list, str]]:
    """Return [(set name, items, output URI)] after checking every source (no Ray yet)."""
    p = cfg.paths
    plan = []
    if p.unlabeled_sources:
        plan.append(("unlabeled", list_unlabeled(cfg), p.unlabeled_shards))
    if p.labeled_source:
        plan.append(("labeled", list_labeled(p.labeled_source, cfg), p.labeled_shards))
    if p.labeled_test_source:
        plan.append(("labeled_test", list_labeled(p.labeled_test_source, cfg), p.labeled_test_shards))
    if not plan:
        raise IngestError("nothing to ingest: set paths.unlabeled_sources, paths.labeled_source "
                          "or paths.labeled_test_source")
    if p.labeled_source and p.labeled_test_source:
        train = {it[1] for it in plan[-2][1]}
        test = {it[1] for it in plan[-1][1]}
        if not test <= train:
            raise IngestError(f"labeled test source {p.labeled_test_source!r} has classes {sorted(test - train)} "
                              f"that the labeled source {p.labeled_source!r} lacks")
    return plan


def run(cfg: HistodiffConfig) -> IngestResult:
    """Ingest every configured source into tile shards; return their URIs, counts and reports."""
    from histodiff import tracking
    from histodiff.runtime import init_ray

    plan = _plan(cfg)
    init_ray(cfg)
    result = IngestResult()
    with tracking.stage_run(cfg, "ingest") as tracker:
        for name, items, out_uri in plan:
            manifest, reused = ingest_set(name, items, out_uri, cfg)
            result.outputs[name] = out_uri
            result.num_tiles[name] = manifest.num_tiles
            result.classes[name] = manifest.classes
            result.reports[name] = manifest.report
            result.reused[name] = reused
            metrics = {f"{name}.tiles_written": manifest.num_tiles, f"{name}.files_seen": manifest.report["seen"]}
            for key in ("skipped", "converted"):
                metrics.update({f"{name}.{key}.{r}": n for r, n in manifest.report[key].items()})
            if tracker.active:
                tracker.log_metrics(metrics)
                tracker.log_dict(manifest.report, f"ingest/{name}_report.json")
            log.info("%s -> %s: %d tiles%s; skipped %s; converted %s", name, out_uri, manifest.num_tiles,
                     " (reused)" if reused else "", manifest.report["skipped"] or "none",
                     manifest.report["converted"] or "none")
    return result
