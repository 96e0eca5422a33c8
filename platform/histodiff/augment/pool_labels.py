"""Labels from the pool: the pretrained denoiser's features, and kNN label propagation from the few labels.

An unconditional denoiser trained on the pool is also a representation learner (DDAE, Xiang et
al., ICCV 2023: linear probes on its features at a small timestep rival self-supervised models).
:func:`denoiser_features` reads its down and mid blocks' activations at timestep ``t`` (fixed
noise per seed), pooled over space and L2-normalised. :func:`propagate` labels every pool tile by
a similarity-weighted vote of its ``k`` nearest labeled tiles in that space, and
:func:`most_confident` keeps the most confident per class (DPT, You et al., NeurIPS 2023:
pseudo-labels from few labels feeding a generator). Tensors in, tensors out.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


@torch.no_grad()
def denoiser_features(unet: Any, latents: torch.Tensor, timestep: int, seed: int = 0,
                      batch_size: int = 256) -> torch.Tensor:
    """Return (N, D) L2-normalised features: the UNet's down-block and mid-block outputs at ``timestep``, pooled."""
    from histodiff.diffusion.schedule import ddpm_scheduler
    from histodiff.config import ScheduleConfig

    blocks = [*unet.down_blocks, unet.mid_block]
    taps: list[torch.Tensor] = []

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        taps.append((output[0] if isinstance(output, tuple) else output).float().mean(dim=(-2, -1)))

    handles = [b.register_forward_hook(hook) for b in blocks]
    device = next(unet.parameters()).device
    schedule = ddpm_scheduler(ScheduleConfig(num_train_timesteps=unet.config.get("num_train_timesteps") or 1000))
    gen = torch.Generator().manual_seed(seed)
    out = []
    try:
        unet.eval()
        for i in range(0, len(latents), batch_size):
            z0 = latents[i : i + batch_size].float()
            t = torch.full((len(z0),), int(timestep), dtype=torch.long)
            z_t = schedule.add_noise(z0, torch.randn(z0.shape, generator=gen), t) if timestep > 0 else z0
            taps.clear()
            unet(z_t.to(device), t.to(device))
            # Each tap normalised on its own, so no block dominates by scale; then the whole vector.
            out.append(F.normalize(torch.cat([F.normalize(v, dim=-1) for v in taps], dim=-1), dim=-1).cpu())
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out) if out else torch.zeros(0, 0)


def propagate(labeled: torch.Tensor, labels: torch.Tensor, pool: torch.Tensor, num_classes: int, k: int = 10,
              temperature: float = 0.05) -> torch.Tensor:
    """Return (N_pool, K) class probabilities: a vote of each pool row's ``k`` nearest labeled rows (cosine),
    weighted by ``exp(similarity / temperature)``."""
    k = min(k, len(labeled))
    sims = pool.float() @ labeled.float().T
    top, idx = sims.topk(k, dim=1)
    votes = torch.zeros(len(pool), num_classes)
    votes.scatter_add_(1, labels[idx].long(), torch.exp((top - top[:, :1]) / temperature))
    return votes / votes.sum(1, keepdim=True)


def most_confident(probs: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (indices, labels, confidence) of up to ``per_class`` most confident rows per predicted class."""
    conf, label = probs.max(1)
    picked = []
    for c in range(probs.shape[1]):
        idx = torch.nonzero(label == c).flatten()
        picked.append(idx[conf[idx].argsort(descending=True)[:per_class]])
    idx = torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)
    return idx, label[idx], conf[idx]
