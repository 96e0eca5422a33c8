"""Cached latents: tile shards -> latents (Parquet, fp16), so training never re-encodes tiles.

The ``encode`` stage (:mod:`histodiff.stages.encode`) calls :func:`encode_set` per set. A Ray Data actor pool (one autoencoder per actor, one GPU each when ``ray.use_gpu``) maps
shard rows to the autoencoder's **posterior mean** (deterministic: the same tile always
gives the same latent; the denoiser adds its own noise). Output follows the Latents
contract in docs/ARCHITECTURE.md: parts with ``latent`` (fp16 bytes, C*H*W), ``label``,
``sha1``, then ``_latents.json`` last. Latents are stored unscaled; ``scale_factor`` is
1/std of the first batch (the first ``encode_batch_size`` tiles of the unlabeled set in
manifest order), as the paper does, and the labeled latents carry the same factor.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from histodiff.data import shards
from histodiff.data.readers import ReadSpec, parquet_dataset
from histodiff.runtime import autocast, device_for
from histodiff.storage import Store, join

if TYPE_CHECKING:  # torch loads lazily: the streaming path (latent_dataset) does not need it
    import torch

log = logging.getLogger(__name__)

LATENTS_META = "_latents.json"
LATENT_SCHEMA = pa.schema([("latent", pa.binary()), ("label", pa.string()), ("sha1", pa.string())])


class LatentsRef(BaseModel):
    """A complete latents directory and what identifies its content (from its ``_latents.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    shape: list[int]
    scale_factor: float
    autoencoder_sha256: str | None
    num_latents: int


def latents_ref(uri: str, store: Store) -> LatentsRef:
    """Return the reference of a complete latents directory, or raise naming the stage to run."""
    meta = read_latents_meta(uri, store)
    return LatentsRef(uri=uri, shape=meta["shape"], scale_factor=meta["scale_factor"],
                      autoencoder_sha256=meta.get("autoencoder_sha256"), num_latents=meta["num_latents"])


class TileEncoder:
    """Ray Data UDF: loads the exported autoencoder once per actor; maps PNG rows to latents."""

    def __init__(self, autoencoder_uri: str, store: Store, use_gpu: bool) -> None:
        from diffusers import AutoencoderKL

        from histodiff.checkpoint import load_exported

        self.device = device_for(use_gpu)
        vae, _ = load_exported(AutoencoderKL, autoencoder_uri, store)
        self.vae = vae.to(self.device).eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Return a LATENT_SCHEMA table for a batch of tile rows."""
        import torch

        tiles = np.stack([shards.decode_png(b) for b in batch.column("image").to_pylist()])
        x = shards.to_model_range(tiles).to(self.device, non_blocking=True)
        with torch.no_grad(), autocast(self.device):
            z = self.vae.encode(x).latent_dist.mean
        z16 = z.float().cpu().numpy().astype(np.float16)
        return pa.table({"latent": pa.array([row.tobytes() for row in z16], pa.binary()),
                         "label": batch.column("label").cast(pa.string()),
                         "sha1": batch.column("sha1")}, schema=LATENT_SCHEMA)


def read_latents_meta(uri: str, store: Store) -> dict:
    """Return ``_latents.json`` of a complete latents directory, or raise a clear error."""
    meta_uri = join(uri, LATENTS_META)
    if not store.exists(meta_uri):
        raise FileNotFoundError(f"{uri!r} holds no complete latents (no {LATENTS_META}); run `histodiff run encode`")
    return store.read_json(meta_uri)


def decode_latents(column: list[bytes] | pa.Array, shape: list[int]) -> np.ndarray:
    """Return float32 NCHW latents from fp16 byte strings."""
    rows = column.to_pylist() if isinstance(column, (pa.Array, pa.ChunkedArray)) else list(column)
    if not rows:
        return np.zeros((0, *shape), np.float32)
    return np.frombuffer(b"".join(rows), dtype=np.float16).reshape(len(rows), *shape).astype(np.float32)


def _part_uris(uri: str, meta: dict) -> list[str]:
    return [join(uri, name) for name in meta["shards"]]


def measure_scale_factor(src_uri: str, out_uri: str, parts: list[str], batch_size: int, store: Store) -> float:
    """Return 1/std of the latents of the first ``batch_size`` tiles of ``src_uri`` (paper: first batch)."""
    first = shards.read_manifest(src_uri, store).shard_uris()[0]
    wanted = store.read_parquet(first, ["sha1"]).column("sha1").slice(0, batch_size).combine_chunks()
    found: list[np.ndarray] = []
    rows = 0
    for name in parts:  # the written order is not the input order: look the first batch up by sha1
        table = store.read_parquet(join(out_uri, name), ["latent", "sha1"])
        hit = table.filter(pc.is_in(table.column("sha1"), value_set=wanted))
        if hit.num_rows:
            found.append(np.frombuffer(b"".join(hit.column("latent").to_pylist()), np.float16))
            rows += hit.num_rows
        if rows >= len(wanted):
            break
    if not found:
        raise ValueError(f"none of the first {batch_size} tiles of {src_uri!r} is among the latents at {out_uri!r}")
    values = np.concatenate(found).astype(np.float64)
    std = float(values.std())
    if not np.isfinite(std) or std <= 0:
        raise ValueError(f"latents at {out_uri!r} have std {std}; the autoencoder at hand collapsed")
    return 1.0 / std


def encode_set(src_uri: str, out_uri: str, store: Store, *, autoencoder_uri: str, autoencoder_sha256: str,
               downsample_factor: int, encode_batch_size: int, encode_actors: int, read: ReadSpec,
               cpus_per_actor: float, use_gpu: bool, scale_factor: float | None = None) -> dict:
    """Encode one shard directory to latents at ``out_uri``; return the ``_latents.json`` it wrote.

    Without ``scale_factor`` the factor is measured on this set's first batch.
    """
    import ray.data

    manifest = shards.read_manifest(src_uri, store)
    if manifest.num_tiles == 0 or not manifest.shards:
        raise ValueError(f"{src_uri!r} holds no tiles to encode; check the ingest report in its {shards.MANIFEST}")
    store.delete(out_uri)  # a crashed earlier attempt left parts without _latents.json
    store.makedirs(out_uri)
    ds, _ = parquet_dataset(manifest.shard_uris(), store, ["image", "label", "sha1"], manifest.num_tiles,
                            manifest.num_tiles * manifest.tile_size**2 * 3 / 2**20, read)
    ds = ds.map_batches(
        TileEncoder,
        fn_constructor_kwargs={"autoencoder_uri": autoencoder_uri, "store": store, "use_gpu": use_gpu},
        batch_size=encode_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=encode_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus_per_actor,
    )
    out = store.for_ray(out_uri)  # the filesystem travels to the write tasks: no keys in it
    ds.write_parquet(out.path, filesystem=out.fs)
    parts = sorted(u.rsplit("/", 1)[-1] for u in store.list_files(out_uri, [".parquet"]))
    counts = [store.parquet_metadata(join(out_uri, p)).num_rows for p in parts]
    parts = [p for p, n in zip(parts, counts) if n]  # Ray may leave empty files for empty blocks
    counts = [n for n in counts if n]
    first = store.read_parquet(join(out_uri, parts[0]), ["latent"]).column("latent")[0].as_py()
    side = manifest.tile_size // downsample_factor
    shape = [len(first) // 2 // (side * side), side, side]
    if 2 * shape[0] * side * side != len(first):
        raise RuntimeError(f"latent of {len(first)} bytes does not match {side}x{side} latents of "
                           f"{manifest.tile_size}px tiles at f={downsample_factor}")
    if scale_factor is None:
        scale_factor = measure_scale_factor(src_uri, out_uri, parts, encode_batch_size, store)
    meta = {"shape": shape, "scale_factor": float(scale_factor), "autoencoder_sha256": autoencoder_sha256,
            "num_latents": int(sum(counts)), "shards": parts, "source": src_uri, "classes": manifest.classes,
            "posterior": "mean"}
    if meta["num_latents"] != manifest.num_tiles:
        raise RuntimeError(f"encoded {meta['num_latents']} latents from {manifest.num_tiles} tiles of {src_uri!r}")
    store.write_json(join(out_uri, LATENTS_META), meta)  # last: marks it complete
    return meta


def load_latents(uri: str, store: Store) -> tuple["torch.Tensor", list[str | None], list[str], dict]:
    """Return (fp32 NCHW unscaled latents, labels, sha1s, meta) of a small latents directory."""
    import torch

    meta = read_latents_meta(uri, store)
    tables = [store.read_parquet(u, ["latent", "label", "sha1"]) for u in _part_uris(uri, meta)]
    table = pa.concat_tables(tables) if tables else LATENT_SCHEMA.empty_table()
    z = decode_latents(table.column("latent"), meta["shape"])
    return torch.from_numpy(z), table.column("label").to_pylist(), table.column("sha1").to_pylist(), meta


def _scaled_batch(batch: dict[str, np.ndarray], shape: list[int], scale: float) -> dict[str, np.ndarray]:
    out = {k: v for k, v in batch.items() if k != "latent"}
    out["latent"] = decode_latents(list(batch["latent"]), shape) * np.float32(scale)
    return out


def latent_dataset(uri: str, store: Store, read: ReadSpec, columns: tuple[str, ...] = (),
                   rows_per_pass: int = 0) -> Any:
    """Return a ray.data.Dataset of cached latents: ``latent`` float32 CHW times scale_factor (+ columns).

    Small caches are read once (repeated up to ``rows_per_pass`` rows, see ``readers.copies_per_pass``).
    """
    meta = read_latents_meta(uri, store)
    unknown = set(columns) - {"label", "sha1"}
    if unknown:
        raise ValueError(f"latent_dataset: unknown extra columns {sorted(unknown)}; choose from label, sha1")
    size_mb = meta["num_latents"] * int(np.prod(meta["shape"])) * 4 / 2**20
    ds, small = parquet_dataset(_part_uris(uri, meta), store, ["latent", *columns], meta["num_latents"], size_mb,
                                read, rows_per_pass)
    ds = ds.map_batches(_scaled_batch, batch_format="numpy", batch_size=256,
                        fn_kwargs={"shape": meta["shape"], "scale": meta["scale_factor"]})
    return ds.materialize() if small else ds
