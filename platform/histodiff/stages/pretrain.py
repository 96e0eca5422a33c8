"""Stage ``pretrain``: the unconditional latent denoiser, Ray Train DDP on the cached latents.

The worker side is :mod:`histodiff.train.denoiser` (plain-PyTorch steps in the one loop
skeleton); this module builds the TorchTrainer, streams the latents, and exports the EMA UNet
from the final checkpoint. The Ray Train run (its checkpoints) is named after everything that
shapes the weights except the step count and the cadences, so raising ``denoiser.steps``
continues the same run, while any other change starts a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from histodiff import checkpoint as ckpt
from histodiff.config import DenoiserConfig, HistodiffConfig
from histodiff.data.encode import LatentsRef, latent_dataset, latents_ref
from histodiff.data.readers import ReadSpec, read_spec, rows_per_pass
from histodiff.models import denoiser as dn
from histodiff.runner import Context, Spec as StageSpec, StageResult
from histodiff.storage import Store
from histodiff.train import common
from histodiff.train.denoiser import train_loop

log = logging.getLogger(__name__)

VERSION = 1
MODELS = {"denoiser": "denoiser_uri"}
_CADENCE = {"steps", "report_every", "checkpoint_every", "sample_every"}


class Spec(StageSpec):
    """The denoiser recipe, its latents (by content), the global batch's workers, the read order."""

    denoiser: DenoiserConfig
    seed: int
    num_workers: int
    latents: LatentsRef
    autoencoder_uri: str | None
    autoencoder_sha256: str | None
    read: ReadSpec


@dataclass
class Result(StageResult):
    """The exported EMA denoiser, where training stopped, and how it went."""

    denoiser_uri: str
    sha256: str
    step: int
    final_loss: float | None
    probe_losses: list[list[float]] = field(default_factory=list)  # [step, loss on a fixed batch]
    samples_per_s: float | None = None
    run_uri: str = ""
    resumed_from: list[list[float]] = field(default_factory=list)  # [step, probe loss right after restore]


def spec(cfg: HistodiffConfig, store: Store) -> Spec:
    """Return the pretrain spec after checking the latents fit the UNet and one batch per worker."""
    latents = latents_ref(cfg.paths.latents, store)
    c, h, w = latents.shape
    if h != w:
        raise ValueError(f"latents at {cfg.paths.latents!r} are {h}x{w}; the denoiser needs square latents")
    dn.check_latent_shape(cfg.denoiser, h)
    need = cfg.denoiser.batch_size * cfg.ray.num_workers
    if latents.num_latents < need:
        raise ValueError(f"{cfg.paths.latents!r} holds {latents.num_latents} latents, fewer than one batch per "
                         f"worker ({cfg.denoiser.batch_size} x {cfg.ray.num_workers}); lower denoiser.batch_size")
    return Spec(output_uri=cfg.paths.denoiser, denoiser=cfg.denoiser, seed=cfg.seed, num_workers=cfg.ray.num_workers,
                latents=latents, autoencoder_uri=cfg.paths.autoencoder, autoencoder_sha256=latents.autoencoder_sha256,
                read=read_spec(cfg))


def run_name(spec: Spec, name: str) -> str:
    """Return the Ray Train run name: the run's name plus a hash of the spec without steps and cadences."""
    data = spec.model_dump(mode="json", exclude={"output_uri": True, "denoiser": _CADENCE})
    return f"{name}-pretrain-{hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]}"


def _arch(spec: Spec) -> str:
    d = spec.denoiser
    arch = {"channels": d.block_out_channels, "layers": d.layers_per_block, "attention": d.attention_levels,
            "head_dim": d.attention_head_dim, "groups": d.norm_num_groups, "shape": spec.latents.shape}
    return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]


def work(spec: Spec, ctx: Context) -> Result:
    """Pretrain (resuming the same run), then export the EMA UNet of the final checkpoint."""
    dcfg, run = spec.denoiser, run_name(spec, ctx.name)
    loop_config = {"spec": spec, "store": ctx.store, "latent_shape": spec.latents.shape,
                   "scale_factor": spec.latents.scale_factor, "arch": _arch(spec)}
    rows = rows_per_pass(spec.read, dcfg.batch_size, spec.num_workers, dcfg.grad_accum)
    data = latent_dataset(spec.latents.uri, ctx.store, spec.read, rows_per_pass=rows)
    fit = common.build_trainer(ctx, train_loop, loop_config, run, datasets={"train": data}).fit()
    tensors, st = common.final_checkpoint(ctx.checkpoints_uri, run, ctx.store, dcfg.steps, "denoiser")
    unet = dn.build_unet(dcfg, spec.latents.shape[0], spec.latents.shape[1])
    unet.load_state_dict({**tensors["model"], **tensors["ema"]})  # EMA weights are the ones sampled from
    sha = ckpt.export_model(unet, spec.output_uri, {
        "kind": "denoiser", "autoencoder_sha256": spec.autoencoder_sha256, "scale_factor": spec.latents.scale_factor,
        "latent_shape": spec.latents.shape, "step": int(st["step"]), "probe_losses": st.get("probe_losses"),
        "num_parameters": dn.count_parameters(unet)}, ctx.store)
    ctx.tracker.set_tags({"denoiser.sha256": sha, "denoiser.uri": spec.output_uri})
    metrics = fit.metrics or {}
    return Result(spec.output_uri, sha, int(st["step"]), metrics.get("loss"), st.get("probe_losses") or [],
                  metrics.get("samples_per_s"), ctx.run_uri(run),
                  st.get("resumed_from") or [])
