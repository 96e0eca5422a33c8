"""Ingest: tile conversion rules, bad files skipped and counted, resume, and every bad-input error."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histodiff import storage
from histodiff.config import load_config
from histodiff.data import ingest, shards
from histodiff.data.builtin import tissue_image
from histodiff.runner import run_stage
from histodiff.stages import ingest as stage
from histodiff.storage import Store

from conftest import free_port

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _cfg(tmp_path, *overrides: str):
    return load_config("tiny", [f"paths.root={tmp_path}/out", "paths.unlabeled_sources=[]",
                                "paths.labeled_source=null", "paths.labeled_test_source=null",
                                "tracking.enabled=false", *overrides])


@pytest.fixture
def no_ray(monkeypatch):
    """Make any attempt to start Ray fail, to prove errors come before Ray work."""
    def refuse(cfg, **kwargs):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr("histodiff.runtime.init_ray", refuse)


def ingest_run(cfg):
    """Run the ingest stage as the CLI does."""
    return run_stage(stage, cfg)


# ---------------------------------------------------------------- tile rules (no Ray)

def test_prepare_tile_resizes_smallest_side_then_center_crops():
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 200  # the central 40x40 square is bright, the margins dark
    tile, reason, conv = ingest.prepare_tile(_png(img), 20, 32, None)
    assert reason is None and conv is None and tile.shape == (20, 20, 3)
    # the crop holds the centre only (bicubic resampling blurs the outermost column a little)
    assert tile.min() > 150 and abs(float(tile[:, 2:-2].mean()) - 200) < 2


def test_prepare_tile_converts_and_skips_by_reason():
    rgb = tissue_image()[:48, :48]
    gray, reason, conv = ingest.prepare_tile(_png(rgb.mean(-1).astype(np.uint8)), 32, 32, None)
    assert conv == "grayscale" and gray.shape == (32, 32, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:8, :8, 3] = 0  # a transparent corner composites to white
    tile, _, conv = ingest.prepare_tile(_png(rgba, "RGBA"), 48, 32, None)
    assert conv == "rgba" and (tile[:8, :8] == 255).all() and np.array_equal(tile[20:, 20:], rgb[20:, 20:])
    good = _png(rgb)
    assert ingest.prepare_tile(b"", 32, 32, None)[1] == "empty"
    assert ingest.prepare_tile(b"not an image at all", 32, 32, None)[1] == "not_image"
    assert ingest.prepare_tile(good[: len(good) // 2], 32, 32, None)[1] == "truncated"
    assert ingest.prepare_tile(_png(rgb[:20, :20]), 32, 32, None)[1] == "too_small"
    white = np.full((48, 48, 3), 245, np.uint8)
    assert ingest.prepare_tile(_png(white), 32, 32, 80)[1] == "low_saturation"
    assert ingest.prepare_tile(good, 32, 32, 80)[1] is None  # stained tissue passes the paper's rule


# ---------------------------------------------------------------- end to end on real Ray

def _broken_copies(good_path: str, truncated_path: str, corrupt_path: str) -> None:
    """Write a truncated copy and a corrupt copy (zeroed bytes inside the compressed pixels) of a good PNG."""
    good = open(good_path, "rb").read()
    with open(truncated_path, "wb") as f:
        f.write(good[: len(good) // 2])
    with open(corrupt_path, "wb") as f:
        f.write(good[: len(good) // 2] + bytes(16) + good[len(good) // 2 + 16 :])


def _messy_source(root: str) -> dict[str, int]:
    """Write good, duplicate and broken files; return the counts ingest must report."""
    image = tissue_image()
    os.makedirs(root)
    for i in range(10):
        Image.fromarray(image[i * 40 : i * 40 + 48, 300:348]).save(f"{root}/a{i:02d}.png")
    Image.fromarray(image[:48, 300:348]).save(f"{root}/z_dup_of_a00.tif")  # lands in a later chunk
    Image.fromarray(image[100:148, 100:148].mean(-1).astype(np.uint8)).save(f"{root}/b_gray.png")
    Image.fromarray(np.dstack([image[200:248, 0:48], np.full((48, 48), 255, np.uint8)])).save(f"{root}/b_rgba.png")
    Image.fromarray(image[:16, :16]).save(f"{root}/c_small.png")
    open(f"{root}/c_empty.png", "wb").close()
    with open(f"{root}/c_text.jpg", "w") as f:
        f.write("this is not a JPEG")
    _broken_copies(f"{root}/a01.png", f"{root}/c_trunc.png", f"{root}/c_corrupt.png")
    with open(f"{root}/notes.txt", "w") as f:
        f.write("ignored: not an image extension")
    return {"seen": 18, "written": 12}


@pytest.mark.slow
def test_ingest_skips_counts_dedups_and_resumes(tmp_path, ray_local):
    expected = _messy_source(str(tmp_path / "pool"))
    cfg = _cfg(tmp_path, f"paths.unlabeled_sources=[{tmp_path}/pool]", "data.tiles_per_shard=5",
               "data.max_bad_fraction=0.3")
    result = ingest_run(cfg)
    report = result.reports["unlabeled"]
    assert report["seen"] == expected["seen"] and report["written"] == expected["written"]
    assert report["skipped"] == {"empty": 1, "not_image": 1, "truncated": 1, "corrupt": 1, "too_small": 1,
                                 "duplicate": 1}
    assert report["converted"] == {"grayscale": 1, "rgba": 1}
    out = cfg.paths.unlabeled_shards
    manifest = shards.read_manifest(out, Store())
    # chunks of 5 sorted files; the last chunk (c_text, c_trunc, z_dup) keeps nothing, so it has no shard
    assert manifest.shards == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert manifest.num_tiles == 12 and manifest.classes == []
    tiles, labels = shards.load_tiles(out, Store())
    assert tiles.shape == (12, 32, 32, 3) and labels == [None] * 12
    table = shards.read_table(out, Store())
    assert len(set(table.column("sha1").to_pylist())) == 12
    assert not any("z_dup" in s for s in table.column("source").to_pylist())  # the first copy wins

    # every skipped file is named with its reason (and every converted one), beside the manifest
    import csv

    with open(os.path.join(out, ingest.SKIPPED_CSV)) as f:
        skipped = {(os.path.basename(r["uri"]), r["reason"]) for r in csv.DictReader(f)}
    assert {reason for _, reason in skipped} == set(report["skipped"]) and len(skipped) == 6
    assert ("z_dup_of_a00.tif", "duplicate") in skipped and any(reason == "truncated" for _, reason in skipped)
    with open(os.path.join(out, ingest.CONVERTED_CSV)) as f:
        assert sorted(r["conversion"] for r in csv.DictReader(f)) == ["grayscale", "rgba"]

    # same inputs and settings: the stage is skipped, nothing is redone
    stamp = os.stat(os.path.join(out, shards.MANIFEST)).st_mtime_ns
    assert ingest_run(cfg).skipped
    assert os.stat(os.path.join(out, shards.MANIFEST)).st_mtime_ns == stamp

    # a crash after some chunks: only the unfinished chunk is redone
    os.remove(os.path.join(out, "_stage.json"))
    os.remove(os.path.join(out, shards.MANIFEST))
    os.remove(os.path.join(out, ingest.PROGRESS_DIR, "chunk-00002.json"))
    kept = os.stat(os.path.join(out, "part-00001.parquet")).st_mtime_ns
    again = ingest_run(cfg)
    assert again.reused == {"unlabeled": False} and again.reports["unlabeled"] == report
    assert os.stat(os.path.join(out, "part-00001.parquet")).st_mtime_ns == kept

    # changed settings: rebuilt at the new size
    bigger = ingest_run(_cfg(tmp_path, f"paths.unlabeled_sources=[{tmp_path}/pool]", "data.tiles_per_shard=5",
                             "data.max_bad_fraction=0.3", "data.tile_size=16"))
    assert bigger.reused == {"unlabeled": False} and shards.load_tiles(out, Store())[0].shape == (12, 16, 16, 3)

    # past the allowed fraction of bad files: one clear error, no manifest
    os.remove(os.path.join(out, shards.MANIFEST))
    os.remove(os.path.join(out, "_stage.json"))
    with pytest.raises(ingest.IngestError, match=r"5 of 18 files are unusable .*data.max_bad_fraction=0.1"):
        ingest_run(_cfg(tmp_path, f"paths.unlabeled_sources=[{tmp_path}/pool]", "data.max_bad_fraction=0.1"))
    assert not os.path.exists(os.path.join(out, shards.MANIFEST))


@pytest.mark.slow
def test_ingest_labeled_from_s3_with_tracking(tmp_path, ray_local, s3_bucket, builtin_data):
    for split in ("train", "test"):
        src = builtin_data[f"labeled_{split}"]
        for cls in sorted(os.listdir(src)):
            for name in sorted(os.listdir(os.path.join(src, cls)))[:6]:
                with open(os.path.join(src, cls, name), "rb") as f:
                    Store().write_bytes(f"{s3_bucket}/nct/{split}/{cls}/{name}", f.read())
    cfg = _cfg(tmp_path, f"paths.root={s3_bucket}/out", f"paths.labeled_source={s3_bucket}/nct/train",
               f"paths.labeled_test_source={s3_bucket}/nct/test", "tracking.enabled=true",
               f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "tracking.experiment=ingest-test")
    result = ingest_run(cfg)
    assert result.num_tiles == {"labeled": 18, "labeled_test": 18}
    assert result.classes["labeled"] == ["BACK", "STR", "TUM"]
    manifest = shards.read_manifest(f"{s3_bucket}/out/shards/labeled", Store())
    assert manifest.shard_uris() == [f"{s3_bucket}/out/shards/labeled/part-00000.parquet"]
    _, labels = shards.load_tiles(f"{s3_bucket}/out/shards/labeled_test", Store())
    assert sorted(labels) == ["BACK"] * 6 + ["STR"] * 6 + ["TUM"] * 6

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("ingest-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["labeled_tiles_written"] == 18 and run.data.metrics["labeled_test_files_seen"] == 18
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(run.data.params)


# ---------------------------------------------------------------- bad inputs: clear errors before Ray

def test_missing_local_path(tmp_path, no_ray):
    with pytest.raises(storage.StorageError, match=f"'{tmp_path}/nope' does not exist"):
        ingest_run(_cfg(tmp_path, f"paths.unlabeled_sources=[{tmp_path}/nope]"))


def test_nothing_to_ingest_and_typos(tmp_path, no_ray):
    with pytest.raises(ingest.IngestError, match="nothing to ingest"):
        ingest_run(_cfg(tmp_path))
    # The job file, run as Ray would run it: a typo is one clear error, exit code 2, before Ray starts.
    done = subprocess.run([sys.executable, str(JOBS / "ingest.py"), "--config", "tiny", "data.tile_sise=32"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.search(r"data\.tile_sise: unknown key", done.stderr), done.stderr[-2000:]
    assert "starting an embedded local Ray" not in done.stderr


def test_empty_folder_and_class_folder_without_images(tmp_path, no_ray):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ingest.IngestError, match="holds no image files"):
        ingest_run(_cfg(tmp_path, f"paths.unlabeled_sources=[{tmp_path}/empty]"))
    tile = tissue_image()[:48, :48]
    os.makedirs(tmp_path / "nct" / "TUM")
    os.makedirs(tmp_path / "nct" / "STR")
    Image.fromarray(tile).save(tmp_path / "nct" / "TUM" / "a.tif")
    with pytest.raises(ingest.IngestError, match=r"class folder\(s\) \['STR'\] .* hold no image files"):
        ingest_run(_cfg(tmp_path, f"paths.labeled_source={tmp_path}/nct"))
    with pytest.raises(ingest.IngestError, match="one folder per class"):
        ingest_run(_cfg(tmp_path, f"paths.labeled_source={tmp_path}/nct/TUM"))


@pytest.mark.slow
def test_s3_missing_bucket_empty_prefix_and_empty_class(tmp_path, s3_bucket, no_ray):
    with pytest.raises(storage.StorageError, match="bucket 'hd-no-such-bucket' .* does not exist"):
        ingest_run(_cfg(tmp_path, "paths.unlabeled_sources=[s3://hd-no-such-bucket/tiles]"))
    Store().write_bytes(f"{s3_bucket}/docs/readme.txt", b"no tiles here")
    with pytest.raises(ingest.IngestError, match=f"unlabeled source '{s3_bucket}/docs' holds no image files"):
        ingest_run(_cfg(tmp_path, f"paths.unlabeled_sources=[{s3_bucket}/docs]"))
    with pytest.raises(storage.StorageError, match="does not exist"):
        ingest_run(_cfg(tmp_path, f"paths.unlabeled_sources=[{s3_bucket}/never/written]"))
    Store().write_bytes(f"{s3_bucket}/nct/TUM/a.png", _png(tissue_image()[:48, :48]))
    Store().write_bytes(f"{s3_bucket}/nct/MUC/notes.txt", b"labels pending")
    with pytest.raises(ingest.IngestError, match=r"class folder\(s\) \['MUC'\]"):
        ingest_run(_cfg(tmp_path, f"paths.labeled_source={s3_bucket}/nct"))


@pytest.mark.slow
def test_s3_wrong_credentials_and_unreachable_endpoint(tmp_path, s3_bucket, monkeypatch, no_ray):
    from moto import settings

    Store().write_bytes(f"{s3_bucket}/pool/a.png", _png(tissue_image()[:48, :48]))
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match="unreachable; check storage.endpoint_url") as info:
        ingest_run(_cfg(tmp_path, f"paths.unlabeled_sources=[{s3_bucket}/pool]",
                        f"storage.endpoint_url=http://127.0.0.1:{free_port()}", "storage.connect_timeout_s=1"))
    assert time.monotonic() - start < 10 and secret not in str(info.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY0000")
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks keys only in IAM mode
    with pytest.raises(storage.StorageError, match="Check the S3 credentials") as info:
        ingest_run(_cfg(tmp_path, f"paths.unlabeled_sources=[{s3_bucket}/pool]"))
    assert secret not in str(info.value)


@pytest.mark.slow
def test_every_bad_file_kind_is_named_with_its_reason(tmp_path, ray_local):
    image, root = tissue_image(), str(tmp_path / "kinds")
    os.makedirs(root)
    Image.fromarray(image[:48, 300:348]).save(f"{root}/good_a.png")
    Image.fromarray(image[40:88, 300:348]).save(f"{root}/good_b.png")
    Image.fromarray(image[:48, 300:348]).save(f"{root}/kind_duplicate.tif")
    open(f"{root}/kind_empty.png", "wb").close()
    with open(f"{root}/kind_not_image.jpg", "w") as f:
        f.write("this is not a JPEG")
    _broken_copies(f"{root}/good_a.png", f"{root}/kind_truncated.png", f"{root}/kind_corrupt.png")
    Image.fromarray(image[:16, :16]).save(f"{root}/kind_too_small.png")
    Image.fromarray(np.full((48, 48, 3), 245, np.uint8)).save(f"{root}/kind_low_saturation.png")
    cfg = _cfg(tmp_path, f"paths.unlabeled_sources=[{root}]", "data.max_bad_fraction=1.0",
               "data.saturation_threshold=20")
    ingest_run(cfg)
    import csv

    with open(os.path.join(cfg.paths.unlabeled_shards, ingest.SKIPPED_CSV)) as f:
        rows = {os.path.basename(r["uri"]): (r["reason"], r["detail"]) for r in csv.DictReader(f)}
    kinds = ["duplicate", "empty", "not_image", "truncated", "corrupt", "too_small", "low_saturation"]
    assert {name: reason for name, (reason, _) in rows.items()} == {
        next(n for n in os.listdir(root) if n.startswith(f"kind_{k}.")): k for k in kinds}
    assert all(detail for reason, detail in rows.values() if reason != "duplicate")
    # A file listed but gone (or denied) when read is named "unreadable", by the same chunk code.
    settings = ingest.IngestSettings.from_config(cfg)
    _, stats = ingest._process_chunk([(f"{root}/vanished.png", None, "unlabeled")], settings, Store())
    skipped = [(os.path.basename(u), reason) for u, reason, _ in stats["skipped_files"]]
    assert skipped == [("vanished.png", "unreadable")]
