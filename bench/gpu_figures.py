"""The GPU check's figures (:mod:`bench.areas.gpu` runs them): one function per group, each on a :class:`Setup`.

Each figure runs a stage's own per-worker step in plain PyTorch, so the check needs no Ray.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import torch

from bench.common import matmul_flops, plain_rate, sync, timed

log = logging.getLogger(__name__)

NUM_CLASSES = 9  # NCT-CRC-HE-100K, the paper's labeled set
GUIDE_STEPS, GUIDE_REPEATS = 10, 3


@dataclass
class Setup:
    """What every figure shares: the device, the config and the shapes taken from it."""

    small: bool
    device: torch.device
    cfg: Any  # HistodiffConfig
    latent: list[int]  # C, H, W
    tile: int  # autoencoder and backbone input side, pixels
    matmul_n: int
    guide_steps: int
    measured: str
    peak_flops: float | None = None
    figures: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def make_setup(small: bool) -> Setup:
    """Return the paper preset on CUDA, or with ``small`` the tiny preset (small batches) on the CPU."""
    from histodiff.config import load_config
    from histodiff.models.autoencoder import downsample_factor

    base = ["tracking.enabled=false", "denoiser.compile=false"]
    paper = load_config("paper", base)
    if small:
        device = torch.device("cpu")
        # The paper's backbone name (timm's ViT path), at a toy size that still resizes 32 -> 16 px.
        cfg = load_config("tiny", [*base, "denoiser.batch_size=8", "autoencoder.batch_size=4",
                                   "synthesis.batch_size=4", "evaluation.batch_size=4",
                                   f"evaluation.backbone={paper.evaluation.backbone}", "evaluation.image_size=16"])
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: run with --small for a CPU dry run")
        device, cfg = torch.device("cuda", torch.cuda.current_device()), paper
    tile = cfg.data.tile_size
    latent = [cfg.autoencoder.latent_channels, *[tile // downsample_factor(cfg.autoencoder)] * 2]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU --small dry run"
    measured = (f"{datetime.now(timezone.utc):%Y-%m-%d} {platform.machine()} {os.cpu_count()} CPUs {name} "
                f"(torch {torch.__version__})")
    return Setup(small, device, cfg, latent, tile, 256 if small else 8192, 3 if small else GUIDE_STEPS, measured)


def _figure(s: Setup, value: Any, unit: str, goal: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "goal": goal, "measured": s.measured}


def free(device: torch.device) -> None:
    """Release what the last figure left on the device and reset its peak-memory counter; return None."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _dtype(s: Setup) -> str:
    return "bf16" if s.device.type == "cuda" else "fp32"  # matmul_flops' choice


def _peak_gib(device: torch.device) -> str:
    return f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""


def halving(fn: Callable[[int], Any], batch: int, device: torch.device) -> tuple[Any, int]:
    """Return (fn(batch), batch), halving the batch after each CUDA out-of-memory error."""
    while True:
        try:
            return fn(batch), batch
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
        # Past the except block, so the failed attempt's tensors (held by the traceback) can be freed.
        log.warning("batch %d ran out of GPU memory; trying %d", batch, batch // 2)
        batch //= 2
        free(device)


def peak(s: Setup) -> dict[str, dict]:
    """The bf16 (fp32 on the CPU) matmul FLOP/s, best of two runs of :func:`bench.common.matmul_flops`."""
    s.peak_flops = max(matmul_flops(s.device, s.matmul_n) for _ in range(2))
    n_small = 128 if s.small else 2048  # the size the generative area takes its peak at
    at_small = matmul_flops(s.device, n_small)
    return {"gpu_bf16_matmul_tflops": _figure(
        s, round(s.peak_flops / 1e12, 3), "TFLOP/s",
        f"informational: {s.matmul_n}^3 {_dtype(s)} matmul, the MFU denominator (H200: 798); "
        f"{at_small / 1e12:.1f} TFLOP/s at {n_small}^3")}


def denoiser(s: Setup) -> dict[str, dict]:
    """The paper denoiser's train_step: samples/s, FLOPs per sample and MFU against :func:`peak`."""
    if s.peak_flops is None:
        s.peak_flops = matmul_flops(s.device, s.matmul_n)
    free(s.device)

    def attempt(b: int) -> tuple[float, float]:
        cfg = s.cfg.model_copy(deep=True)
        cfg.denoiser.batch_size = b
        return plain_rate(cfg, s.latent, s.device)

    (rate, flops_per_s), b = halving(attempt, s.cfg.denoiser.batch_size, s.device)
    per_sample = flops_per_s / rate
    shape = "x".join(map(str, s.latent))
    how = (f"batch {b}, {shape} latents, eager{_peak_gib(s.device)} "
           f"(the preset sets denoiser.compile=true: see mfu_gpu_compiled)")
    free(s.device)
    return {
        "mfu_gpu": _figure(s, round(flops_per_s / s.peak_flops, 3),
                           f"fraction of {s.matmul_n}^3 {_dtype(s)} matmul FLOP/s",
                           f"> 0.23 (H200 eager baseline); train.denoiser.train_step, {how}"),
        "gpu_denoiser_samples_per_s": _figure(s, round(rate, 1), "samples/s",
                                              f"informational (H200 baseline, eager, batch 64: 288); {how}"),
        "gpu_denoiser_train_flops_per_sample": _figure(s, round(per_sample / 1e9, 2), "GFLOP/sample",
                                                       "informational: forward + backward, torch.utils.flop_counter "
                                                       "(baseline UNet: 646)"),
    }


def autoencoder(s: Setup) -> dict[str, dict]:
    """The paper autoencoder's train_step (L1 + KL; the preset has no perceptual or GAN loss) on tiles."""
    from histodiff.train import autoencoder as tr

    ae = s.cfg.autoencoder
    free(s.device)

    def attempt(b: int) -> float:
        torch.manual_seed(s.cfg.seed)
        parts = tr.make_parts(ae, s.device)
        x = torch.rand(b, 3, s.tile, s.tile, device=s.device) * 2 - 1
        step = iter(range(10**9))
        return b / timed(lambda: tr.train_step(parts, x, next(step), ae, s.device), s.device)

    rate, b = halving(attempt, ae.batch_size, s.device)
    goal = f"informational; train.autoencoder.train_step, batch {b}, {s.tile} px{_peak_gib(s.device)}"
    free(s.device)
    return {"gpu_autoencoder_samples_per_s": _figure(s, round(rate, 1), "samples/s", goal)}


class _Bf16(torch.nn.Module):
    """Runs a module under the stages' autocast (a what-if for the guidance classifier)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.module, self.device = module, device

    def forward(self, *args: Any) -> torch.Tensor:
        from histodiff.runtime import autocast

        with autocast(self.device):
            return self.module(*args)


def guidance(s: Setup) -> dict[str, dict]:
    """Seconds per DDIM step guided vs unguided, best of interleaved repeats, as synthesis samples."""
    from histodiff.diffusion.guidance import classifier_grad_fn
    from histodiff.diffusion.sampling import ddim_sample
    from histodiff.diffusion.schedule import ddim_scheduler
    from histodiff.models.denoiser import build_unet
    from histodiff.runtime import autocast
    from histodiff.train.latent_classifier import build_classifier

    cfg, dev = s.cfg, s.device
    free(dev)
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg.denoiser, s.latent[0], s.latent[1]).to(dev).eval().requires_grad_(False)
    clf = build_classifier(cfg.classifier, s.latent[0], NUM_CLASSES).to(dev).eval().requires_grad_(False)
    b, syn = cfg.synthesis.batch_size, cfg.synthesis
    y = torch.full((b,), 0)
    variants = {"unguided": None, "guided": classifier_grad_fn(clf, y, syn.guidance_scale),
                "guided_bf16_classifier": classifier_grad_fn(_Bf16(clf, dev), y, syn.guidance_scale)}
    sched = ddim_scheduler(cfg.denoiser.schedule)

    def per_step(cond_fn: Any, steps: int) -> float:
        gens = [torch.Generator().manual_seed(i) for i in range(b)]
        sync(dev)
        start = time.perf_counter()
        ddim_sample(unet, sched, (b, *s.latent), gens, steps, syn.eta, cond_fn=cond_fn, device=dev,
                    autocast=autocast(dev))
        sync(dev)
        return (time.perf_counter() - start) / steps

    for fn in variants.values():
        per_step(fn, 2)  # warm-up: kernels, cuDNN choices
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(GUIDE_REPEATS):
        for name, fn in variants.items():  # interleaved: a burst of load hits all alike
            best[name] = min(best[name], per_step(fn, s.guide_steps))
    ratio = best["guided"] / best["unguided"]
    ms = {k: round(v * 1e3, 2) for k, v in best.items()}
    shape = "x".join(map(str, s.latent))
    how = (f"batch {b}, {shape} latents, {s.guide_steps}-step DDIM runs, best of {GUIDE_REPEATS}{_peak_gib(dev)}")
    del unet, clf, variants
    free(dev)
    return {
        "gpu_guided_vs_unguided_step_ratio": _figure(
            s, round(ratio, 3), "x", f"<= 1.7 (H200 baseline: 1.39); guided {ms['guided']} ms vs unguided "
            f"{ms['unguided']} ms per step, {how}"),
        "gpu_guided_step_ms": _figure(
            s, ms, "ms/step", "informational: guided_bf16_classifier runs the classifier's gradient under the "
            f"stages' bf16 autocast (ratio {best['guided_bf16_classifier'] / best['unguided']:.3f}); {how}"),
    }


def backbone(s: Setup) -> dict[str, dict]:
    """The downstream backbone's training step as fit_classifier runs it, and the model alone."""
    from histodiff.models.backbone import create_backbone
    from histodiff.train.backbone import AUGMENTATIONS, classifier_optimizer, resize, train_step

    e, dev = s.cfg.evaluation, s.device
    free(dev)

    def attempt(b: int) -> tuple[float, float]:
        torch.manual_seed(s.cfg.seed)
        gen = torch.Generator().manual_seed(s.cfg.seed)
        model = create_backbone(e.backbone, NUM_CLASSES, e.image_size).to(dev).train()
        opt = classifier_optimizer(model, e.lr, e.weight_decay)
        pool_x = torch.rand(2 * b, 3, s.tile, s.tile) * 2 - 1  # tiles in [-1, 1], on the CPU as evaluate keeps them
        pool_y = torch.arange(2 * b) % NUM_CLASSES
        weights = torch.ones(2 * b)
        augment = AUGMENTATIONS.get(e.augment)

        def loop_body() -> float:  # the body of fit_classifier's training loop
            idx = torch.randperm(len(pool_x), generator=gen)[:b]
            xb = pool_x[idx]
            if augment is not None:
                xb = augment(xb, gen)
            return train_step(model, opt, resize(xb.to(dev), e.image_size), pool_y[idx].to(dev),
                              weights[idx].to(dev))

        full = b / timed(loop_body, dev)
        on_dev = resize(pool_x[:b].to(dev), e.image_size), pool_y[:b].to(dev), weights[:b].to(dev)
        model_only = b / timed(lambda: train_step(model, opt, *on_dev), dev)
        return full, model_only

    (full, model_only), b = halving(attempt, e.batch_size, dev)
    goal = (f"informational; {e.backbone} (random init), batch {b}, {s.tile} px tiles -> {e.image_size} px, "
            f"'{e.augment}' augmentation on the CPU as fit_classifier does; the model alone (batch already on "
            f"the device): {model_only:.1f} samples/s{_peak_gib(dev)}")
    free(dev)
    return {"gpu_backbone_samples_per_s": _figure(s, round(full, 1), "samples/s", goal)}


def denoiser_compiled(s: Setup) -> dict[str, dict]:
    """The same train_step with the preset's ``denoiser.compile=true``; MFU from the eager FLOP count.

    With ``--small`` nothing is compiled (inductor takes minutes on a laptop CPU): a dry run of the path.
    """
    from histodiff.train import denoiser as tr

    flops = s.figures.get("gpu_denoiser_train_flops_per_sample")
    if flops is None or s.peak_flops is None:
        raise RuntimeError("run the 'peak' and 'denoiser' figures first (the FLOP count is the eager model's)")
    free(s.device)
    dcfg = s.cfg.denoiser.model_copy(update={"compile": not s.small})
    b = dcfg.batch_size
    state = tr.make_state(dcfg, s.latent, s.device, s.cfg.seed)
    batches = tr.in_memory_batches(torch.randn(b * 4, *s.latent, device=s.device), b, s.cfg.seed)
    start = time.perf_counter()
    tr.train_step(state, [next(batches)])  # compiles
    first = time.perf_counter() - start
    rate = b / timed(lambda: tr.train_step(state, [next(batches)]), s.device)
    how = (f"batch {b}, {'x'.join(map(str, s.latent))} latents, "
           f"{'torch.compile' if dcfg.compile else 'NOT compiled (--small)'}, first step {first:.0f} s"
           f"{_peak_gib(s.device)}")
    free(s.device)
    return {
        "mfu_gpu_compiled": _figure(s, round(rate * flops["value"] * 1e9 / s.peak_flops, 3),
                                    f"fraction of {s.matmul_n}^3 {_dtype(s)} matmul FLOP/s",
                                    f"informational (the baseline compiled in the same run: gpu_anchor.json "
                                    f"train_compiled_mfu); {how}"),
        "gpu_denoiser_compiled_samples_per_s": _figure(s, round(rate, 1), "samples/s", f"informational; {how}"),
    }


FIGURES: dict[str, Callable[[Setup], dict[str, dict]]] = {
    "peak": peak, "denoiser": denoiser, "autoencoder": autoencoder, "guidance": guidance, "backbone": backbone,
    "denoiser_compiled": denoiser_compiled,
}
