"""Autoencoder stage: train the KL autoencoder with Ray Train on the unlabeled shards, export it.

``train_step`` is plain PyTorch (it runs without Ray); ``train_loop`` runs it on each Ray
Train worker over the streamed shards; ``run`` is the driver: it skips when an export with
the same fingerprint exists, trains (resuming from the last complete checkpoint), measures
PSNR/SSIM on held-out tiles, logs a grid of originals over reconstructions and exports.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from histodiff import checkpoint as ckpt
from histodiff import storage, tracking
from histodiff.config import AutoencoderConfig, HistodiffConfig, StorageConfig, config_from_dict
from histodiff.data import shards
from histodiff.data.readers import rows_per_pass, tile_dataset
from histodiff.models import autoencoder as ae_model
from histodiff.runtime import autocast, device_for, init_ray, prefetch_batches, set_worker_threads
from histodiff.train import common

log = logging.getLogger(__name__)

STAGE = "autoencoder"
# Keys that change neither the trained weights nor the export (left out of the fingerprint).
_NOT_TRAINING = ("report_every", "checkpoint_every", "encode_batch_size", "encode_actors", "eval_tiles", "steps")


@dataclass
class AutoencoderResult:
    """Where the autoencoder went and how well it reconstructs held-out tiles."""

    uri: str
    sha256: str
    fingerprint: str
    steps: int
    psnr: float
    ssim: float
    skipped: bool = False


class VAEForward(nn.Module):
    """AutoencoderKL wrapper whose forward returns (reconstruction, posterior mean, logvar)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the decoded posterior sample and the posterior's mean and log-variance."""
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.mean, posterior.logvar


@dataclass
class TrainParts:
    """Model, optimisers and the optional loss networks of one training process."""

    model: nn.Module  # VAEForward, possibly DDP-wrapped
    optimizer: torch.optim.Optimizer
    perceptual: nn.Module | None = None
    disc: nn.Module | None = None
    disc_optimizer: torch.optim.Optimizer | None = None

    def vae(self) -> nn.Module:
        """Return the bare AutoencoderKL (unwrapping DDP)."""
        return getattr(self.model, "module", self.model).vae

    def disc_module(self) -> nn.Module | None:
        """Return the bare discriminator (unwrapping DDP), or None."""
        return None if self.disc is None else getattr(self.disc, "module", self.disc)


def make_parts(cfg: AutoencoderConfig, device: torch.device, perceptual_state: dict | None = None,
               prepare: Callable[[nn.Module], nn.Module] | None = None) -> TrainParts:
    """Return fresh training parts on a device; ``prepare`` wraps trainable nets (Ray's DDP)."""
    prepare = prepare or (lambda m: m.to(device))
    model = prepare(VAEForward(ae_model.build_autoencoder(cfg)))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))  # LDM's AE optimiser
    parts = TrainParts(model, optimizer)
    if cfg.perceptual_weight > 0:
        if perceptual_state is None:
            raise ValueError("autoencoder.perceptual_weight > 0 but no perceptual weights were loaded")
        parts.perceptual = ae_model.PerceptualLoss(perceptual_state).to(device)
    if cfg.disc_weight > 0:
        parts.disc = prepare(ae_model.build_discriminator(cfg))
        parts.disc_optimizer = torch.optim.Adam(parts.disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    return parts


def train_step(parts: TrainParts, x: torch.Tensor, step: int, cfg: AutoencoderConfig,
               device: torch.device) -> dict[str, float]:
    """Run one optimisation step (and one discriminator step once it is on); return its losses."""
    parts.model.train()
    with autocast(device):
        recon, mean, logvar = parts.model(x)
    perceptual = parts.perceptual(x, recon) if parts.perceptual is not None else None
    losses = ae_model.vae_loss(x, recon, mean, logvar, cfg.kl_weight, perceptual, cfg.perceptual_weight)
    loss = losses["loss"]
    out = {k: float(v.detach()) for k, v in losses.items()}
    gan_on = parts.disc is not None and step >= cfg.disc_start_step
    if gan_on:
        disc = parts.disc_module()
        disc.requires_grad_(False)  # the generator step must not touch (or all-reduce) D's grads
        with autocast(device):
            g_loss = ae_model.generator_gan_loss(disc(recon))
        if cfg.disc_adaptive:
            weight = ae_model.adaptive_gan_weight(loss, g_loss, ae_model.decoder_last_layer(parts.vae()),
                                                  cfg.disc_weight)
        else:
            weight = torch.tensor(cfg.disc_weight, device=device)
        loss = loss + weight * g_loss
        disc.requires_grad_(True)
        out.update(g_loss=float(g_loss.detach()), disc_weight_eff=float(weight))
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts.optimizer.step()
    if gan_on:
        # One D forward over real and fake together: a single DDP forward per backward.
        with autocast(device):
            logits = parts.disc(torch.cat([x, recon.detach()]))
        d_loss = ae_model.hinge_d_loss(logits[: len(x)], logits[len(x):])
        parts.disc_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        parts.disc_optimizer.step()
        out["d_loss"] = float(d_loss.detach())
    out["total"] = float(loss.detach())
    return out


def parts_tensors(parts: TrainParts) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Return (tensor groups, JSON state) that checkpoint every trainable part."""
    opt_t, opt_layout = ckpt.optimizer_to_tensors(parts.optimizer)
    tensors = {"model": parts.vae().state_dict(), "optimizer": opt_t}
    state: dict[str, Any] = {"optimizer": opt_layout, "rng": ckpt.rng_state()}
    if parts.disc is not None:
        d_t, d_layout = ckpt.optimizer_to_tensors(parts.disc_optimizer)
        tensors.update(disc=parts.disc_module().state_dict(), disc_optimizer=d_t)
        state["disc_optimizer"] = d_layout
    return {k: v for k, v in tensors.items() if v}, state


def load_parts(parts: TrainParts, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> int:
    """Load a checkpoint into training parts; return the step it was taken at."""
    parts.vae().load_state_dict(tensors["model"])
    ckpt.optimizer_from_tensors(parts.optimizer, tensors.get("optimizer", {}), state["optimizer"])
    if parts.disc is not None and "disc" in tensors:
        parts.disc_module().load_state_dict(tensors["disc"])
        ckpt.optimizer_from_tensors(parts.disc_optimizer, tensors.get("disc_optimizer", {}), state["disc_optimizer"])
    ckpt.set_rng_state(state.get("rng", {}))
    return int(state["step"])


def load_perceptual_state(uri: str, storage_cfg: StorageConfig | None = None) -> dict[str, torch.Tensor]:
    """Return the perceptual net's state dict from a .safetensors or torch file (weights only)."""
    data = storage.read_bytes(uri, storage_cfg)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"autoencoder.perceptual_weights_uri={uri!r} is neither safetensors nor a "
                         f"weights-only torch file: {exc}") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def train_loop(config: dict) -> None:
    """Ray Train worker: stream tiles, train to ``autoencoder.steps``, checkpoint every N steps."""
    import ray.train
    from ray.train.torch import prepare_model

    cfg = config_from_dict(config["cfg"])
    set_worker_threads(cfg)
    ae = cfg.autoencoder
    info = common.worker_info()
    device = device_for(cfg.ray.use_gpu)
    torch.manual_seed(cfg.seed + info.rank)
    state = load_perceptual_state(ae.perceptual_weights_uri, cfg.storage) if ae.perceptual_weight > 0 else None
    parts = make_parts(ae, device, state, prepare=prepare_model)
    step = 0
    restored = common.restore(common.latest_complete_checkpoint(), "cpu")
    if restored is not None:
        step = load_parts(parts, *restored)
        log.info("rank %d resumed the autoencoder at step %d", info.rank, step)
    tracker = common.worker_tracker(config)
    shard = ray.train.get_dataset_shard("train")
    while step < ae.steps:
        seen = 0
        for batch in shard.iter_torch_batches(batch_size=ae.batch_size, drop_last=True,
                                              prefetch_batches=prefetch_batches(device),
                                              local_shuffle_buffer_size=4 * ae.batch_size):
            metrics = train_step(parts, batch["image"].to(device, non_blocking=True), step, ae, device)
            step, seen = step + 1, seen + 1
            if step % ae.checkpoint_every == 0 or step == ae.steps:
                tensors, st = parts_tensors(parts)
                common.report(metrics, step, tensors, st, config)
            elif step % ae.report_every == 0:
                common.report(metrics, step, loop_config=config)
            if step % ae.report_every == 0 or step == ae.steps:
                tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step)
            if step >= ae.steps:
                break
        if seen == 0:
            raise RuntimeError(f"the training shard yielded no full batch of {ae.batch_size} tiles; lower "
                               "autoencoder.batch_size or ray.num_workers, or ingest more tiles")


# ----------------------------------------------------------------------------- driver side


def training_fingerprint(cfg: HistodiffConfig, manifest: shards.Manifest) -> str:
    """Return a hash of everything that shapes the trained weights except the step count."""
    ae = {k: v for k, v in cfg.public_dict()["autoencoder"].items() if k not in _NOT_TRAINING}
    blob = {"autoencoder": ae, "seed": cfg.seed, "tile_size": manifest.tile_size, "workers": cfg.ray.num_workers,
            "shards": manifest.fingerprint or [manifest.shards, manifest.num_tiles]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def export_fingerprint(cfg: HistodiffConfig, manifest: shards.Manifest) -> str:
    """Return the fingerprint stored with the export (training fingerprint plus steps)."""
    return f"{training_fingerprint(cfg, manifest)}-{cfg.autoencoder.steps}"


def first_tiles(uri: str, n: int, storage_cfg: StorageConfig | None = None) -> torch.Tensor:
    """Return the first ``n`` tiles of a shard directory as float32 NCHW in [-1, 1] (reads few shards)."""
    import pyarrow.parquet as pq

    images: list[np.ndarray] = []
    for shard in shards.read_manifest(uri, storage_cfg).shard_uris():
        loc = storage.resolve(shard, storage_cfg)
        column = pq.read_table(loc.path, filesystem=loc.fs, columns=["image"]).column("image").to_pylist()
        images += [shards.decode_png(b) for b in column[: n - len(images)]]
        if len(images) >= n:
            break
    if not images:
        raise ValueError(f"{uri!r} holds no tiles")
    return shards.to_model_range(np.stack(images))


def held_out_tiles(cfg: HistodiffConfig) -> tuple[torch.Tensor, str]:
    """Return (tiles the autoencoder never trained on, their URI): the labeled target sets first."""
    for uri in (cfg.paths.labeled_test_shards, cfg.paths.labeled_shards):
        if uri and storage.exists(storage.join(uri, shards.MANIFEST), cfg.storage):
            return first_tiles(uri, cfg.autoencoder.eval_tiles, cfg.storage), uri
    log.warning("no labeled shards to hold out; PSNR/SSIM are measured on training tiles")
    return first_tiles(cfg.paths.unlabeled_shards, cfg.autoencoder.eval_tiles, cfg.storage), cfg.paths.unlabeled_shards


def final_weights(cfg: HistodiffConfig, stage: str) -> tuple[dict[str, torch.Tensor], int]:
    """Return (autoencoder state dict, step) from the run's newest complete checkpoint."""
    import pyarrow.fs as pafs
    import ray.train

    path, fs, _ = common.storage_path_and_fs(cfg)
    fs = fs or pafs.LocalFileSystem()
    found = common.list_complete_checkpoints(fs, f"{path}/{common.run_name(cfg, stage)}")
    if not found:
        raise RuntimeError(f"autoencoder training left no complete checkpoint under {cfg.paths.checkpoints!r}")
    step, ck_path = found[-1]
    tensors, _ = common.restore(ray.train.Checkpoint(path=ck_path, filesystem=fs))
    return tensors["model"], step


def run(cfg: HistodiffConfig) -> AutoencoderResult:
    """Train (or resume) the autoencoder on the unlabeled shards and export it; skip if done."""
    ae = cfg.autoencoder
    manifest = shards.read_manifest(cfg.paths.unlabeled_shards, cfg.storage)
    fp = export_fingerprint(cfg, manifest)
    out = cfg.paths.autoencoder
    meta_uri = storage.join(out, ckpt.MODEL_META)
    if storage.exists(meta_uri, cfg.storage):
        meta = storage.read_json(meta_uri, cfg.storage)
        if meta.get("fingerprint") == fp:
            log.info("autoencoder at %s is up to date (fingerprint %s); skipping", out, fp)
            return AutoencoderResult(out, meta["sha256"], fp, int(meta["steps"]), float(meta["psnr"]),
                                     float(meta["ssim"]), skipped=True)
    need = ae.batch_size * cfg.ray.num_workers
    if manifest.num_tiles < need:
        raise ValueError(f"{cfg.paths.unlabeled_shards!r} holds {manifest.num_tiles} tiles, fewer than one batch "
                         f"per worker ({need}); lower autoencoder.batch_size or ingest more tiles")
    if ae.perceptual_weight > 0:
        storage.check_readable(ae.perceptual_weights_uri, cfg.storage)
    stage = f"{STAGE}-{training_fingerprint(cfg, manifest)[:8]}"
    init_ray(cfg)
    with tracking.stage_run(cfg, STAGE, params={"autoencoder.fingerprint": fp}) as tracker:
        loop_config = {"cfg": cfg.public_dict(), **common.tracking_loop_config(tracker)}
        tiles = tile_dataset(cfg.paths.unlabeled_shards, cfg, augment=cfg.data.augment, batch_size=ae.batch_size,
                             rows_per_pass=rows_per_pass(cfg, ae.batch_size))
        trainer = common.build_trainer(cfg, train_loop, loop_config, stage, datasets={"train": tiles})
        trainer.fit()
        state, step = final_weights(cfg, stage)
        if step != ae.steps:
            raise RuntimeError(f"autoencoder training stopped at step {step} of {ae.steps}")
        vae = ae_model.build_autoencoder(ae)
        vae.load_state_dict(state)
        x, eval_uri = held_out_tiles(cfg)
        recon = ae_model.reconstruct(vae, x)
        quality = ae_model.reconstruction_quality(x, recon)
        tracker.log_metrics({f"heldout/{k}": v for k, v in quality.items()}, step)
        tracker.log_image(ae_model.comparison_grid(x, recon), "autoencoder_reconstructions.png")
        tracker.set_tags({"histodiff.heldout_uri": eval_uri})
        meta = {"kind": "autoencoder", "fingerprint": fp, "steps": step, **quality,
                "downsample_factor": ae_model.downsample_factor(ae), "latent_channels": ae.latent_channels,
                "tile_size": manifest.tile_size, "heldout_uri": eval_uri}
        storage.delete(meta_uri, cfg.storage)  # a stale export must not look complete while it is replaced
        sha = ckpt.export_model(vae, out, meta, cfg.storage)
        tracker.set_tags({"histodiff.autoencoder_sha256": sha})
    log.info("autoencoder exported to %s (psnr %.2f dB, ssim %.3f)", out, quality["psnr"], quality["ssim"])
    return AutoencoderResult(out, sha, fp, step, quality["psnr"], quality["ssim"])
