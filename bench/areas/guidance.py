"""Classifier guidance on the toy setup (:mod:`bench.toys`): step cost, acceptance rate, guidance precision."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import torch

from bench.toys import (TOY_CLASSES, TOY_SHAPE, toy_classifier, toy_judge, toy_latents, toy_schedule, train_toy_unet,
                        write_toy_inputs)
from histodiff.diffusion.schedule import ddim_scheduler, ddpm_scheduler


def _measured() -> str:
    import os
    import platform

    return f"{datetime.now(timezone.utc):%Y-%m-%d} {platform.machine()} {os.cpu_count()} CPUs (torch {torch.__version__})"


def step_ratio(batch_size: int = 32, steps: int = 10, repeats: int = 3) -> tuple[float, float, float]:
    """Return (guided s/step, unguided s/step, ratio) at the tiny preset's sizes (8x8x3 latents), best of repeats."""
    from histodiff.config import load_config
    from histodiff.diffusion.guidance import classifier_grad_fn
    from histodiff.diffusion.sampling import ddim_sample
    from histodiff.models.denoiser import build_unet
    from histodiff.train.latent_classifier import build_classifier

    cfg = load_config("tiny")
    torch.manual_seed(0)
    unet = build_unet(cfg.denoiser, 3, 8).eval().requires_grad_(False)
    clf = build_classifier(cfg.classifier, 3, 3).eval().requires_grad_(False)
    sched = ddim_scheduler(cfg.denoiser.schedule)
    shape = (batch_size, 3, 8, 8)
    cond = classifier_grad_fn(clf, torch.zeros(batch_size, dtype=torch.long), cfg.synthesis.guidance_scale)
    best = {"guided": float("inf"), "unguided": float("inf")}
    for _ in range(repeats):
        # Interleaved, so a burst of load on a shared machine hits both alike.
        for name, fn in (("unguided", None), ("guided", cond)):
            t0 = time.perf_counter()
            ddim_sample(unet, sched, shape, torch.Generator().manual_seed(0), steps, 1.0, cond_fn=fn)
            best[name] = min(best[name], (time.perf_counter() - t0) / steps)
    return best["guided"], best["unguided"], best["guided"] / best["unguided"]


def run(workdir: str, unet_steps: int = 250, classifier_steps: int = 200, ratio_repeats: int = 3,
        accepted_per_class: int = 8, max_samples_per_class: int = 32) -> dict[str, dict]:
    """Return the guidance benchmark: step-cost ratio, accepted tiles/s and guided vs unguided precision.

    The keyword arguments keep their defaults for the benchmark; the tests' tiny run lowers them.
    """
    import os
    import shutil

    import ray

    from histodiff.runner import run_stage
    from histodiff.stages import selector, synthesize

    measured = _measured()
    guided_s, unguided_s, ratio = step_ratio(repeats=ratio_repeats)
    torch.manual_seed(0)
    unet = train_toy_unet(steps=unet_steps, seed=0)
    clf = toy_classifier()
    from histodiff.train.latent_classifier import fit_latent_classifier

    z, y = toy_latents(600, seed=1)
    fit_latent_classifier(clf, z, y, ddpm_scheduler(toy_schedule()), mode="noisy", max_timestep=None,
                          steps=classifier_steps, batch_size=64, lr=2e-3, weight_decay=0.0, seed=0)
    precision = {}
    for scale in (0.0, 3.0):
        from histodiff.diffusion.guidance import classifier_grad_fn
        from histodiff.diffusion.sampling import ddim_sample

        yy = torch.arange(TOY_CLASSES).repeat_interleave(32)
        cond = classifier_grad_fn(clf, yy, scale) if scale > 0 else None
        zz = ddim_sample(unet, ddim_scheduler(toy_schedule()), (len(yy), *TOY_SHAPE), torch.Generator().manual_seed(7),
                         20, 1.0, cond_fn=cond)
        precision[scale] = float((toy_judge(zz) == yy).float().mean())
    bench_dir = os.path.join(workdir, "guidance-bench")
    shutil.rmtree(bench_dir, ignore_errors=True)  # a finished earlier run would be skipped, timing nothing
    cfg = write_toy_inputs(bench_dir, unet=unet, classifier=clf)
    cfg.synthesis.accepted_per_class = accepted_per_class
    cfg.synthesis.max_samples_per_class = max_samples_per_class
    cfg.synthesis.batch_size = 8
    cfg.synthesis.num_inference_steps = 20
    cfg.synthesis.guidance_scale = 3.0
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    try:
        run_stage(selector, cfg)  # trains and exports the selector (not timed)
        result = run_stage(synthesize, cfg)  # its seconds: the whole stage, actor start included
    finally:
        if started:
            ray.shutdown()
    accepted = sum(result.accepted.values())
    entry = lambda value, unit, goal: {"value": value, "unit": unit, "goal": goal, "measured": measured}  # noqa: E731
    return {
        "guided_vs_unguided_step_ratio": entry(round(ratio, 3), "x", "<= 1.7 on CPU at the tiny preset "
                                               f"(guided {guided_s * 1e3:.1f} ms vs unguided {unguided_s * 1e3:.1f} "
                                               "ms per DDIM step, batch 32, 8x8x3 latents)"),
        "accepted_tiles_per_s": entry(round(accepted / max(result.seconds, 1e-9), 3), "tiles/s",
                                      f"higher is better; toy 3-class run, {accepted} accepted of "
                                      f"{sum(result.generated.values())} generated, 20 DDIM steps, incl. actor start"),
        # guidance_precision_* (no prefix) come from the validation benchmark's MNIST data.
        "toy_guidance_precision_guided": entry(precision[3.0], "fraction", "toy latents: guided (s=3) samples judged "
                                               "as their target class by a rule judge; well above unguided"),
        "toy_guidance_precision_unguided": entry(precision[0.0], "fraction", "toy latents: unguided rate (about 1/3)"),
    }
