"""Stage ``autoencoder``: train the KL autoencoder with Ray Train on the unlabeled shards, export it.

The worker side is :mod:`histodiff.train.autoencoder`. After training, PSNR/SSIM are measured
on held-out tiles (the labeled test shards, else the labeled shards: tiles the autoencoder never
trained on), a grid of originals over reconstructions is logged, and the weights are exported.
The Ray Train run is named after everything that shapes the weights except the step count and
the cadences, so raising ``autoencoder.steps`` continues the same run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from histodiff import checkpoint as ckpt
from histodiff.config import AutoencoderConfig, HistodiffConfig
from histodiff.data import shards
from histodiff.data.readers import ReadSpec, read_spec, rows_per_pass, tile_dataset
from histodiff.models import autoencoder as ae_model
from histodiff.plots import labeled_grid_figure
from histodiff.runner import Context, Spec as StageSpec, StageResult
from histodiff.storage import Store, join
from histodiff.train import common
from histodiff.train.autoencoder import train_loop

log = logging.getLogger(__name__)

VERSION = 1
MODELS = {"autoencoder": "uri"}
_NOT_WEIGHTS = {"steps", "report_every", "checkpoint_every", "eval_tiles", "encode_batch_size", "encode_actors"}


class Spec(StageSpec):
    """The autoencoder recipe, the unlabeled shards (by content), held-out sets and the read order."""

    autoencoder: AutoencoderConfig
    seed: int
    num_workers: int
    tile_size: int
    augment: bool
    unlabeled_uri: str
    unlabeled_fingerprint: str
    heldout_uris: list[str]
    read: ReadSpec


@dataclass
class Result(StageResult):
    """Where the autoencoder went and how well it reconstructs held-out tiles."""

    uri: str
    sha256: str
    steps: int
    psnr: float
    ssim: float


def spec(cfg: HistodiffConfig, store: Store) -> Spec:
    """Return the autoencoder spec after checking there is a batch per worker and the perceptual weights."""
    ae, paths = cfg.autoencoder, cfg.paths
    manifest = shards.read_manifest(paths.unlabeled_shards, store)
    need = ae.batch_size * cfg.ray.num_workers
    if manifest.num_tiles < need:
        raise ValueError(f"{paths.unlabeled_shards!r} holds {manifest.num_tiles} tiles, fewer than one batch per worker "
                         f"({need}); lower autoencoder.batch_size or ingest more tiles")
    if ae.perceptual_weight > 0:
        store.check_readable(ae.perceptual_weights_uri)
    heldout = [u for u in (paths.labeled_test_shards, paths.labeled_shards) if u and store.exists(join(u, shards.MANIFEST))]
    return Spec(output_uri=paths.autoencoder, autoencoder=ae, seed=cfg.seed, num_workers=cfg.ray.num_workers,
                tile_size=manifest.tile_size, augment=cfg.data.augment, unlabeled_uri=paths.unlabeled_shards,
                unlabeled_fingerprint=manifest.fingerprint or str(manifest.num_tiles), heldout_uris=heldout,
                read=read_spec(cfg))


def run_name(spec: Spec, name: str) -> str:
    """Return the Ray Train run name: the run's name plus a hash of what shapes the weights (not steps)."""
    data = spec.model_dump(mode="json", exclude={"output_uri": True, "heldout_uris": True,
                                                  "autoencoder": _NOT_WEIGHTS})
    return f"{name}-autoencoder-{hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]}"


def first_tiles(uri: str, n: int, store: Store) -> torch.Tensor:
    """Return the first ``n`` tiles of a shard directory as float32 NCHW in [-1, 1] (reads few shards)."""
    images: list[np.ndarray] = []
    for shard in shards.read_manifest(uri, store).shard_uris():
        column = store.read_parquet(shard, ["image"]).column("image").to_pylist()
        images += [shards.decode_png(b) for b in column[: n - len(images)]]
        if len(images) >= n:
            break
    if not images:
        raise ValueError(f"{uri!r} holds no tiles")
    return shards.to_model_range(np.stack(images))


def work(spec: Spec, ctx: Context) -> Result:
    """Train (or resume) the autoencoder, measure it on held-out tiles, export it."""
    ae, run = spec.autoencoder, run_name(spec, ctx.name)
    tiles = tile_dataset(spec.unlabeled_uri, ctx.store, spec.read, augment=spec.augment, batch_size=ae.batch_size,
                         rows_per_pass=rows_per_pass(spec.read, ae.batch_size, spec.num_workers))
    loop_config = {"spec": spec, "store": ctx.store}
    common.build_trainer(ctx, train_loop, loop_config, run, datasets={"train": tiles}).fit()
    tensors, st = common.final_checkpoint(ctx.checkpoints_uri, run, ctx.store, ae.steps, "autoencoder")
    vae = ae_model.build_autoencoder(ae)
    vae.load_state_dict(tensors["model"])
    if not spec.heldout_uris:
        log.warning("no labeled shards to hold out; PSNR/SSIM are measured on training tiles")
    eval_uri = (spec.heldout_uris or [spec.unlabeled_uri])[0]
    x = first_tiles(eval_uri, ae.eval_tiles, ctx.store)
    recon = ae_model.reconstruct(vae, x)
    quality = ae_model.reconstruction_quality(x, recon)
    step = int(st["step"])
    ctx.tracker.log_metrics({f"heldout_{k}": v for k, v in quality.items()}, step)
    n = min(len(x), 12)
    rows = [("original", shards.to_uint8(x[:n])), ("reconstruction", shards.to_uint8(recon[:n]))]
    title = f"held-out tiles and their reconstructions (PSNR {quality['psnr']:.1f} dB, SSIM {quality['ssim']:.3f})"
    ctx.tracker.log_figure(labeled_grid_figure(rows, title), "autoencoder_reconstructions.png")
    meta = {"kind": "autoencoder", "steps": step, **quality, "downsample_factor": ae_model.downsample_factor(ae),
            "latent_channels": ae.latent_channels, "tile_size": spec.tile_size, "heldout_uri": eval_uri}
    sha = ckpt.export_model(vae, spec.output_uri, meta, ctx.store)
    ctx.tracker.set_tags({"histodiff.autoencoder_sha256": sha, "histodiff.heldout_uri": eval_uri})
    log.info("autoencoder exported to %s (psnr %.2f dB, ssim %.3f)", spec.output_uri, quality["psnr"], quality["ssim"])
    return Result(spec.output_uri, sha, step, quality["psnr"], quality["ssim"])
