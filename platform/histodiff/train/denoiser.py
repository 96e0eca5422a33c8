"""The unconditional latent denoiser's training: plain-PyTorch steps and the Ray Train worker.

The steps are plain PyTorch (:func:`make_state`, :func:`train_step`, :func:`fit`), so a GPU
check runs them without Ray; :func:`train_loop` fills in the one loop skeleton
(:mod:`histodiff.train.loop`) on each Ray Train worker with streamed latents. The driver is the
``pretrain`` stage (:mod:`histodiff.stages.pretrain`). Global batch = ``batch_size`` x
``grad_accum`` x ``num_workers``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from histodiff import checkpoint as ckpt
from histodiff.config import DenoiserConfig
from histodiff.diffusion.schedule import ddpm_scheduler
from histodiff.models import denoiser as dn
from histodiff.plots import image_figure
from histodiff.runtime import autocast, device_for, prefetch_batches, set_worker_threads
from histodiff.train import common, loop

log = logging.getLogger(__name__)

PROBE_SIZE = 16


# ----------------------------------------------------------------------------- plain PyTorch


@dataclass
class TrainState:
    """Everything one worker trains with; ``model`` may be the DDP/compiled wrapper of ``unet``."""

    unet: Any
    model: Any
    ema: Any
    optimizer: torch.optim.Optimizer
    lr_schedule: Any
    noise_scheduler: Any
    dcfg: DenoiserConfig
    device: torch.device
    generator: torch.Generator
    step: int = 0


def make_state(dcfg: DenoiserConfig, latent_shape: list[int], device: torch.device, seed: int,
               wrap: Callable[[Any], Any] | None = None) -> TrainState:
    """Return a fresh TrainState: UNet (wrapped by ``wrap``, e.g. DDP), EMA, AdamW + linear warm-up."""
    torch.manual_seed(seed)  # identical initial weights on every rank
    unet = dn.build_unet(dcfg, latent_shape[0], latent_shape[1]).to(device)
    model = wrap(unet) if wrap else unet
    if dcfg.compile:
        model = torch.compile(model)
    ema = dn.build_ema(unet, dcfg.ema_decay)
    ema.to(device)
    # Fused on the CPU too (torch >= 2.4): one kernel for every tensor, not a dozen small ops per parameter
    # (measured on the tiny preset, one thread: the per-parameter loop was ~9% of a step).
    optimizer = torch.optim.AdamW(unet.parameters(), lr=dcfg.lr, weight_decay=0.0, fused=True)
    warmup = dcfg.warmup_steps
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return TrainState(unet, model, ema, optimizer, lr_schedule, ddpm_scheduler(dcfg.schedule), dcfg, device,
                      torch.Generator().manual_seed(seed))


def diffusion_loss(eps_pred: torch.Tensor, eps: torch.Tensor, kind: str) -> torch.Tensor:
    """Return the epsilon-prediction loss: mean L1 (the paper's) or mean squared error."""
    return F.l1_loss(eps_pred, eps) if kind == "l1" else F.mse_loss(eps_pred, eps)


def _noised(state: TrainState, z0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    # Draw on the CPU generator so a seed means the same noise on any device.
    noise = torch.randn(z0.shape, generator=generator).to(state.device)
    t = torch.randint(0, state.noise_scheduler.config.num_train_timesteps, (z0.shape[0],), generator=generator)
    t = t.to(state.device)
    return state.noise_scheduler.add_noise(z0, noise, t), noise, t


def train_step(state: TrainState, micro_batches: list[torch.Tensor]) -> float:
    """Run one optimizer step over ``grad_accum`` micro-batches of scaled latents; return the mean loss."""
    total = 0.0
    for i, z0 in enumerate(micro_batches):
        z0 = z0.to(state.device, non_blocking=True)
        z_t, noise, t = _noised(state, z0, state.generator)
        last = i == len(micro_batches) - 1
        # DDP would all-reduce on every backward; sync only on the last micro-batch.
        sync = contextlib.nullcontext() if last or not hasattr(state.model, "no_sync") else state.model.no_sync()
        with sync:
            with autocast(state.device):
                eps_pred = state.model(z_t, t).sample
            loss = diffusion_loss(eps_pred.float(), noise, state.dcfg.loss) / len(micro_batches)
            loss.backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(state.unet.parameters(), 1.0, foreach=True)
    state.optimizer.step()
    state.lr_schedule.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.ema.step(state.unet.parameters())
    state.step += 1
    return total


@torch.no_grad()
def probe_loss(state: TrainState, z0: torch.Tensor, seed: int = 1234) -> float:
    """Return the loss of the current weights on a fixed batch with fixed noise and timesteps."""
    state.unet.eval()
    z_t, noise, t = _noised(state, z0.to(state.device), torch.Generator().manual_seed(seed))
    with autocast(state.device):
        eps_pred = state.unet(z_t, t).sample
    state.unet.train()
    return float(diffusion_loss(eps_pred.float(), noise, state.dcfg.loss))


def fit(state: TrainState, batches: Iterator[torch.Tensor], until_step: int,
        on_step: Callable[[TrainState, float], None] | None = None) -> list[float]:
    """Train until ``state.step == until_step``; call ``on_step(state, loss)`` after each step; return losses."""
    losses = []
    state.unet.train()
    while state.step < until_step:
        loss = train_step(state, [next(batches) for _ in range(state.dcfg.grad_accum)])
        if not math.isfinite(loss):
            raise FloatingPointError(f"denoiser loss became {loss} at step {state.step}; lower denoiser.lr")
        losses.append(loss)
        if on_step is not None:
            on_step(state, loss)
    return losses


def state_tensors(state: TrainState) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Return (tensor groups, JSON state) that fully describe a TrainState for a checkpoint."""
    opt_tensors, opt_layout = ckpt.optimizer_to_tensors(state.optimizer)
    tensors = {"model": dict(state.unet.state_dict()), "ema": dn.ema_tensors(state.unet, state.ema),
               "optimizer": opt_tensors}
    return tensors, {"step": state.step, "optimizer": opt_layout, "ema_step": state.ema.optimization_step,
                     "lr_schedule": state.lr_schedule.state_dict()}


def load_state(state: TrainState, tensors: dict[str, dict[str, torch.Tensor]], st: dict[str, Any]) -> None:
    """Restore a TrainState written by :func:`state_tensors`."""
    state.unet.load_state_dict(tensors["model"])
    dn.load_ema_tensors(state.unet, state.ema, tensors["ema"], int(st["ema_step"]))
    ckpt.optimizer_from_tensors(state.optimizer, tensors["optimizer"], st["optimizer"])
    state.lr_schedule.load_state_dict(st["lr_schedule"])
    state.step = int(st["step"])


def in_memory_batches(latents: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Yield shuffled full batches from in-memory latents forever (the no-Ray data path)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(latents), generator=gen)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield latents[perm[i : i + batch_size]]


# ----------------------------------------------------------------------------- Ray Train worker


def _shard_batches(shard: Any, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    while True:  # one pass over this worker's shard per epoch
        seen = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              prefetch_batches=prefetch_batches(device),
                                              local_shuffle_buffer_size=4 * batch_size,
                                              dtypes=torch.float32, device=device):
            seen += 1
            yield batch["latent"]
        if seen == 0:
            raise ValueError(f"a worker got no full batch of {batch_size} latents; lower denoiser.batch_size "
                             "or ray.num_workers, or encode more tiles")


class DenoiserTrainee:
    """The denoiser in the training loop: DDP state, a fixed probe batch, sample grids from rank 0."""

    def __init__(self, state: TrainState, batches: Iterator[torch.Tensor], config: dict, rank: int,
                 world_size: int, vae: Any = None) -> None:
        self.state, self.batches, self.config, self.rank, self.vae = state, batches, config, rank, vae
        self.per_step = state.dcfg.batch_size * state.dcfg.grad_accum * world_size
        self.probe: torch.Tensor | None = None
        self.probes: list[list[float]] = []
        self.resumed: float | None = None
        self.resumed_from: list[list[float]] = []
        self.tracker = common.worker_tracker(config)

    @property
    def step(self) -> int:
        """Return the global optimizer step."""
        return self.state.step

    def take_probe(self) -> None:
        """Keep rank 0's first batch as the fixed probe batch (peeked: every rank draws the same count)."""
        # Every rank must draw the same number of batches per epoch, or the streaming split and
        # DDP's all-reduce wait on each other forever: peek, don't consume.
        first = next(self.batches)
        self.batches = itertools.chain([first], self.batches)
        self.probe = first[:PROBE_SIZE].detach().cpu().clone()
        self.probes = [[0, probe_loss(self.state, self.probe)]]

    def train_step(self) -> dict[str, float]:
        """Run one optimizer step over ``grad_accum`` micro-batches; return its loss and learning rate."""
        loss = train_step(self.state, [next(self.batches) for _ in range(self.state.dcfg.grad_accum)])
        return {"loss": loss, "lr": self.state.optimizer.param_groups[0]["lr"]}

    def checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Return the state's tensors and JSON state, with the probe and its losses on rank 0."""
        tensors, st = state_tensors(self.state)
        st.update(arch=self.config["arch"], resumed_from=self.resumed_from)
        if self.rank == 0:
            tensors["probe"] = {"latents": self.probe}
            st["probe_losses"] = self.probes
        return tensors, st

    def restore(self, tensors: dict[str, dict[str, torch.Tensor]], st: dict[str, Any]) -> None:
        """Load a checkpoint; rank 0 measures the probe loss right after it (the resume is checked by it)."""
        if st.get("arch") != self.config["arch"]:
            raise ValueError("the checkpoint in this run was written for another denoiser architecture or "
                             "latent shape; use a new `name` or delete that run directory")
        load_state(self.state, tensors, st)
        self.probe, self.probes = tensors.get("probe", {}).get("latents"), st.get("probe_losses", [])
        # Fresh, deterministic noise after a restart rather than a replay of the pre-crash draws.
        self.state.generator.manual_seed(self.config["seed"] * 1000 + self.rank + 7919 * self.state.step)
        if self.rank == 0 and self.probe is not None:
            self.resumed = probe_loss(self.state, self.probe)
            self.resumed_from = [*st.get("resumed_from", []), [self.state.step, self.resumed]]
            log.info("resumed at step %d (probe loss %.4f)", self.state.step, self.resumed)

    def report_extras(self, report: dict[str, float], saving: bool) -> dict[str, float]:
        """Return samples/s (and the resume's probe loss); at checkpoints the probe loss; log sample grids."""
        s, dcfg = self.state, self.state.dcfg
        extras = {"samples_per_s": report["steps_per_s"] * self.per_step}
        if self.resumed is not None:
            extras["resume_probe_loss"] = self.resumed
        if self.rank == 0 and self.vae is not None and (s.step % dcfg.sample_every == 0 or s.step >= dcfg.steps):
            grid = dn.sample_grid(s.unet, s.ema, self.vae, self.config["scale_factor"], dcfg.schedule, s.device,
                                  seed=self.config["seed"])
            title = f"unconditional samples at step {s.step} (EMA weights, 25 DDIM steps)"
            self.tracker.log_figure(image_figure(grid, title), f"samples/step_{s.step:07d}.png")
        if saving and self.rank == 0:
            self.probes.append([s.step, probe_loss(s, self.probe)])
            extras["probe_loss"] = self.probes[-1][1]
        return extras


def train_loop(config: dict) -> None:
    """Ray Train worker: stream latents, train with DDP through the loop skeleton, resume."""
    import ray.train

    set_worker_threads(config["threads_per_worker"])
    spec = config["spec"]
    info = common.worker_info()
    device = device_for(config["use_gpu"])
    state = make_state(spec.denoiser, config["latent_shape"], device, spec.seed, wrap=common.prepare_ddp)
    state.generator.manual_seed(spec.seed * 1000 + info.rank)
    batches = _shard_batches(ray.train.get_dataset_shard("train"), spec.denoiser.batch_size, device)
    vae = _load_vae(spec, config["store"], device) if info.rank == 0 else None
    trainee = DenoiserTrainee(state, batches, {**config, "seed": spec.seed}, info.rank, info.world_size, vae)
    restored = common.restore(common.latest_complete_checkpoint(), device)
    if restored is not None:
        trainee.restore(*restored)
    if info.rank == 0 and trainee.probe is None:
        trainee.take_probe()
    dcfg = spec.denoiser
    state.unet.train()
    loop.train(trainee, loop.Cadence(dcfg.steps, dcfg.report_every, dcfg.checkpoint_every), config, device=device,
               callbacks=config.get("callbacks", ()), restore=False)


def _load_vae(spec: Any, store: Any, device: torch.device) -> Any:
    from diffusers import AutoencoderKL

    if not spec.autoencoder_uri or not spec.autoencoder_sha256:
        return None  # latents without an autoencoder export (tests): no sample grids
    try:
        meta = ckpt.model_meta(spec.autoencoder_uri, store)
    except FileNotFoundError:
        return None
    if meta.get("sha256") != spec.autoencoder_sha256:
        log.warning("autoencoder at %s is not the one that encoded the latents; no sample grids", spec.autoencoder_uri)
        return None
    vae, _ = ckpt.load_exported(AutoencoderKL, spec.autoencoder_uri, store)
    return vae.to(device)
