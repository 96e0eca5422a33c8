"""FID/KID with a custom extractor, and the memorisation check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from histodiff.evaluate.quality import BackboneFeatures, closest_pairs, fid_kid, memorisation


class ColourStats(nn.Module):
    """A tiny fixed extractor: per-channel means and stds (6 features)."""

    num_features = 6

    def forward(self, x):
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1).double()


def _tiles(rng, n, low, high):
    return rng.integers(low, high, size=(n, 8, 8, 3), dtype=np.uint8)


def test_fid_identical_near_zero_and_different_larger():
    rng = np.random.default_rng(0)
    a = _tiles(rng, 60, 0, 200)
    b = _tiles(rng, 60, 100, 256)
    same = fid_kid(a, a.copy(), ColourStats())
    diff = fid_kid(a, b, ColourStats())
    assert abs(same["fid"]) < 1e-4
    assert abs(same["kid_mean"]) < 1e-3
    assert diff["fid"] > 0.05 and diff["fid"] > 1000 * abs(same["fid"])
    assert diff["kid_mean"] > 0.01


def test_fid_with_backbone_extractor():
    import timm

    torch.manual_seed(0)
    ext = BackboneFeatures(timm.create_model("test_resnet", pretrained=False, num_classes=3), image_size=16)
    assert ext.num_features == timm.create_model("test_resnet").num_features
    rng = np.random.default_rng(1)
    a, b = _tiles(rng, 20, 0, 120), _tiles(rng, 20, 130, 256)
    same = fid_kid(a, a.copy(), ext)["fid"]
    assert abs(same) < 1e-3
    assert fid_kid(a, b, ext)["fid"] > max(0.1, 100 * abs(same))


def test_memorisation_finds_copies():
    rng = np.random.default_rng(2)
    real = _tiles(rng, 10, 0, 256)
    fake = np.concatenate([real[3:4], _tiles(rng, 4, 0, 256)])  # synthetic tile 0 copies real tile 3
    ext = ColourStats()
    from histodiff.evaluate.quality import features

    memo = memorisation(real, fake, features(ext, real), features(ext, fake))
    assert memo["pixel_distance"][0] == pytest.approx(0.0)
    assert memo["pixel_index"][0] == 3
    assert min(memo["pixel_distance"][1:]) > 0.2
    assert memo["real_pixel_nn_median"] > 0.2
    (syn_label, syn), (real_label, nearest) = closest_pairs(real, fake, memo, n=2)
    assert (syn_label, real_label) == ("synthetic", "nearest real") and syn.shape == nearest.shape == (2, 8, 8, 3)
    assert np.array_equal(syn[0], real[3]) and np.array_equal(nearest[0], real[3])  # the copy comes first
