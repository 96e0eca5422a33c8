"""Stain and colour fidelity of synthetic tiles: per class, how far their colours drift from the real tiles'.

Colour shift is a known failure of diffusion models on histology. For each class, the real tiles'
and the synthetic tiles' pixels are compared channel by channel in HED (haematoxylin, eosin, DAB:
``skimage.color.rgb2hed``, the stains) and in CIELAB (``rgb2lab``, perceptual colour), with the
1-D Wasserstein distance between the two distributions of pixel values, divided by the larger of
the two channels' standard deviations (a unitless drift: 0 is the same distribution, 1 a shift of
one standard deviation between equal spreads; a channel nearly constant in the real tiles, as DAB
is in tissue without DAB stain, no longer divides by almost zero), then averaged over the three
channels. Pixel values are floored at 1/255 before the conversion: an 8-bit pixel cannot be darker,
and without the floor a pure black pixel (value 0) is clipped to 1e-6 by ``rgb2hed`` and read as an
optical density more than twice that of an almost black one (value 1), so dark backgrounds (digits
on black) were flagged as stain drift when nothing visible differed. Pure numpy/scipy: no files here.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

SPACES = ("hed", "lab")


def _pixels(tiles: np.ndarray, space: str, max_pixels: int, seed: int) -> np.ndarray:
    from skimage.color import rgb2hed, rgb2lab

    rgb = np.maximum(np.asarray(tiles, dtype=np.float64).reshape(-1, 3), 1.0) / 255.0  # 8-bit floor: see above
    if len(rgb) > max_pixels:  # a seeded subsample: the distances are stable and cheap on large sets
        rgb = rgb[np.random.default_rng(seed).choice(len(rgb), max_pixels, replace=False)]
    converted = rgb2hed(rgb[None])[0] if space == "hed" else rgb2lab(rgb[None])[0]
    return converted


def colour_drift(real: np.ndarray, fake: np.ndarray, space: str, max_pixels: int = 200_000, seed: int = 0) -> float:
    """Return the mean over channels of W1(real, fake) / max(std(real), std(fake)) in ``space`` (``hed`` or ``lab``)."""
    from scipy.stats import wasserstein_distance

    if space not in SPACES:
        raise ValueError(f"unknown colour space {space!r}; choose one of {SPACES}")
    if len(real) == 0 or len(fake) == 0:
        return float("nan")
    a, b = _pixels(real, space, max_pixels, seed), _pixels(fake, space, max_pixels, seed + 1)
    return float(np.mean([wasserstein_distance(a[:, c], b[:, c]) / max(a[:, c].std(), b[:, c].std(), 1e-8) for c in range(3)]))


def colour_report(real: Mapping[str, np.ndarray], fake: Mapping[str, np.ndarray], bound: float) -> dict[str, Any]:
    """Return per class {hed, lab drift, drifted: whether either is past ``bound``} for the classes of ``fake``."""
    out = {}
    for c, tiles in fake.items():
        hed, lab = colour_drift(real.get(c, np.zeros((0, 1, 1, 3))), tiles, "hed"), \
            colour_drift(real.get(c, np.zeros((0, 1, 1, 3))), tiles, "lab")
        out[c] = {"hed": hed, "lab": lab, "drifted": bool(max(hed, lab) > bound)}
    return out


def colour_figure(real: Mapping[str, np.ndarray], fake: Mapping[str, np.ndarray], report: Mapping[str, Any]) -> Any:
    """Return a figure: per class, the real vs synthetic distributions of the H, E and D stain channels."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    classes = [c for c in fake if len(fake[c]) and len(real.get(c, []))]
    fig, axes = plt.subplots(max(1, len(classes)), 3, figsize=(10, 2.4 * max(1, len(classes))), squeeze=False)
    for row, c in zip(axes, classes):
        a, b = _pixels(real[c], "hed", 50_000, 0), _pixels(fake[c], "hed", 50_000, 1)
        for k, (ax, name) in enumerate(zip(row, ("haematoxylin", "eosin", "DAB"))):
            lo, hi = np.quantile(np.concatenate([a[:, k], b[:, k]]), [0.005, 0.995])
            ax.hist(a[:, k], bins=40, range=(lo, hi), alpha=0.6, density=True, label="real")
            ax.hist(b[:, k], bins=40, range=(lo, hi), alpha=0.6, density=True, label="synthetic")
            ax.set_title(f"{c}: {name} (HED drift {report[c]['hed']:.2f}"
                         f"{', DRIFTED' if report[c]['drifted'] else ''})", fontsize=8)
            ax.set_xlabel("optical density")
        row[0].set_ylabel("density")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
