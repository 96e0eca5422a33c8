"""Classifier guidance: the gradient closure and the epsilon correction (tensors in, tensors out).

As in guided-diffusion's ``classifier_sample.py``, the sampler takes a ``cond_fn(z_t, t)`` and
never knows about classifiers. With DDIM (Dhariwal & Nichol 2021, eq. 14; METHOD.md):

    eps' = eps - sqrt(1 - alpha_bar_t) * cond,   cond = s * grad_z log p(y | z_t, t)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CondFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def classifier_grad_fn(classifier: nn.Module, y: torch.Tensor | int, scale: float) -> CondFn:
    """Return cond_fn(z_t, t) -> scale * grad_z log softmax(classifier(z_t, t))[y]."""
    if scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")

    def cond_fn(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 0:
            # No classifier work at all: scale 0 must be exactly the unguided sampler.
            return torch.zeros_like(z_t)
        target = torch.as_tensor(y, device=z_t.device, dtype=torch.long)
        if target.ndim == 0:
            target = target.expand(z_t.shape[0])
        with torch.enable_grad():
            z = z_t.detach().float().requires_grad_(True)
            logits = classifier(z, t).float()
            # Sum over the batch: each sample's gradient only depends on its own log-prob.
            selected = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum()
            grad = torch.autograd.grad(selected, z)[0]
        return (scale * grad).to(z_t.dtype)

    return cond_fn


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """Return alpha_bar at the train-schedule timestep ``t`` (indexed by t itself, any step count)."""
    return alphas_cumprod[int(t)]


def guided_eps(eps: torch.Tensor, cond: torch.Tensor, alpha_bar_t: torch.Tensor | float) -> torch.Tensor:
    """Return eps - sqrt(1 - alpha_bar_t) * cond (the classifier-guided noise prediction)."""
    sigma = torch.as_tensor(1.0 - alpha_bar_t, dtype=torch.float32).sqrt().to(device=eps.device, dtype=eps.dtype)
    return eps - sigma * cond
