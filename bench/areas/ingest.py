"""Ingest throughput from an S3 endpoint: Parquet shards vs loose files vs a naive loop.

One run starts moto's threaded S3 server on 127.0.0.1, uploads the same tiles as loose
PNG files and as Parquet shards, and measures decoded tiles per second for (a) the shards
through Ray Data (``histodiff.data.readers.tile_dataset``), (b) the loose files through Ray
Data (``read_binary_files`` over the explicit list, same decode), and (c) a single-process
Python loop with s3fs + PIL. Each Ray path gets a warm-up pass first (worker start-up is
not throughput). Decoding is identical in all three: PNG -> float32 CHW in [-1, 1].
"""

from __future__ import annotations

import io
import logging
import os
import platform
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

N_TILES = 2000
TILE = 64
PER_SHARD = 500
BATCH = 256  # decode batch size, the same for both Ray paths
BUCKET = "hd-bench-ingest"
ENV = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_REGION": "us-east-1",
       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _tiles(n: int, seed: int = 0) -> list[np.ndarray]:
    from histodiff.data.builtin import tissue_image

    image = tissue_image()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, image.shape[0] - TILE, size=2)
        t = image[y : y + TILE, x : x + TILE]
        out.append(np.ascontiguousarray(np.rot90(t, int(rng.integers(4)))))
    return out


def _decode_loose(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from histodiff.data.readers import decode_batch

    return decode_batch({"image": batch["bytes"]}, [], augment=False)


def _count(ds: Any) -> int:
    return sum(len(b["label_id"]) for b in ds.iter_batches(batch_size=256, batch_format="numpy"))


def _machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{datetime.now(timezone.utc):%Y-%m-%d} {platform.machine()} {os.cpu_count()} CPUs "
            f"(load avg {load:.1f}), moto S3 on 127.0.0.1, {TILE}px PNG tiles")


def run(workdir: str, n_tiles: int = N_TILES) -> dict[str, dict]:
    """Return the three ingest throughputs (tiles/s) and the shards-vs-loose and shards-vs-naive ratios."""
    import ray
    import s3fs
    from moto.server import ThreadedMotoServer

    from histodiff.config import load_config
    from histodiff.data import shards
    from histodiff.data.readers import read_spec, tile_dataset
    from histodiff.storage import Store, join

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old_env = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update({**ENV, "AWS_ENDPOINT_URL_S3": endpoint})
    started_ray = not ray.is_initialized()
    try:
        if started_ray:
            ray.init(include_dashboard=False, runtime_env={"env_vars": {**ENV, "AWS_ENDPOINT_URL_S3": endpoint}})
        cfg = load_config("tiny", [f"paths.root={workdir}", "tracking.enabled=false",
                                   f"storage.endpoint_url={endpoint}"])
        store = Store(cfg.storage)
        read = read_spec(cfg)
        store.makedirs(f"s3://{BUCKET}")
        tiles = _tiles(n_tiles)
        encoded = [shards.encode_png(t) for t in tiles]
        loose = [f"s3://{BUCKET}/loose/t{i:06d}.png" for i in range(n_tiles)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda a: store.write_bytes(a[0], a[1]), zip(loose, encoded)))
        shard_uri = f"s3://{BUCKET}/shards"
        names = []
        for s in range(0, n_tiles, PER_SHARD):
            idx = range(s, min(n_tiles, s + PER_SHARD))
            table = shards.tiles_table([tiles[i] for i in idx], [None] * len(idx), "bench", [loose[i] for i in idx])
            names.append(shards.shard_name(len(names)))
            shards.write_table(table, join(shard_uri, names[-1]), store)
        shards.write_manifest(shards.Manifest(uri=shard_uri, shards=names, num_tiles=n_tiles, classes=[],
                                              tile_size=TILE), store)
        fs = store.resolve(shard_uri).fs
        paths = [u[5:] for u in loose]

        def loose_ds(subset: list[str]) -> Any:
            return ray.data.read_binary_files(subset, filesystem=fs).map_batches(
                _decode_loose, batch_format="numpy", batch_size=BATCH)

        _count(loose_ds(paths[:64]))  # warm-up: worker start-up is not throughput
        _count(tile_dataset(shard_uri, store, read, augment=False, batch_size=BATCH))
        timings = {}
        start = time.perf_counter()
        assert _count(tile_dataset(shard_uri, store, read, augment=False, batch_size=BATCH)) == n_tiles
        timings["shards"] = time.perf_counter() - start
        start = time.perf_counter()
        assert _count(loose_ds(paths)) == n_tiles
        timings["loose"] = time.perf_counter() - start
        naive_fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=ENV["AWS_ACCESS_KEY_ID"],
                                     secret=ENV["AWS_SECRET_ACCESS_KEY"])
        start = time.perf_counter()
        for path in naive_fs.ls(f"{BUCKET}/loose"):  # the naive loop lists the prefix, then reads each file
            with naive_fs.open(path, "rb") as f, Image.open(io.BytesIO(f.read())) as img:
                _ = np.asarray(img.convert("RGB"), np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        timings["naive"] = time.perf_counter() - start
    finally:
        if started_ray:
            ray.shutdown()
        server.stop()
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    rate = {k: n_tiles / v for k, v in timings.items()}
    log.info("ingest benchmark: %s tiles/s", {k: round(v, 1) for k, v in rate.items()})
    measured = _machine()

    def figure(value: float, unit: str, goal: str) -> dict[str, Any]:
        return {"value": round(value, 2), "unit": unit, "goal": goal, "measured": measured}

    return {
        "ingest_tiles_per_s_shards": figure(rate["shards"], "tiles/s", "higher; Parquet shards through Ray Data"),
        "ingest_tiles_per_s_loose": figure(rate["loose"], "tiles/s", "reference: loose files through Ray Data"),
        "ingest_tiles_per_s_naive": figure(rate["naive"], "tiles/s", "reference: s3fs + PIL loop, one process"),
        "ingest_shards_vs_loose_ratio": figure(rate["shards"] / rate["loose"], "x", ">= 3"),
        "ingest_shards_vs_naive_ratio": figure(rate["shards"] / rate["naive"], "x", ">= 3"),
    }
