"""Generation quality: FID/KID (torchmetrics) with a pluggable extractor, and a memorisation check.

Extractors (``evaluation.fid_extractor``):
- ``baseline`` (default): the pre-logit features of the downstream baseline classifier
  trained on real tiles. Offline and domain-specific, but its FIDs only compare with
  other FIDs under the same extractor.
- ``inception``: torchvision's Inception-v3 with weights from ``evaluation.inception_weights_uri``
  (a state dict as .safetensors or a torch file, loaded with ``weights_only=True``; nothing
  is downloaded). Only this one is comparable with published numbers, and only when the
  weights are the usual FID Inception weights. The name of the extractor used is recorded
  with every number.

Memorisation: for every synthetic tile, the distance to its nearest real training tile in
pixels (RMS over [0, 1] intensities) and in the extractor's feature space, next to the same
nearest-neighbour distance among real tiles (a tile closer to a real tile than real tiles
are to each other is a copy suspect).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from histodiff.train.backbone import resize

log = logging.getLogger(__name__)


class BackboneFeatures(nn.Module):
    """FID feature extractor from a timm classifier: images in [0, 1] -> pre-logit features."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        super().__init__()
        self.model = model.eval()
        self.image_size = image_size
        with torch.no_grad():
            self.num_features = int(self.forward(torch.rand(1, 3, image_size, image_size)).shape[-1])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return pre-logit features for float images in [0, 1] (NCHW)."""
        x = resize(x.float() * 2 - 1, self.image_size)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True).double()


class InceptionFeatures(nn.Module):
    """FID feature extractor: torchvision Inception-v3 pool features (2048) from local weights."""

    num_features = 2048

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        aux = any(k.startswith("AuxLogits.") for k in state_dict)
        net = inception_v3(weights=None, aux_logits=aux, init_weights=False, num_classes=state_dict["fc.weight"].shape[0])
        net.load_state_dict(state_dict)
        net.fc = nn.Identity()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return 2048-d pool features for float images in [0, 1] (NCHW)."""
        x = nn.functional.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - self.mean) / self.std).double()


def load_inception(uri: str, store: Any) -> InceptionFeatures:
    """Return the Inception extractor with weights read from a local path or URI."""
    raw = store.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        state = load_safetensors(raw)
    else:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    try:
        return InceptionFeatures(state)
    except (KeyError, RuntimeError) as exc:
        raise ValueError(f"evaluation.inception_weights_uri {uri!r} is not a torchvision inception_v3 state dict: "
                         f"{str(exc)[:300]}") from None


def _unit(tiles: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float() / 255.0


def features(extractor: nn.Module, tiles: np.ndarray, batch_size: int = 128) -> torch.Tensor:
    """Return extractor features (float64) for uint8 NHWC tiles."""
    return torch.cat([extractor(_unit(tiles[i : i + batch_size])) for i in range(0, len(tiles), batch_size)])


def fid_kid(real: np.ndarray, fake: np.ndarray, extractor: nn.Module, batch_size: int = 128) -> dict[str, float]:
    """Return FID and KID (mean, std) between two uint8 NHWC tile sets under ``extractor``."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID/KID need at least 2 tiles per set; got {len(real)} real and {len(fake)} synthetic")
    subset = min(50, len(real), len(fake))
    fid = FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=True)
    kid = KernelInceptionDistance(feature=extractor, normalize=True, subsets=20, subset_size=subset)
    for tiles, is_real in ((real, True), (fake, False)):
        for i in range(0, len(tiles), batch_size):
            batch = _unit(tiles[i : i + batch_size])
            fid.update(batch, real=is_real)
            kid.update(batch, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


def nearest(query: torch.Tensor, reference: torch.Tensor, exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (distance, index) of each query row's nearest reference row (L2, chunked)."""
    dists, idxs = [], []
    for i in range(0, len(query), 512):
        d = torch.cdist(query[i : i + 512].double(), reference.double())
        if exclude_self:
            rows = torch.arange(i, i + len(d))
            d[torch.arange(len(d)), rows] = float("inf")
        best = d.min(dim=1)
        dists.append(best.values)
        idxs.append(best.indices)
    return torch.cat(dists), torch.cat(idxs)


def memorisation(real: np.ndarray, fake: np.ndarray, real_feats: torch.Tensor, fake_feats: torch.Tensor
                 ) -> dict[str, Any]:
    """Return nearest-real-tile distances of each synthetic tile (pixels and features) and real-real references."""
    scale = float(np.sqrt(real[0].size))  # RMS over pixels: L2 / sqrt(H*W*C), intensities in [0, 1]
    real_px, fake_px = _unit(real).flatten(1), _unit(fake).flatten(1)
    px_d, px_i = nearest(fake_px, real_px)
    ft_d, ft_i = nearest(fake_feats, real_feats)
    ref_px, _ = nearest(real_px, real_px, exclude_self=True)
    ref_ft, _ = nearest(real_feats, real_feats, exclude_self=True)
    return {"pixel_distance": (px_d / scale).tolist(), "pixel_index": px_i.tolist(),
            "feature_distance": ft_d.tolist(), "feature_index": ft_i.tolist(),
            "real_pixel_nn_median": float((ref_px / scale).median()) if len(real) > 1 else float("nan"),
            "real_feature_nn_median": float(ref_ft.median()) if len(real) > 1 else float("nan")}


def histogram_figure(memo: dict[str, Any]) -> Any:
    """Return a figure: histograms of synthetic-to-nearest-real distances, with the real-real median."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, kind in zip(axes, ("pixel", "feature")):
        ax.hist(memo[f"{kind}_distance"], bins=30, color="tab:blue", alpha=0.8)
        ax.axvline(memo[f"real_{kind}_nn_median"], color="tab:red", ls="--", label="real-real NN median")
        ax.set_xlabel(f"{kind} distance to nearest real training tile")
        ax.set_ylabel("synthetic tiles")
        ax.set_title(f"memorisation check ({kind}s): left of the red line = closer than real tiles are", fontsize=8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def closest_pairs(real: np.ndarray, fake: np.ndarray, memo: dict[str, Any], n: int) -> list[tuple[str, np.ndarray]]:
    """Return two labelled rows: the ``n`` synthetic tiles closest to a real tile, and those real tiles."""
    order = np.argsort(memo["pixel_distance"])[:n]
    return [("synthetic", fake[order]), ("nearest real", real[[memo["pixel_index"][i] for i in order]])]


def make_extractor(fid_extractor: str, inception_weights_uri: str | None, store: Any, backbone: str,
                   image_size: int, baseline_state: dict | None, num_classes: int) -> tuple[nn.Module, str]:
    """Return the configured extractor and its recorded name."""
    if fid_extractor == "inception":
        return load_inception(inception_weights_uri, store), f"inception_v3:{inception_weights_uri}"
    if baseline_state is None:
        raise ValueError("the baseline extractor needs the trained baseline model's weights")
    from histodiff.models.backbone import create_backbone

    model = create_backbone(backbone, num_classes, image_size)
    model.load_state_dict(baseline_state)
    return BackboneFeatures(model, image_size), f"baseline:{backbone}"


def quality_report(real: np.ndarray, fake: np.ndarray, extractor: nn.Module, name: str) -> tuple[dict, dict]:
    """Return (FID/KID and memorisation summary, the per-tile memorisation distances)."""
    scores = fid_kid(real, fake, extractor)
    memo = memorisation(real, fake, features(extractor, real), features(extractor, fake))
    px = np.asarray(memo["pixel_distance"])
    summary = {**scores, "extractor": name, "num_real": int(len(real)), "num_synthetic": int(len(fake)),
               "nn_pixel_min": float(px.min()), "nn_pixel_median": float(np.median(px)),
               "nn_feature_median": float(np.median(memo["feature_distance"])),
               "real_pixel_nn_median": memo["real_pixel_nn_median"],
               "copy_suspects": int((px < 0.25 * memo["real_pixel_nn_median"]).sum())}
    log.info("quality (%s): FID %.2f, KID %.4f, %d copy suspect(s)", name, summary["fid"], summary["kid_mean"],
             summary["copy_suspects"])
    return summary, memo
