"""Ingest: folders or S3 prefixes of tile images -> Parquet tile shards (data/shards.py).

The ``ingest`` stage (:mod:`histodiff.stages.ingest`) lists every source once and checks it (missing path or bucket, credentials,
endpoint, empty prefix, class folders without images) before any Ray work starts. The
sorted file list is cut into fixed chunks of ``data.tiles_per_shard`` files; Ray tasks
decode, convert, resize and crop each chunk, and the driver drops duplicates globally
(first occurrence in list order wins) before a second task writes ``part-<chunk>.parquet``
and a progress record. ``_manifest.json`` is written last. A rerun with the same inputs
and settings (the fingerprint) reuses the manifest, or the finished chunks after a crash.
Every skipped file is named with its reason in ``skipped.csv`` beside the manifest (and every
converted one in ``converted.csv``), so a user can find the truncated tile.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from histodiff.config import HistodiffConfig
from histodiff.data import shards
from histodiff.data.sources import IngestError
from histodiff.storage import Store, StorageError, join

log = logging.getLogger(__name__)

VERSION = 1
PROGRESS_DIR = "_progress"
SKIPPED_CSV = "skipped.csv"
CONVERTED_CSV = "converted.csv"
# Skips that mean a broken input; past data.max_bad_fraction of them the job fails.
BAD_REASONS = ("empty", "not_image", "truncated", "corrupt", "unreadable", "too_small")
GRAY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class IngestSettings(BaseModel):
    """How files become tiles (``data.*``): size, formats, quality floors, shard size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tile_size: int
    extensions: list[str]
    min_source_size: int
    saturation_threshold: int | None
    max_bad_fraction: float
    tiles_per_shard: int

    @classmethod
    def from_config(cls, cfg: HistodiffConfig) -> "IngestSettings":
        """Return the settings named by ``cfg.data``."""
        data = cfg.data
        return cls(tile_size=data.tile_size, extensions=data.extensions, min_source_size=data.min_source_size,
                   saturation_threshold=data.saturation_threshold, max_bad_fraction=data.max_bad_fraction,
                   tiles_per_shard=data.tiles_per_shard)


def prepare_tile(data: bytes, tile_size: int, min_source_size: int,
                 saturation_threshold: int | None) -> tuple[np.ndarray | None, str | None, str | None]:
    """Return (uint8 HWC RGB tile or None, skip reason or None, conversion or None) for file bytes."""
    tile, reason, conversion, _ = inspect_tile(data, tile_size, min_source_size, saturation_threshold)
    return tile, reason, conversion


def inspect_tile(data: bytes, tile_size: int, min_source_size: int, saturation_threshold: int | None
                 ) -> tuple[np.ndarray | None, str | None, str | None, str]:
    """Return (tile or None, skip reason or None, conversion or None, a detail for the skip report)."""
    if not data:
        return None, "empty", None, "0 bytes"
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises UnidentifiedImageError, or anything for garbage headers
        return None, "not_image", None, f"{type(exc).__name__}: {str(exc)[:200]}"
    try:
        img.load()
    except OSError as exc:
        return None, ("truncated" if "truncat" in str(exc).lower() else "corrupt"), None, str(exc)[:200]
    except Exception as exc:
        return None, "corrupt", None, f"{type(exc).__name__}: {str(exc)[:200]}"
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
        return None, "too_small", conversion, f"{img.size[0]}x{img.size[1]} px < data.min_source_size={min_source_size}"
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
            return None, "low_saturation", conversion, f"mean saturation {sat:.1f} < {saturation_threshold}"
    return tile, None, conversion, ""


def _process_chunk(items: list[tuple[str, str | None, str]], settings: IngestSettings,
                   store: Store) -> tuple[Any, dict[str, Any]]:
    """Return (Arrow table of good tiles, stats with every skipped and converted file named) for one chunk."""
    import pyarrow as pa

    rows: dict[str, list] = {name: [] for name in shards.TILE_SCHEMA.names}
    skipped: list[list[str]] = []
    converted: list[list[str]] = []
    for uri, label, dataset in items:
        try:
            data = store.read_bytes(uri)
        except StorageError as exc:
            skipped.append([uri, "unreadable", str(exc)[:200]])
            continue
        tile, reason, conversion, detail = inspect_tile(data, settings.tile_size, settings.min_source_size,
                                                        settings.saturation_threshold)
        if conversion:
            converted.append([uri, conversion])
        if tile is None:
            skipped.append([uri, reason, detail])
            continue
        rows["image"].append(shards.encode_png(tile))
        rows["label"].append(label)
        rows["dataset"].append(dataset)
        rows["source"].append(uri)
        rows["sha1"].append(shards.pixel_sha1(tile))
        rows["height"].append(int(tile.shape[0]))
        rows["width"].append(int(tile.shape[1]))
    table = pa.Table.from_pydict(rows, schema=shards.TILE_SCHEMA)
    return table, {"sha1": rows["sha1"], "source": rows["source"], "skipped_files": skipped,
                   "converted_files": converted}


def _write_chunk(table: Any, keep: list[bool], shard_uri: str | None, progress_uri: str,
                 progress: dict[str, Any], store: Store) -> None:
    """Write one shard (the kept rows) and then its progress record."""
    import pyarrow as pa

    if shard_uri is not None:
        shards.write_table(table.filter(pa.array(keep, type=pa.bool_())), shard_uri, store)
    store.write_json(progress_uri, progress)


def items_fingerprint(items: list[tuple[str, str | None, str]], settings: IngestSettings) -> str:
    """Return a hash of the listed files (uri, label, dataset) and the settings that shape the tiles."""
    params = [VERSION, settings.tile_size, settings.min_source_size, settings.saturation_threshold,
              settings.tiles_per_shard]
    h = hashlib.sha256(json.dumps(params).encode())
    for item in items:
        h.update(json.dumps(item).encode())
    return h.hexdigest()[:16]


def _clear_stale(out_uri: str, store: Store) -> None:
    """Remove an earlier run's outputs (manifest first, so the directory reads incomplete)."""
    store.delete(join(out_uri, shards.MANIFEST))
    store.delete(join(out_uri, PROGRESS_DIR))
    if store.exists(out_uri):
        for f in store.list_files(out_uri, [".parquet"]):
            if posixpath.basename(f).startswith("part-"):
                store.delete(f)


def _finished_chunks(out_uri: str, fingerprint: str, store: Store) -> dict[int, dict[str, Any]]:
    """Return {chunk index: progress record} of chunks an earlier run with this fingerprint finished."""
    # One listing each for records and shards: never a request per chunk.
    records = store.list_files(join(out_uri, PROGRESS_DIR), [".json"])
    parts = {posixpath.basename(u) for u in store.list_files(out_uri, [".parquet"])} if records else set()
    done = {}
    for uri in records:
        rec = store.read_json(uri)
        if rec.get("fingerprint") == fingerprint and (rec["shard"] is None or rec["shard"] in parts):
            done[int(posixpath.basename(uri)[len("chunk-"):-len(".json")])] = rec
    return done


def _report_add(report: dict[str, Any], stats: dict[str, Any], files: dict[str, list]) -> None:
    for key, column in (("skipped", 1), ("converted", 1)):
        for row in stats.get(f"{key}_files", []):
            report[key][row[column]] = report[key].get(row[column], 0) + 1
            files[key].append(row)


def _csv(rows: list[list[str]], header: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def _check_bad(name: str, report: dict[str, Any], total: int, max_bad_fraction: float) -> None:
    bad = sum(report["skipped"].get(r, 0) for r in BAD_REASONS)
    # Checked after every chunk: fail as soon as the bad count can no longer end under the limit.
    if bad > max_bad_fraction * total:
        by_reason = {r: report["skipped"][r] for r in BAD_REASONS if report["skipped"].get(r)}
        raise IngestError(f"{name}: {bad} of {total} files are unusable {by_reason}, more than "
                          f"data.max_bad_fraction={max_bad_fraction}; fix the source or raise the limit")


def ingest_set(name: str, items: list[tuple[str, str | None, str]], out_uri: str, store: Store,
               settings: IngestSettings) -> tuple[shards.Manifest, bool]:
    """Return (manifest, reused) after writing one shard directory (and its skip report) from the listed items."""
    import ray

    from histodiff.console import Progress

    fingerprint = items_fingerprint(items, settings)
    if store.exists(join(out_uri, shards.MANIFEST)):
        old = shards.read_manifest(out_uri, store)
        if old.fingerprint == fingerprint:
            log.info("%s: %s is complete for these inputs (%d tiles); skipping", name, out_uri, old.num_tiles)
            return old, True
        log.info("%s: inputs or settings changed since %s was written; rebuilding it", name, out_uri)
        _clear_stale(out_uri, store)
    per = settings.tiles_per_shard
    chunks = [items[i : i + per] for i in range(0, len(items), per)]
    # Reading and decoding is I/O and CPU on every node: spread the chunks over the cluster (Ray's default
    # packs them onto the driver's node first). Writes follow their table (locality).
    process = ray.remote(_process_chunk).options(num_returns=2, num_cpus=1, scheduling_strategy="SPREAD")
    write = ray.remote(_write_chunk).options(num_cpus=1)
    window = max(2, int(ray.available_resources().get("CPU", 1)) * 2)

    report: dict[str, Any] = {"seen": 0, "written": 0, "skipped": {}, "converted": {}}
    files: dict[str, list] = {"skipped": [], "converted": []}
    first_of: dict[str, str] = {}
    shard_names: list[str] = []
    futures: dict[int, tuple[Any, Any]] = {}
    done = _finished_chunks(out_uri, fingerprint, store)
    if done:
        log.info("%s: resuming; %d of %d chunks were finished by an earlier run", name, len(done), len(chunks))
    todo = [i for i in range(len(chunks)) if i not in done]
    next_submit = 0

    def submit_until(limit: int) -> None:
        nonlocal next_submit
        while next_submit < len(todo) and todo[next_submit] <= limit:
            i = todo[next_submit]
            futures[i] = process.remote(chunks[i], settings, store)
            next_submit += 1

    writes = []
    bar = Progress(f"ingest {name}", len(items), "files")
    for i, chunk in enumerate(chunks):
        if i in done:
            rec = done[i]
            stats = rec["stats"]
            for sha, src in zip(rec["kept_sha1"], rec.get("kept_source", [])):
                first_of.setdefault(sha, src)
        else:
            # Keep a bounded window of chunks in flight ahead of the in-order consumer.
            submit_until(i + window)
            table_ref, stats_ref = futures.pop(i)
            raw = ray.get(stats_ref)
            keep, dups = [], []
            for sha, src in zip(raw["sha1"], raw["source"]):
                keep.append(sha not in first_of)
                if keep[-1]:
                    first_of[sha] = src
                else:
                    dups.append([src, "duplicate", f"same pixels as {first_of[sha]}"])
            stats = {"skipped_files": raw["skipped_files"] + dups, "converted_files": raw["converted_files"]}
            kept_sha1 = [sha for sha, k in zip(raw["sha1"], keep) if k]
            kept_source = [src for src, k in zip(raw["source"], keep) if k]
            shard = shards.shard_name(i) if kept_sha1 else None
            rec = {"fingerprint": fingerprint, "shard": shard, "kept_sha1": kept_sha1, "kept_source": kept_source,
                   "stats": stats}
            writes.append(write.remote(table_ref, keep, join(out_uri, shard) if shard else None,
                                       join(out_uri, PROGRESS_DIR, f"chunk-{i:05d}.json"), rec, store))
        if rec["shard"]:
            shard_names.append(rec["shard"])
        report["seen"] += len(chunk)
        report["written"] += len(rec["kept_sha1"])
        _report_add(report, stats, files)
        _check_bad(name, report, len(items), settings.max_bad_fraction)
        bar.update(report["seen"])
    ray.get(writes)
    if report["written"] == 0:
        raise IngestError(f"{name}: none of the {len(items)} files gave a usable tile (report: {report}); "
                          "check the sources, data.min_source_size and data.saturation_threshold")
    store.write_bytes(join(out_uri, SKIPPED_CSV), _csv(files["skipped"], ["uri", "reason", "detail"]))
    store.write_bytes(join(out_uri, CONVERTED_CSV), _csv(files["converted"], ["uri", "conversion"]))
    labels = {it[1] for it in items if it[1] is not None}
    manifest = shards.Manifest(uri=out_uri, shards=shard_names, num_tiles=report["written"],
                               classes=sorted(labels), tile_size=settings.tile_size, report=report,
                               fingerprint=fingerprint, extra={"set": name, "ingest_version": VERSION,
                                                               "skipped_csv": SKIPPED_CSV,
                                                               "converted_csv": CONVERTED_CSV})
    shards.write_manifest(manifest, store)
    return manifest, False
