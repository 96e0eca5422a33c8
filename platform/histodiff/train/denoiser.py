"""Pretrain stage: the unconditional latent denoiser, Ray Train DDP on cached latents.

The steps are plain PyTorch (:func:`make_state`, :func:`train_step`, :func:`fit`), so a GPU
check runs them without Ray; :func:`train_loop` wraps them on each Ray Train worker with
streamed latents, periodic reports, checkpoints and resume; :func:`run` is the driver.
Global batch = ``batch_size`` x ``grad_accum`` x ``num_workers``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyarrow.fs as pafs
import torch
import torch.nn.functional as F

from histodiff import checkpoint as ckpt
from histodiff import storage, tracking
from histodiff.config import DenoiserConfig, HistodiffConfig, config_from_dict
from histodiff.diffusion.schedule import ddpm_scheduler
from histodiff.models import denoiser as dn
from histodiff.runtime import autocast, device_for, init_ray, prefetch_batches, set_worker_threads
from histodiff.train import common

log = logging.getLogger(__name__)

STAGE = "pretrain"
FAULT_ENV = "HISTODIFF_FAULT_INJECT"
PROBE_SIZE = 16


@dataclass
class PretrainResult:
    """The exported EMA denoiser, where training stopped, and how it went."""

    denoiser_uri: str
    sha256: str
    step: int
    final_loss: float | None
    probe_losses: list[list[float]] = field(default_factory=list)  # [step, loss on a fixed batch]
    samples_per_s: float | None = None
    run_uri: str = ""
    resumed_from: list[list[float]] = field(default_factory=list)  # [step, probe loss right after restore]
    skipped: bool = False


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
    optimizer = torch.optim.AdamW(unet.parameters(), lr=dcfg.lr, weight_decay=0.0, fused=device.type == "cuda")
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
    torch.nn.utils.clip_grad_norm_(state.unet.parameters(), 1.0)
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


def _maybe_inject_fault(spec: dict | None, rank: int, step: int) -> None:
    # Test hook (HISTODIFF_FAULT_INJECT="mode=kill,rank=1,step=5,marker=/tmp/x"): fires once.
    if not spec or int(spec.get("rank", 0)) != rank or int(spec["step"]) != step:
        return
    try:
        os.close(os.open(spec["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    log.warning("fault injection: %s at rank %d step %d", spec.get("mode", "kill"), rank, step)
    if spec.get("mode", "kill") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at rank {rank} step {step}")


def parse_fault_spec(text: str | None) -> dict | None:
    """Return the fault-injection spec parsed from ``key=value,...`` text, or None."""
    if not text:
        return None
    spec = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
    if "step" not in spec or "marker" not in spec:
        raise ValueError(f"{FAULT_ENV}={text!r} needs step=N and marker=PATH (and optionally rank=, mode=kill|raise)")
    return spec


def train_loop(config: dict) -> None:
    """Ray Train worker: stream latents, train with DDP, report, checkpoint, resume."""
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["cfg"])
    set_worker_threads(cfg)
    dcfg = cfg.denoiser
    info = common.worker_info()
    device = device_for(cfg.ray.use_gpu)
    state = make_state(dcfg, config["latent_shape"], device, cfg.seed, wrap=ray.train.torch.prepare_model)
    state.generator.manual_seed(cfg.seed * 1000 + info.rank)
    tracker = common.worker_tracker(config)
    batches = _shard_batches(ray.train.get_dataset_shard("train"), dcfg.batch_size, device)
    probe, probes, resumed, resumed_from = None, [], None, []
    restored = common.restore(common.latest_complete_checkpoint(), device)
    if restored is not None:
        tensors, st = restored
        if st.get("arch") != config["arch"]:
            raise ValueError(f"the checkpoint in run {common.run_name(cfg, STAGE)!r} was written for another "
                             "denoiser architecture or latent shape; use a new `name` or delete that run directory")
        load_state(state, tensors, st)
        probe, probes = tensors.get("probe", {}).get("latents"), st.get("probe_losses", [])
        # Fresh, deterministic noise after a restart rather than a replay of the pre-crash draws.
        state.generator.manual_seed(cfg.seed * 1000 + info.rank + 7919 * state.step)
    if info.rank == 0 and probe is None:
        # Peek, don't consume: every rank must draw the same number of batches per epoch, or
        # the streaming split and DDP's all-reduce wait on each other forever.
        first = next(batches)
        batches = itertools.chain([first], batches)
        probe = first[:PROBE_SIZE].detach().cpu().clone()
        probes = [[0, probe_loss(state, probe)]]
    if info.rank == 0 and restored is not None:
        resumed = probe_loss(state, probe)
        resumed_from = [*restored[1].get("resumed_from", []), [state.step, resumed]]
        log.info("resumed at step %d (probe loss %.4f)", state.step, resumed)
    vae = _load_vae(cfg, config) if info.rank == 0 else None
    fault = config.get("fault_inject")
    window: list[float] = []
    t0, seen = time.perf_counter(), 0
    per_step = dcfg.batch_size * dcfg.grad_accum * info.world_size

    def on_step(s: TrainState, loss: float) -> None:
        nonlocal t0, seen
        window.append(loss)
        seen += per_step
        _maybe_inject_fault(fault, info.rank, s.step)
        done = s.step >= dcfg.steps
        save = s.step % dcfg.checkpoint_every == 0 or done
        if not save and s.step % dcfg.report_every != 0:
            return
        metrics = {"loss": sum(window) / len(window), "lr": s.optimizer.param_groups[0]["lr"],
                   "samples_per_s": seen / max(time.perf_counter() - t0, 1e-9)}
        if resumed is not None:
            metrics["resume_probe_loss"] = resumed
        window.clear()
        if info.rank == 0 and vae is not None and (s.step % dcfg.sample_every == 0 or done):
            tracker.log_image(dn.sample_grid(s.unet, s.ema, vae, config["scale_factor"], dcfg.schedule, device,
                                             seed=cfg.seed),
                              f"samples/step_{s.step:07d}.png")
        if save:
            tensors, st = state_tensors(s)
            st.update(arch=config["arch"], fingerprint=config["fingerprint"], resumed_from=resumed_from)
            if info.rank == 0:
                probes.append([s.step, probe_loss(s, probe)])
                metrics["probe_loss"] = probes[-1][1]
                tensors["probe"] = {"latents": probe}
                st["probe_losses"] = probes
            tracker.log_metrics(metrics, step=s.step)
            common.report(metrics, s.step, tensors, st, config)
        else:
            tracker.log_metrics(metrics, step=s.step)
            common.report(metrics, s.step, loop_config=config)
        t0, seen = time.perf_counter(), 0

    fit(state, batches, dcfg.steps, on_step)


def _load_vae(cfg: HistodiffConfig, config: dict) -> Any:
    from diffusers import AutoencoderKL

    try:
        meta = ckpt.model_meta(cfg.paths.autoencoder, cfg.storage)
    except (FileNotFoundError, storage.StorageError):
        return None  # no autoencoder export (unit tests): no sample grids
    if meta.get("sha256") != config.get("autoencoder_sha256"):
        log.warning("autoencoder at %s is not the one that encoded the latents; no sample grids", cfg.paths.autoencoder)
        return None
    vae, _ = ckpt.load_exported(AutoencoderKL, cfg.paths.autoencoder, cfg.storage)
    return vae.to(device_for(cfg.ray.use_gpu))


# ----------------------------------------------------------------------------- driver


def fingerprints(cfg: HistodiffConfig, latents_meta: dict) -> tuple[str, str]:
    """Return (export fingerprint: everything that shapes the weights, architecture fingerprint)."""
    d = cfg.public_dict()["denoiser"]
    arch_keys = ("block_out_channels", "layers_per_block", "attention_levels", "attention_head_dim", "norm_num_groups")
    arch = {k: d[k] for k in arch_keys} | {"shape": latents_meta["shape"]}
    full = {"denoiser": d, "seed": cfg.seed, "num_workers": cfg.ray.num_workers, "latents": {
        k: latents_meta.get(k) for k in ("shape", "scale_factor", "autoencoder_sha256", "num_latents")}}
    return storage.sha256_bytes(repr(sorted(full.items())).encode())[:16], storage.sha256_bytes(repr(arch).encode())[:16]


def _check_inputs(cfg: HistodiffConfig) -> dict:
    from histodiff.data.encode import read_latents_meta

    meta = read_latents_meta(cfg.paths.latents, cfg.storage)
    c, h, w = meta["shape"]
    if h != w:
        raise ValueError(f"latents at {cfg.paths.latents!r} are {h}x{w}; the denoiser needs square latents")
    dn.check_latent_shape(cfg.denoiser, h)
    need = cfg.denoiser.batch_size * cfg.ray.num_workers
    if meta["num_latents"] < need:
        raise ValueError(f"{cfg.paths.latents!r} holds {meta['num_latents']} latents, fewer than one batch per "
                         f"worker ({cfg.denoiser.batch_size} x {cfg.ray.num_workers}); lower denoiser.batch_size")
    return meta


def _export(cfg: HistodiffConfig, meta: dict, fingerprint: str) -> tuple[str, int, dict]:
    import ray.train

    path, fs, _ = common.storage_path_and_fs(cfg)
    found = common.list_complete_checkpoints(fs or pafs.LocalFileSystem(), f"{path}/{common.run_name(cfg, STAGE)}")
    if not found:
        raise RuntimeError(f"pretraining left no complete checkpoint in {common.run_uri(cfg, STAGE)!r}")
    step, ck_path = found[-1]
    if step < cfg.denoiser.steps:
        raise RuntimeError(f"the newest complete checkpoint is at step {step}, short of denoiser.steps="
                           f"{cfg.denoiser.steps}; rerun with the same config to resume")
    tensors, st = common.restore(ray.train.Checkpoint(path=ck_path, filesystem=fs) if fs else ck_path)
    unet = dn.build_unet(cfg.denoiser, meta["shape"][0], meta["shape"][1])
    unet.load_state_dict({**tensors["model"], **tensors["ema"]})  # EMA weights are the ones sampled from
    sha = ckpt.export_model(unet, cfg.paths.denoiser, {
        "kind": "denoiser", "autoencoder_sha256": meta.get("autoencoder_sha256"), "scale_factor": meta["scale_factor"],
        "latent_shape": meta["shape"], "step": step, "fingerprint": fingerprint, "probe_losses": st.get("probe_losses"),
        "num_parameters": dn.count_parameters(unet)}, cfg.storage)
    return sha, step, st


def run(cfg: HistodiffConfig) -> PretrainResult:
    """Pretrain the denoiser on cached latents (resuming its run), export the EMA UNet; skip if done."""
    from histodiff.data.encode import latent_dataset
    from histodiff.data.readers import rows_per_pass

    meta = _check_inputs(cfg)
    fingerprint, arch = fingerprints(cfg, meta)
    fault = parse_fault_spec(os.environ.get(FAULT_ENV))
    with contextlib.suppress(FileNotFoundError, storage.StorageError):
        done = ckpt.model_meta(cfg.paths.denoiser, cfg.storage)
        if done.get("fingerprint") == fingerprint:
            log.info("denoiser at %s is up to date (step %s); skipping", cfg.paths.denoiser, done.get("step"))
            return PretrainResult(cfg.paths.denoiser, done["sha256"], done["step"], None,
                                  done.get("probe_losses") or [], run_uri=common.run_uri(cfg, STAGE), skipped=True)
    init_ray(cfg)
    with tracking.stage_run(cfg, STAGE, params={"latents.num": meta["num_latents"]}) as tracker:
        loop_config = {"cfg": cfg.public_dict(), "latent_shape": meta["shape"], "scale_factor": meta["scale_factor"],
                       "autoencoder_sha256": meta.get("autoencoder_sha256"), "fingerprint": fingerprint,
                       "arch": arch, "fault_inject": fault, **common.tracking_loop_config(tracker)}
        rows = rows_per_pass(cfg, cfg.denoiser.batch_size, cfg.denoiser.grad_accum)
        trainer = common.build_trainer(cfg, train_loop, loop_config, STAGE,
                                       datasets={"train": latent_dataset(cfg.paths.latents, cfg, rows_per_pass=rows)})
        result = trainer.fit()
        sha, step, st = _export(cfg, meta, fingerprint)
        metrics = result.metrics or {}
        tracker.set_tags({"denoiser.sha256": sha, "denoiser.uri": cfg.paths.denoiser})
    return PretrainResult(cfg.paths.denoiser, sha, step, metrics.get("loss"), st.get("probe_losses") or [],
                          metrics.get("samples_per_s"), common.run_uri(cfg, STAGE), st.get("resumed_from") or [])
