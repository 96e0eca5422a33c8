"""Guided DDIM sampling in latent space on diffusers' DDIMScheduler (tensors in, tensors out).

Any step count and eta. The initial latents and every step's noise are drawn from one CPU
``torch.Generator`` (or one per sample), so a seed gives the same samples on any device and whatever the
guidance; ``cond_fn=None`` (or a zero-scale cond_fn) is exactly the unguided sampler.

Anchored sampling (SDEdit, Meng et al. ICLR 2022; DA-Fusion, Trabucco et al. ICLR 2024): with
``anchors`` and ``strength`` < 1, each sample starts from its anchor's latent noised to the
timestep ``strength`` of the way up the schedule and runs only the remaining DDIM steps, so it
is a variant of the anchor (strength 0.5: the anchor's layout, new detail from the prior). Strength
1 ignores the anchors: the pure-noise sampler, draw for draw.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from histodiff.diffusion.guidance import CondFn, alpha_bar_at, guided_eps


def _randn(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample")
    # One generator per sample: a tile depends on its own seed only, not on its batch.
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator])


@torch.no_grad()
def ddim_sample(
    unet: Any,
    scheduler: DDIMScheduler,
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator],
    num_inference_steps: int,
    eta: float = 1.0,
    cond_fn: CondFn | None = None,
    progress: bool = False,
    device: torch.device | str = "cpu",
    autocast: Any = None,
    anchors: torch.Tensor | None = None,
    strength: float = 1.0,
) -> torch.Tensor:
    """Return (N, C, H, W) scaled latents sampled with DDIM, classifier-guided when ``cond_fn`` is given.

    ``generator`` is one CPU generator for the batch or one per sample (then each sample
    depends only on its own seed). With ``anchors`` (N, C, H, W scaled latents) and ``strength``
    in (0, 1), sampling starts from the anchors noised to the first of the last
    ``round(strength * num_inference_steps)`` timesteps (no step left: the anchors themselves).
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    device = torch.device(device)
    # A private copy: set_timesteps mutates the scheduler, and callers may share one.
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(num_inference_steps)
    alphas_cumprod = scheduler.alphas_cumprod
    timesteps = scheduler.timesteps
    z = _randn(shape, generator).to(device)
    if anchors is not None and strength < 1.0:
        keep = int(round(strength * num_inference_steps))
        timesteps = timesteps[len(timesteps) - keep:] if keep else timesteps[:0]
        if not len(timesteps):
            return anchors.to(device).float()
        # z_t = sqrt(ab_t) z_0 + sqrt(1 - ab_t) eps at the first remaining step, eps from the sample's own seed
        z = scheduler.add_noise(anchors.to(device).float(), z, timesteps[:1].to(device).expand(shape[0]))
    for t in tqdm(timesteps, desc="ddim", disable=not progress, leave=False):
        t_dev = t.to(device)
        if autocast is not None:
            with autocast:
                eps = unet(z, t_dev).sample.float()
        else:
            eps = unet(z, t_dev).sample.float()
        if cond_fn is not None:
            # alpha_bar of the actual train timestep t (never a step index: the reference's t//20 bug).
            eps = guided_eps(eps, cond_fn(z, t_dev), alpha_bar_at(alphas_cumprod, t))
        noise = _randn(shape, generator).to(device) if eta > 0 else None
        z = scheduler.step(eps, t, z, eta=eta, variance_noise=noise).prev_sample
    return z
