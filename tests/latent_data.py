"""Test helper: cached latents in the exact encode-stage format (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histodiff import storage


def write_latents(uri: str, n: int, shape=(3, 8, 8), scale_factor: float = 0.5, parts: int = 2, seed: int = 0,
                  storage_cfg=None) -> dict:
    """Write ``n`` smooth random fp16 latents as Parquet parts + ``_latents.json`` (last); return the meta."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    # Low-frequency structure (as real latents have) so a denoiser has something to learn.
    base = rng.normal(size=(n, c, 2, 2)).repeat(h // 2, axis=2).repeat(w // 2, axis=3)
    z = (base / scale_factor + 0.1 * rng.normal(size=(n, c, h, w))).astype(np.float16)
    names = []
    for i, idx in enumerate(np.array_split(np.arange(n), parts)):
        rows = [z[j].tobytes() for j in idx]
        table = pa.table({"latent": pa.array(rows, pa.binary()), "label": pa.array([None] * len(idx), pa.string()),
                          "sha1": pa.array([hashlib.sha1(r).hexdigest() for r in rows], pa.string())})
        name = f"part-{i:05d}.parquet"
        loc = storage.resolve(storage.join(uri, name), storage_cfg)
        loc.fs.create_dir(loc.path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, loc.path, filesystem=loc.fs)
        names.append(name)
    meta = {"shape": list(shape), "scale_factor": scale_factor, "autoencoder_sha256": "test-ae", "num_latents": n,
            "shards": names}
    storage.write_json(storage.join(uri, "_latents.json"), meta, storage_cfg)
    return meta
