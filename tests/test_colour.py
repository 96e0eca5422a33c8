"""Stain and colour fidelity: a colour shift is measured and flagged, the same colours are not."""

from __future__ import annotations

import numpy as np
import pytest

from histodiff.data.builtin import tissue_image
from histodiff.evaluate.colour import colour_drift, colour_figure, colour_report


def _tiles(image: np.ndarray, n: int = 16, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, image.shape[0] - size, n), rng.integers(0, image.shape[1] - size, n)
    return np.stack([image[y : y + size, x : x + size] for y, x in zip(ys, xs)])


def test_a_colour_shift_is_measured_and_flagged():
    img = tissue_image()
    real, same = _tiles(img[:, :256]), _tiles(img[:, 256:])
    shifted = np.clip(same.astype(int) + np.array([40, -20, -20]), 0, 255).astype(np.uint8)  # a red cast
    assert colour_drift(real, real, "hed") == pytest.approx(0.0, abs=1e-6)
    assert colour_drift(real, shifted, "lab") > 2 * colour_drift(real, same, "lab")
    assert colour_drift(real, shifted, "hed") > colour_drift(real, same, "hed")
    report = colour_report({"TUM": real}, {"TUM": shifted, "STR": same}, bound=0.5)
    assert report["TUM"]["drifted"] and np.isnan(report["STR"]["hed"])  # no real STR tiles: nothing to compare
    with pytest.raises(ValueError, match="colour space"):
        colour_drift(real, same, "hsv")
    # a channel nearly constant in the real tiles (a flat colour) gives a bounded drift, not W1 / ~0 (was 680)
    flat = np.full_like(real, 200)
    assert 0.5 < colour_drift(flat, same, "hed") < 5
    # black (0) against almost black (2 of 255) is no stain shift: an 8-bit pixel's optical density is bounded
    black = np.zeros_like(real)
    black[:, 8:24, 8:24] = 255  # a white stroke on black, as a digit
    near_black = np.where(black == 0, 2, black).astype(np.uint8)
    assert colour_drift(black, near_black, "hed") < 0.25  # was 0.75, past the default bound of 0.5
    assert colour_drift(black, near_black, "lab") < 0.1
    fig = colour_figure({"TUM": real}, {"TUM": shifted}, report)
    assert "DRIFTED" in fig.axes[0].get_title()
