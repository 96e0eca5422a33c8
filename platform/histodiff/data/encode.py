"""Encode stage: tile shards -> cached latents (Parquet, fp16), so training never re-encodes tiles.

A Ray Data actor pool (one autoencoder per actor, one GPU each when ``ray.use_gpu``) maps
shard rows to the autoencoder's **posterior mean** (deterministic: the same tile always
gives the same latent; the denoiser adds its own noise). Output follows the Latents
contract in docs/ARCHITECTURE.md: parts with ``latent`` (fp16 bytes, C*H*W), ``label``,
``sha1``, then ``_latents.json`` last. Latents are stored unscaled; ``scale_factor`` is
1/std of the first batch (the first ``encode_batch_size`` tiles of the unlabeled set in
manifest order), as the paper does, and the labeled latents carry the same factor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from histodiff import storage
from histodiff.config import HistodiffConfig, StorageConfig
from histodiff.data import shards
from histodiff.runtime import autocast, device_for, init_ray, worker_env

# torch and the checkpoint helpers load lazily: the streaming path (latent_dataset) needs neither.

log = logging.getLogger(__name__)

LATENTS_META = "_latents.json"
LATENT_SCHEMA = pa.schema([("latent", pa.binary()), ("label", pa.string()), ("sha1", pa.string())])


@dataclass
class EncodeResult:
    """Where the latents went, how many, and the scale factor the denoiser must apply."""

    latents_uri: str
    num_latents: int
    scale_factor: float
    shape: list[int]
    autoencoder_sha256: str
    labeled: dict[str, str] = field(default_factory=dict)  # split -> URI
    num_labeled: dict[str, int] = field(default_factory=dict)
    skipped: bool = False


class TileEncoder:
    """Ray Data UDF: loads the exported autoencoder once per actor; maps PNG rows to latents."""

    def __init__(self, autoencoder_uri: str, storage_cfg: StorageConfig | dict, use_gpu: bool) -> None:
        from diffusers import AutoencoderKL

        from histodiff.checkpoint import load_exported

        self.device = device_for(use_gpu)
        # StorageConfig travels pickled (SecretStr never prints), like the pyarrow filesystem Ray reads with.
        vae, _ = load_exported(AutoencoderKL, autoencoder_uri, StorageConfig.model_validate(storage_cfg))
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


def latents_complete(uri: str, autoencoder_sha256: str, storage_cfg: StorageConfig | None = None) -> dict | None:
    """Return the latents metadata when ``uri`` holds latents of this autoencoder, else None."""
    meta_uri = storage.join(uri, LATENTS_META)
    if not storage.exists(meta_uri, storage_cfg):
        return None
    meta = storage.read_json(meta_uri, storage_cfg)
    return meta if meta.get("autoencoder_sha256") == autoencoder_sha256 else None


def read_latents_meta(uri: str, storage_cfg: StorageConfig | None = None) -> dict:
    """Return ``_latents.json`` of a complete latents directory, or raise a clear error."""
    meta_uri = storage.join(uri, LATENTS_META)
    if not storage.exists(meta_uri, storage_cfg):
        raise FileNotFoundError(f"{uri!r} holds no complete latents (no {LATENTS_META}); run `histodiff run encode`")
    return storage.read_json(meta_uri, storage_cfg)


def decode_latents(column: list[bytes] | pa.Array, shape: list[int]) -> np.ndarray:
    """Return float32 NCHW latents from fp16 byte strings."""
    rows = column.to_pylist() if isinstance(column, (pa.Array, pa.ChunkedArray)) else list(column)
    if not rows:
        return np.zeros((0, *shape), np.float32)
    return np.frombuffer(b"".join(rows), dtype=np.float16).reshape(len(rows), *shape).astype(np.float32)


def _part_uris(uri: str, meta: dict) -> list[str]:
    return [storage.join(uri, name) for name in meta["shards"]]


def _read_part(part_uri: str, storage_cfg: StorageConfig | None, columns: list[str]) -> pa.Table:
    return storage.read_parquet(part_uri, storage_cfg, columns)


def measure_scale_factor(src_uri: str, out_uri: str, parts: list[str], batch_size: int,
                         storage_cfg: StorageConfig | None = None) -> float:
    """Return 1/std of the latents of the first ``batch_size`` tiles of ``src_uri`` (paper: first batch)."""
    first = shards.read_manifest(src_uri, storage_cfg).shard_uris()[0]
    wanted = _read_part(first, storage_cfg, ["sha1"]).column("sha1").slice(0, batch_size).combine_chunks()
    found: list[np.ndarray] = []
    rows = 0
    for name in parts:  # the written order is not the input order: look the first batch up by sha1
        table = _read_part(storage.join(out_uri, name), storage_cfg, ["latent", "sha1"])
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


def encode_set(src_uri: str, out_uri: str, cfg: HistodiffConfig, autoencoder_sha256: str,
               scale_factor: float | None = None) -> dict:
    """Encode one shard directory to latents at ``out_uri``; return the ``_latents.json`` it wrote.

    Without ``scale_factor`` the factor is measured on this set's first batch.
    """
    import ray.data

    from histodiff.checkpoint import model_meta
    from histodiff.data.readers import parquet_dataset

    manifest = shards.read_manifest(src_uri, cfg.storage)
    if manifest.num_tiles == 0 or not manifest.shards:
        raise ValueError(f"{src_uri!r} holds no tiles to encode; check the ingest report in its {shards.MANIFEST}")
    storage.delete(out_uri, cfg.storage)  # a crashed earlier attempt left parts without _latents.json
    storage.makedirs(out_uri, cfg.storage)
    ae = cfg.autoencoder
    # Storage settings must reach the tasks and actors even where Ray started without them.
    remote = {"runtime_env": {"env_vars": worker_env(cfg)}}
    ds, _ = parquet_dataset(manifest.shard_uris(), cfg, ["image", "label", "sha1"], manifest.num_tiles,
                            manifest.num_tiles * manifest.tile_size**2 * 3 / 2**20, runtime_env=remote["runtime_env"])
    ds = ds.map_batches(
        TileEncoder,
        fn_constructor_kwargs={"autoencoder_uri": cfg.paths.autoencoder, "storage_cfg": cfg.storage,
                               "use_gpu": cfg.ray.use_gpu},
        batch_size=ae.encode_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=ae.encode_actors),
        num_gpus=1 if cfg.ray.use_gpu else 0,
        num_cpus=cfg.ray.cpus_per_worker,
        **remote,
    )
    out = storage.resolve(out_uri, cfg.storage)
    ds.write_parquet(out.path, filesystem=out.fs, ray_remote_args=remote)
    parts = sorted(u.rsplit("/", 1)[-1] for u in storage.list_files(out_uri, cfg.storage, [".parquet"]))
    counts = [_read_meta(storage.join(out_uri, p), cfg.storage).num_rows for p in parts]
    parts = [p for p, n in zip(parts, counts) if n]  # Ray may leave empty files for empty blocks
    counts = [n for n in counts if n]
    first = _read_part(storage.join(out_uri, parts[0]), cfg.storage, ["latent"]).column("latent")[0].as_py()
    vae_meta = model_meta(cfg.paths.autoencoder, cfg.storage)
    side = manifest.tile_size // int(vae_meta["downsample_factor"])
    shape = [len(first) // 2 // (side * side), side, side]
    if 2 * shape[0] * side * side != len(first):
        raise RuntimeError(f"latent of {len(first)} bytes does not match {side}x{side} latents of "
                           f"{manifest.tile_size}px tiles at f={vae_meta['downsample_factor']}")
    if scale_factor is None:
        scale_factor = measure_scale_factor(src_uri, out_uri, parts, ae.encode_batch_size, cfg.storage)
    meta = {"shape": shape, "scale_factor": float(scale_factor), "autoencoder_sha256": autoencoder_sha256,
            "num_latents": int(sum(counts)), "shards": parts, "source": src_uri, "classes": manifest.classes,
            "posterior": "mean"}
    if meta["num_latents"] != manifest.num_tiles:
        raise RuntimeError(f"encoded {meta['num_latents']} latents from {manifest.num_tiles} tiles of {src_uri!r}")
    storage.write_json(storage.join(out_uri, LATENTS_META), meta, cfg.storage)  # last: marks it complete
    return meta


def _read_meta(part_uri: str, storage_cfg: StorageConfig | None) -> Any:
    loc = storage.resolve(part_uri, storage_cfg)
    return pq.read_metadata(loc.path, filesystem=loc.fs)


def labeled_sets(cfg: HistodiffConfig) -> dict[str, tuple[str, str]]:
    """Return {split: (labeled shards URI, labeled latents URI)} for the labeled sets that exist."""
    out = {}
    for split, src in (("train", cfg.paths.labeled_shards), ("test", cfg.paths.labeled_test_shards)):
        if src and storage.exists(storage.join(src, shards.MANIFEST), cfg.storage):
            out[split] = (src, storage.join(cfg.paths.labeled_latents, split))
    return out


def run(cfg: HistodiffConfig) -> EncodeResult:
    """Encode the unlabeled and labeled shards with the exported autoencoder; skip what is done."""
    from histodiff import tracking
    from histodiff.checkpoint import model_meta

    sha = model_meta(cfg.paths.autoencoder, cfg.storage)["sha256"]
    shards.read_manifest(cfg.paths.unlabeled_shards, cfg.storage)  # fail early on a missing input
    todo = {"unlabeled": (cfg.paths.unlabeled_shards, cfg.paths.latents), **labeled_sets(cfg)}
    done = {name: latents_complete(out, sha, cfg.storage) for name, (_, out) in todo.items()}
    if all(done.values()):
        log.info("latents for autoencoder %s are up to date; skipping", sha[:12])
        return _result(cfg, sha, done, todo, skipped=True)
    init_ray(cfg)
    with tracking.stage_run(cfg, "encode", params={"autoencoder_sha256": sha}) as tracker:
        if done["unlabeled"] is None:
            done["unlabeled"] = encode_set(*todo["unlabeled"], cfg, sha)
        scale = done["unlabeled"]["scale_factor"]
        for name, (src, out) in todo.items():
            if done[name] is None or done[name]["scale_factor"] != scale:
                done[name] = encode_set(src, out, cfg, sha, scale_factor=scale)
        tracker.log_metrics({"scale_factor": scale, **{f"num_latents/{k}": v["num_latents"] for k, v in done.items()}})
    return _result(cfg, sha, done, todo)


def _result(cfg: HistodiffConfig, sha: str, done: dict, todo: dict, skipped: bool = False) -> EncodeResult:
    unl = done["unlabeled"]
    return EncodeResult(
        latents_uri=cfg.paths.latents, num_latents=unl["num_latents"], scale_factor=unl["scale_factor"],
        shape=unl["shape"], autoencoder_sha256=sha, skipped=skipped,
        labeled={k: todo[k][1] for k in done if k != "unlabeled"},
        num_labeled={k: v["num_latents"] for k, v in done.items() if k != "unlabeled"},
    )


def load_latents(uri: str, storage_cfg: StorageConfig | None = None
                 ) -> tuple["torch.Tensor", list[str | None], list[str], dict]:
    """Return (fp32 NCHW unscaled latents, labels, sha1s, meta) of a small latents directory."""
    import torch

    meta = read_latents_meta(uri, storage_cfg)
    tables = [_read_part(u, storage_cfg, ["latent", "label", "sha1"]) for u in _part_uris(uri, meta)]
    table = pa.concat_tables(tables) if tables else LATENT_SCHEMA.empty_table()
    z = decode_latents(table.column("latent"), meta["shape"])
    return torch.from_numpy(z), table.column("label").to_pylist(), table.column("sha1").to_pylist(), meta


def _scaled_batch(batch: dict[str, np.ndarray], shape: list[int], scale: float) -> dict[str, np.ndarray]:
    out = {k: v for k, v in batch.items() if k != "latent"}
    out["latent"] = decode_latents(list(batch["latent"]), shape) * np.float32(scale)
    return out


def latent_dataset(uri: str, cfg: HistodiffConfig, columns: tuple[str, ...] = (), rows_per_pass: int = 0) -> Any:
    """Return a ray.data.Dataset of cached latents: ``latent`` float32 CHW times scale_factor (+ columns).

    Small caches are read once (repeated up to ``rows_per_pass`` rows, see ``readers.copies_per_pass``).
    """
    from histodiff.data.readers import parquet_dataset

    meta = read_latents_meta(uri, cfg.storage)
    unknown = set(columns) - {"label", "sha1"}
    if unknown:
        raise ValueError(f"latent_dataset: unknown extra columns {sorted(unknown)}; choose from label, sha1")
    size_mb = meta["num_latents"] * int(np.prod(meta["shape"])) * 4 / 2**20
    ds, small = parquet_dataset(_part_uris(uri, meta), cfg, ["latent", *columns], meta["num_latents"], size_mb,
                                rows_per_pass)
    ds = ds.map_batches(_scaled_batch, batch_format="numpy", batch_size=256,
                        fn_kwargs={"shape": meta["shape"], "scale": meta["scale_factor"]})
    return ds.materialize() if small else ds
