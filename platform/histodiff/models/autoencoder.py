"""KL autoencoder (diffusers AutoencoderKL) and its training losses, as tensor-in/tensor-out math.

The paper's first stage (Ye et al. 2023; Rombach et al. 2022, LDM): a KL-regularised
autoencoder with downsampling f = 2 ** (levels - 1), trained with
``L1 + perceptual + kl_weight * KL + GAN``. Perceptual and GAN terms are optional. Nothing
here reads files: the perceptual net's weights come in as a state dict
(:func:`histodiff.train.autoencoder.load_perceptual_state` reads them from a URI).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from histodiff.config import AutoencoderConfig


def downsample_factor(cfg: AutoencoderConfig) -> int:
    """Return the spatial downsampling factor f of the autoencoder."""
    return 2 ** (len(cfg.block_out_channels) - 1)


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    """Return a randomly initialised AutoencoderKL (no attention: the paper's KL-f4 has none)."""
    levels = len(cfg.block_out_channels)
    bad = [c for c in cfg.block_out_channels if c % cfg.norm_num_groups]
    if bad:
        raise ValueError(
            f"autoencoder.block_out_channels {bad} are not divisible by autoencoder.norm_num_groups="
            f"{cfg.norm_num_groups}; change one of them"
        )
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        # The scale factor is measured by the encode stage and stored with the latents.
        scaling_factor=1.0,
        mid_block_add_attention=False,
    )


def kl_per_sample(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Return KL(N(mean, exp(logvar)) || N(0, 1)) summed over C, H, W, one value per sample."""
    logvar = logvar.clamp(-30.0, 20.0)
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             kl_weight: float, perceptual: torch.Tensor | None = None,
             perceptual_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Return {"loss", "l1", "kl", "perceptual"}: L1 + perceptual_weight * P + kl_weight * KL.

    LDM sums L1 and KL over pixels per sample; dividing both by C*H*W of the image keeps
    their ratio (so ``kl_weight=1e-6`` means what it means in the paper) with readable values.
    """
    pixels = x[0].numel()
    l1 = (x.float() - recon.float()).abs().mean()
    kl = kl_per_sample(mean.float(), logvar.float()).mean() / pixels
    loss = l1 + kl_weight * kl
    p = torch.zeros((), device=x.device)
    if perceptual is not None and perceptual_weight > 0:
        p = perceptual.float().mean()
        loss = loss + perceptual_weight * p
    return {"loss": loss, "l1": l1.detach(), "kl": kl.detach(), "perceptual": p.detach()}


# --- perceptual loss (LPIPS-style over VGG16 features) -------------------------------------

# VGG16 `features` indices after which LPIPS reads activations (relu1_2 ... relu5_3).
_VGG_TAPS = (3, 8, 15, 22, 29)
# LPIPS input scaling (its ScalingLayer): inputs in [-1, 1] -> ImageNet-ish statistics.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    """Return torchvision's VGG16 conv stack up to relu5_3 (no classifier: 100M fewer parameters)."""
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"])[: _VGG_TAPS[-1] + 1]


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on a frozen VGG16 feature stack whose weights the user supplies."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        features = vgg16_features()
        vgg_state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("lin")}
        expected = set(features.state_dict())
        missing = sorted(expected - set(vgg_state))
        if missing:
            raise ValueError(
                f"perceptual weights miss VGG16 feature tensors {missing[:4]}...; give a torchvision "
                "vgg16 state dict (keys 'features.N.weight') as .safetensors or .pt"
            )
        features.load_state_dict({k: vgg_state[k] for k in expected})
        self.features = features.eval().requires_grad_(False)
        widths = [features[i - 1].out_channels for i in _VGG_TAPS]
        # LPIPS' learned per-channel weights when present, else a plain channel mean.
        lins = [state.get(f"lin{i}.model.1.weight", state.get(f"lin{i}.weight")) for i in range(len(widths))]
        self.lins = nn.ParameterList([
            nn.Parameter((w.reshape(1, c, 1, 1) if w is not None else torch.full((1, c, 1, 1), 1.0 / c)).float(),
                         requires_grad=False)
            for w, c in zip(lins, widths)
        ])
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> "PerceptualLoss":
        """Return self; the feature net stays in eval mode (it is frozen)."""
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _VGG_TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return the per-sample perceptual distance between two image batches in [-1, 1]."""
        d = 0.0
        for fx, fy, w in zip(self._taps(x.float()), self._taps(y.float()), self.lins):
            d = d + ((fx - fy).pow(2) * w).sum(1).mean((1, 2))
        return d


# --- PatchGAN discriminator (pix2pix / taming-transformers), hinge loss --------------------


def build_discriminator(cfg: AutoencoderConfig) -> nn.Module:
    """Return an N-layer PatchGAN discriminator that outputs a map of real/fake logits."""
    ch, layers = cfg.disc_channels, []
    layers += [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, cfg.disc_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        stride = 2 if n < cfg.disc_layers else 1
        layers += [nn.Conv2d(ch * prev, ch * mult, 4, stride, 1, bias=False),
                   nn.GroupNorm(min(32, ch * mult // 4), ch * mult), nn.LeakyReLU(0.2, True)]
    layers.append(nn.Conv2d(ch * mult, 1, 4, 1, 1))
    disc = nn.Sequential(*layers)
    for m in disc.modules():  # DCGAN init, as taming does
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
    return disc


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Return the discriminator hinge loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_gan_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Return the generator's adversarial loss -E[D(G(z))]."""
    return -logits_fake.float().mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        disc_weight: float) -> torch.Tensor:
    """Return disc_weight * |grad rec| / |grad gan| at the decoder's last layer (LDM, clamped)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    w = g_rec.norm() / (g_gan.norm() + 1e-4)
    return w.clamp(0.0, 1e4).detach() * disc_weight


def decoder_last_layer(model: AutoencoderKL) -> torch.Tensor:
    """Return the decoder's output conv weight (where the adaptive GAN weight is measured)."""
    return model.decoder.conv_out.weight


# --- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def reconstruct(model: AutoencoderKL, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Return the reconstructions of images in [-1, 1] through the posterior mean (CPU, fp32)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        out.append(model.decode(model.encode(xb).latent_dist.mode()).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def reconstruction_quality(x: torch.Tensor, recon: torch.Tensor) -> dict[str, float]:
    """Return {"psnr", "ssim"} of reconstructions vs originals (both in [-1, 1]; data range 1)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a, b = (recon.float() + 1) / 2, (x.float() + 1) / 2
    kernel = min(11, min(x.shape[-2:]) - (1 - min(x.shape[-2:]) % 2))  # SSIM needs an odd window <= size
    return {
        "psnr": float(peak_signal_noise_ratio(a, b, data_range=1.0)),
        "ssim": float(structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=kernel)),
    }
