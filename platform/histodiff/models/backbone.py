"""Pixel-space classifiers from timm: the downstream model and the selector's backbone."""

from __future__ import annotations

import torch
from torch import nn


def check_backbone_name(name: str) -> None:
    """Raise a clear ValueError (with similar names) unless timm knows the model ``name``."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        raise ValueError(f"timm has no model named {name!r} (evaluation.backbone / selector.backbone); "
                         f"similar names: {close or 'none'}")


def create_backbone(name: str, num_classes: int, image_size: int) -> nn.Module:
    """Return a randomly initialised timm model with ``num_classes`` outputs (nothing is downloaded)."""
    import timm

    check_backbone_name(name)
    kwargs = {}
    if any(name.startswith(p) for p in ("vit", "deit", "eva", "beit")):
        kwargs["img_size"] = image_size
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Return the pre-logit features of a timm model for a batch (no grad)."""
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True)
