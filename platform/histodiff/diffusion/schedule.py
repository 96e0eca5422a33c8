"""Noise schedules from diffusers, built from one ScheduleConfig so training and sampling agree."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler

from histodiff.config import ScheduleConfig


def ddpm_scheduler(cfg: ScheduleConfig) -> DDPMScheduler:
    """Return the training scheduler (epsilon prediction; paper: scaled_linear 0.0015..0.0155, T=1000)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
    )


def ddim_scheduler(cfg: ScheduleConfig) -> DDIMScheduler:
    """Return a DDIM sampler over the same betas as :func:`ddpm_scheduler` (diffusers' from_config)."""
    return DDIMScheduler.from_config(ddpm_scheduler(cfg).config, set_alpha_to_one=False, timestep_spacing="leading")
