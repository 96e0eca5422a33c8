"""Ray Data readers: stream tile shards into training as float32 CHW tensors in [-1, 1].

Only the shards a manifest lists are read (an explicit file list, never a prefix listing).
:func:`parquet_dataset` chooses the path: large sets stream through ``read_parquet`` with
``shuffle=FileShuffleConfig(seed)`` (a new file order per epoch); small ones are read directly
and kept in the object store.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

from pydantic import BaseModel, ConfigDict

from histodiff.config import HistodiffConfig
from histodiff.data import shards
from histodiff.storage import Store


class ReadSpec(BaseModel):
    """How a training stage reads its set: file order seed, the in-memory limit, steps per pass."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int
    materialize_max_mb: float
    steps_per_pass: int


def read_spec(cfg: HistodiffConfig) -> ReadSpec:
    """Return the read settings named by the config (``seed``, ``data.*``)."""
    return ReadSpec(seed=cfg.seed, materialize_max_mb=cfg.data.materialize_max_mb,
                    steps_per_pass=cfg.data.steps_per_pass)


def decode_batch(batch: dict[str, np.ndarray], classes: list[str], augment: bool,
                 seed: int | None = None) -> dict[str, np.ndarray]:
    """Return ``{"image": float32 NCHW in [-1, 1], "label_id": int64}`` from a batch of shard rows.

    ``label_id`` is the index in ``classes`` (-1 for unlabeled rows). With ``augment``, each
    tile gets one of the 8 dihedral transforms (flips and rot90): tissue has no canonical
    orientation, so they never change the label.
    """
    tiles = []
    for data in batch["image"]:
        with Image.open(io.BytesIO(data)) as img:
            tiles.append(np.asarray(img.convert("RGB")))
    x = np.stack(tiles) if tiles else np.zeros((0, 1, 1, 3), dtype=np.uint8)
    image = (np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float32) / 127.5) - 1.0
    index = {c: i for i, c in enumerate(classes)}
    labels = batch.get("label")
    if labels is None:
        label_id = np.full(len(x), -1, dtype=np.int64)
    else:
        label_id = np.array([index.get(lab, -1) if lab is not None else -1 for lab in labels], dtype=np.int64)
    out = {"image": image, "label_id": label_id}
    # Ray Data's streaming order is not reproducible, so augmentation draws take no fixed seed;
    # fresh draws per batch give every epoch new orientations.
    return augment_batch(out, seed) if augment and len(x) else out


def augment_batch(batch: dict[str, np.ndarray], seed: int | None = None) -> dict[str, np.ndarray]:
    """Return the batch with one random dihedral transform (flip, rot90) per NCHW image."""
    x = batch["image"]
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 4, size=len(x))
    flip = rng.random(len(x)) < 0.5
    out = [np.rot90(t[..., ::-1] if f else t, int(r), axes=(-2, -1)) for t, f, r in zip(x, flip, k)]
    return {**batch, "image": np.ascontiguousarray(np.stack(out)) if out else x}


def read_parquet_dataset(uris: list[str], store: Store, columns: list[str], seed: int, **read_args: Any) -> Any:
    """Return a streaming ``ray.data`` read of Parquet files, in a new file order per epoch.

    ``read_args`` go to ``ray.data.read_parquet`` (e.g. ``runtime_env`` for the read tasks).
    """
    import ray.data
    from ray.data import FileShuffleConfig

    locs = [store.for_ray(u) for u in uris]  # the filesystem travels to the read tasks: no keys in it
    return ray.data.read_parquet([loc.path for loc in locs], filesystem=locs[0].fs, columns=columns,
                                 shuffle=FileShuffleConfig(seed=seed), **read_args)


def rows_per_pass(read: ReadSpec, batch_size: int, num_workers: int, grad_accum: int = 1) -> int:
    """Return the rows one Ray Data pass should hold: ``steps_per_pass`` global optimizer steps."""
    return read.steps_per_pass * batch_size * grad_accum * num_workers


def copies_per_pass(num_rows: int, decoded_mb: float, rows_per_pass: int, materialize_max_mb: float) -> int:
    """Return how many copies of a small set make one Ray Data pass of ``rows_per_pass`` rows.

    A pass (an epoch of ``iter_torch_batches``) costs about a second of start-up; a few hundred
    tiles would pay it every few steps. Copies are bounded by ``materialize_max_mb``.
    """
    if num_rows <= 0 or num_rows >= rows_per_pass:
        return 1
    by_memory = int(materialize_max_mb // max(decoded_mb, 1e-9))
    return max(1, min(math.ceil(rows_per_pass / num_rows), by_memory))


def small_parquet_dataset(uris: list[str], store: Store, columns: list[str], seed: int, copies: int = 1) -> Any:
    """Return a ``ray.data`` dataset of small Parquet files read here (``copies`` times over).

    ``read_parquet`` pays seconds of file listing and task start-up per execution, which
    dominates a set of a few hundred tiles; reading them directly costs milliseconds. Files
    come in a seeded random order; each extra copy is the whole set in a new seeded row order.
    """
    import pyarrow as pa
    import ray.data

    rng = np.random.default_rng(seed)
    tables = [store.read_parquet(uris[i], columns) for i in rng.permutation(len(uris))]
    if copies <= 1:
        return ray.data.from_arrow(tables)
    table = pa.concat_tables(tables)
    return ray.data.from_arrow([table.take(rng.permutation(table.num_rows)) for _ in range(copies)])


def parquet_dataset(uris: list[str], store: Store, columns: list[str], num_rows: int, size_mb: float,
                    read: ReadSpec, rows_per_pass: int = 0, **read_args: Any) -> tuple[Any, bool]:
    """Return (dataset, small): the one choice between the two read paths, by ``materialize_max_mb``.

    Small sets (``size_mb`` at most the limit) are read directly, repeated up to ``rows_per_pass``
    rows (:func:`copies_per_pass`); the caller materializes them after its decoding step. Larger
    sets stream through ``read_parquet`` (``read_args`` go to it).
    """
    if size_mb > read.materialize_max_mb:
        return read_parquet_dataset(uris, store, columns, read.seed, **read_args), False
    copies = copies_per_pass(num_rows, size_mb, rows_per_pass, read.materialize_max_mb)
    return small_parquet_dataset(uris, store, columns, read.seed, copies), True


def tile_dataset(uri: str, store: Store, read: ReadSpec, augment: bool, batch_size: int = 64,
                 rows_per_pass: int = 0) -> Any:
    """Return a ``ray.data.Dataset`` of the tiles at a shard directory (columns ``image``, ``label_id``).

    Small sets are read once (repeated up to ``rows_per_pass`` rows, see :func:`copies_per_pass`).
    """
    manifest = shards.read_manifest(uri, store)
    if not manifest.shards:
        raise ValueError(f"tile shards at {uri!r} list no shard files; rerun `histodiff run ingest`")
    decoded_mb = manifest.num_tiles * 3 * manifest.tile_size**2 * 4 / 2**20
    ds, small = parquet_dataset(manifest.shard_uris(), store, ["image", "label"], manifest.num_tiles, decoded_mb,
                                read, rows_per_pass)
    if not small:
        return ds.map_batches(decode_batch, batch_format="numpy", batch_size=batch_size,
                              fn_kwargs={"classes": manifest.classes, "augment": augment})
    # Small sets: read and decode once, then only augment per pass. Re-reading shards every
    # epoch costs seconds of Ray Data start-up per pass, which dominates tiny epochs.
    ds = ds.map_batches(decode_batch, batch_format="numpy", batch_size=batch_size,
                        fn_kwargs={"classes": manifest.classes, "augment": False}).materialize()
    return ds.map_batches(augment_batch, batch_format="numpy", batch_size=batch_size) if augment else ds
