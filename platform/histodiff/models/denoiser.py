"""The unconditional latent denoiser (diffusers UNet2DModel) and its EMA weights.

Paper setting (Ye et al. 2023, after LDM): 64x64x3 latents, 192 base channels, mult
(1, 2, 2, 4, 4), 2 res blocks, attention at the lower-resolution levels, scale-shift norm,
epsilon prediction; EMA weights are the ones used for sampling.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel

from histodiff.config import DenoiserConfig, ScheduleConfig


def check_latent_shape(cfg: DenoiserConfig, latent_size: int) -> None:
    """Raise a clear ValueError unless the UNet's levels fit latents of this size."""
    levels = len(cfg.block_out_channels)
    if latent_size % (2 ** (levels - 1)) != 0:
        raise ValueError(
            f"denoiser.block_out_channels has {levels} levels, so latents must be divisible by "
            f"{2 ** (levels - 1)}; got latent_size={latent_size}. Use fewer levels or larger tiles."
        )
    if any(c % cfg.norm_num_groups for c in cfg.block_out_channels):
        raise ValueError(f"denoiser.block_out_channels {cfg.block_out_channels} must all be divisible by "
                         f"denoiser.norm_num_groups={cfg.norm_num_groups}")


def build_unet(cfg: DenoiserConfig, latent_channels: int, latent_size: int) -> UNet2DModel:
    """Return a randomly initialised UNet2DModel for ``latent_channels`` x ``latent_size``^2 latents."""
    check_latent_shape(cfg, latent_size)
    down = [("AttnDownBlock2D" if attn else "DownBlock2D") for attn in cfg.attention_levels]
    up = [("AttnUpBlock2D" if attn else "UpBlock2D") for attn in reversed(cfg.attention_levels)]
    return UNet2DModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        resnet_time_scale_shift="scale_shift",  # the paper's "scale-shift norm" (FiLM on GroupNorm)
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Return the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_ema(model: torch.nn.Module, decay: float) -> EMAModel:
    """Return an EMA tracker of a model's parameters (diffusers EMAModel; early steps warm up)."""
    return EMAModel(model.parameters(), decay=decay, foreach=True)  # one fused update, not one per tensor


def ema_tensors(model: torch.nn.Module, ema: EMAModel) -> dict[str, torch.Tensor]:
    """Return the EMA weights keyed by the model's parameter names (for safetensors)."""
    names = [n for n, _ in model.named_parameters()]
    return {n: p.detach() for n, p in zip(names, ema.shadow_params)}


def load_ema_tensors(model: torch.nn.Module, ema: EMAModel, tensors: dict[str, torch.Tensor], ema_step: int) -> None:
    """Load EMA weights saved by :func:`ema_tensors` into ``ema``."""
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"EMA checkpoint lacks {len(missing)} parameters (first: {missing[0]!r}); "
                         "was it written for another denoiser architecture?")
    for shadow, name in zip(ema.shadow_params, names):
        shadow.data.copy_(tensors[name].to(shadow.device, shadow.dtype))
    ema.optimization_step = ema_step


def ema_model(model: UNet2DModel, ema: EMAModel) -> UNet2DModel:
    """Return a fresh UNet2DModel (same config) holding the EMA weights, in eval mode."""
    copy = UNet2DModel.from_config(model.config)
    ema.copy_to(copy.parameters())
    return copy.eval()


@torch.no_grad()
def sample_grid(unet: UNet2DModel, ema: EMAModel, vae: torch.nn.Module, scale_factor: float,
                schedule_cfg: ScheduleConfig, device: torch.device, n: int = 16, steps: int = 25,
                seed: int = 0) -> np.ndarray:
    """Return an HWC uint8 grid of ``n`` unconditional DDIM samples from the EMA weights, decoded."""
    from torchvision.utils import make_grid

    from histodiff.diffusion.sampling import ddim_sample
    from histodiff.diffusion.schedule import ddim_scheduler

    model = ema_model(unet, ema).to(device)
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    z = ddim_sample(model, ddim_scheduler(schedule_cfg), shape, torch.Generator().manual_seed(seed), steps,
                    eta=1.0, device=device)
    x = vae.decode(z / scale_factor).sample.float().clamp(-1, 1)
    grid = make_grid((x + 1) / 2, nrow=max(1, int(n**0.5)))
    return (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
