"""The KL autoencoder's training: a plain-PyTorch step and the Ray Train worker.

``train_step`` is plain PyTorch (it runs without Ray); ``train_loop`` fills in the one loop
skeleton (:mod:`histodiff.train.loop`) on each Ray Train worker over the streamed shards.
The driver is the ``autoencoder`` stage (:mod:`histodiff.stages.autoencoder`).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from histodiff import checkpoint as ckpt
from histodiff.config import AutoencoderConfig
from histodiff.models import autoencoder as ae_model
from histodiff.runtime import autocast, device_for, prefetch_batches, set_worker_threads
from histodiff.storage import Store
from histodiff.train import common, loop

log = logging.getLogger(__name__)


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


def load_perceptual_state(uri: str, store: Store) -> dict[str, torch.Tensor]:
    """Return the perceptual net's state dict from a .safetensors or torch file (weights only)."""
    data = store.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"autoencoder.perceptual_weights_uri={uri!r} is neither safetensors nor a "
                         f"weights-only torch file: {exc}") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _tile_batches(shard: Any, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    while True:  # one pass over this worker's shard per epoch
        seen = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              prefetch_batches=prefetch_batches(device),
                                              local_shuffle_buffer_size=4 * batch_size):
            seen += 1
            yield batch["image"].to(device, non_blocking=True)
        if seen == 0:
            raise RuntimeError(f"the training shard yielded no full batch of {batch_size} tiles; lower "
                               "autoencoder.batch_size or ray.num_workers, or ingest more tiles")


class AutoencoderTrainee:
    """The autoencoder (and its optional discriminator) in the training loop."""

    def __init__(self, parts: TrainParts, batches: Iterator[torch.Tensor], cfg: AutoencoderConfig,
                 device: torch.device) -> None:
        self.parts, self.batches, self.cfg, self.device = parts, batches, cfg, device
        self.step = 0

    def train_step(self) -> dict[str, float]:
        """Run one step on the next batch; return its losses (``loss`` is the reconstruction objective)."""
        metrics = train_step(self.parts, next(self.batches), self.step, self.cfg, self.device)
        self.step += 1
        return metrics

    def checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Return every trainable part's tensors and the optimizer layout."""
        return parts_tensors(self.parts)

    def restore(self, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
        """Load a checkpoint into the parts."""
        self.step = load_parts(self.parts, tensors, state)

    def report_extras(self, report: dict[str, float], saving: bool) -> dict[str, float]:
        """Return nothing extra: the step's losses are the report."""
        return {}


def train_loop(config: dict) -> None:
    """Ray Train worker: stream tiles, train to ``autoencoder.steps`` through the loop skeleton."""
    import ray.train

    set_worker_threads(config["threads_per_worker"])
    spec, store = config["spec"], config["store"]
    ae = spec.autoencoder
    info = common.worker_info()
    device = device_for(config["use_gpu"])
    torch.manual_seed(spec.seed + info.rank)
    state = load_perceptual_state(ae.perceptual_weights_uri, store) if ae.perceptual_weight > 0 else None
    parts = make_parts(ae, device, state, prepare=common.prepare_ddp)
    trainee = AutoencoderTrainee(parts, _tile_batches(ray.train.get_dataset_shard("train"), ae.batch_size, device),
                                 ae, device)
    loop.train(trainee, loop.Cadence(ae.steps, ae.report_every, ae.checkpoint_every), config, device="cpu",
               callbacks=config.get("callbacks", ()))
