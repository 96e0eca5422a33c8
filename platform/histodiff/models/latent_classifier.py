"""Time-conditioned latent classifier: the encoder half of a UNet with a pooling head.

It predicts the class of a noisy latent ``z_t`` at diffusion timestep ``t`` (guided-diffusion's
``EncoderUNetModel``, METHOD.md "latent classifier"), built from diffusers blocks so that it
saves and loads with ``save_pretrained`` / ``from_pretrained`` (and so with
``histodiff.checkpoint.export_model``).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import get_down_block
from torch import nn


class AttentionPool(nn.Module):
    """Pools a feature map with one learned query over all positions (multi-head attention)."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, channels))
        self.attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Return (N, C) pooled features from an (N, C, H, W) map."""
        tokens = h.flatten(2).transpose(1, 2)
        # The mean token plus a learned offset as the query: starts as mean pooling, learns where to look.
        query = tokens.mean(1, keepdim=True) + self.query
        pooled, _ = self.attn(query, tokens, tokens, need_weights=False)
        return pooled[:, 0]


class LatentClassifier(ModelMixin, ConfigMixin):
    """Classifier p(y | z_t, t) on (scaled) latents; forward returns logits."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        block_out_channels: tuple[int, ...] = (64, 128, 128),
        layers_per_block: int = 1,
        norm_num_groups: int = 32,
        pool: str = "attention",
        attention_heads: int = 4,
    ) -> None:
        super().__init__()
        if pool not in ("attention", "mean"):
            raise ValueError(f"pool must be 'attention' or 'mean', got {pool!r}")
        c0 = block_out_channels[0]
        temb_dim = 4 * c0
        self.time_proj = Timesteps(c0, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(c0, temb_dim)
        self.conv_in = nn.Conv2d(in_channels, c0, kernel_size=3, padding=1)
        blocks = []
        prev = c0
        for i, ch in enumerate(block_out_channels):
            blocks.append(
                get_down_block(
                    "DownBlock2D",
                    num_layers=layers_per_block,
                    in_channels=prev,
                    out_channels=ch,
                    temb_channels=temb_dim,
                    add_downsample=i < len(block_out_channels) - 1,
                    resnet_eps=1e-5,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    attention_head_dim=ch,  # unused by DownBlock2D; silences a diffusers notice
                    downsample_padding=1,
                    # scale-shift norm, as the paper's UNets use
                    resnet_time_scale_shift="scale_shift",
                )
            )
            prev = ch
        self.down_blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(norm_num_groups, prev, eps=1e-5)
        self.act = nn.SiLU()
        self.pooler = AttentionPool(prev, attention_heads) if pool == "attention" else None
        self.head = nn.Linear(prev, num_classes)

    def features(self, z_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Return (N, C) pooled features of noisy latents at timesteps ``t`` (scalar or per sample)."""
        t = torch.as_tensor(t, device=z_t.device)
        if t.ndim == 0:
            t = t.expand(z_t.shape[0])
        temb = self.time_proj(t).to(dtype=z_t.dtype)
        temb = self.time_embedding(temb)
        h = self.conv_in(z_t)
        for block in self.down_blocks:
            h, _ = block(h, temb)
        h = self.act(self.norm_out(h))
        return self.pooler(h) if self.pooler is not None else h.mean(dim=(2, 3))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Return (N, num_classes) logits for noisy latents ``z_t`` at timesteps ``t``."""
        return self.head(self.features(z_t, t))
