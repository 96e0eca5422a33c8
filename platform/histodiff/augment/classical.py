"""Strong classical augmentation of real tiles: the ``classical_aug`` control (no generator involved).

Two families, each label-safe for its kind of image:
- ``digits`` (the ``shift`` recipe): a random affine (rotation, scale, shear, translation) and an
  elastic deformation (Simard et al. 2003), as used for MNIST;
- ``tissue`` (the ``dihedral`` recipe): a dihedral transform, stain jitter in HED space
  (Tellez et al. 2018: each of hematoxylin, eosin, DAB scaled by 1 +- sigma and shifted by +- sigma),
  a Gaussian blur and brightness/contrast jitter.
Every draw comes from the numpy generator passed in, so a seed gives the same tiles.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF


def _elastic(img: torch.Tensor, rng: np.random.Generator, alpha: float = 34.0, sigma: float = 4.0) -> torch.Tensor:
    """Return a CHW float image deformed by a smoothed random displacement field (torchvision's recipe)."""
    _, h, w = img.shape
    field = torch.from_numpy(rng.uniform(-1, 1, size=(2, 1, h, w)).astype(np.float32))
    k = int(2 * round(3 * sigma) + 1)
    field = TF.gaussian_blur(field, [k, k], [sigma, sigma]) * alpha
    displacement = torch.stack([field[0, 0] / w, field[1, 0] / h], dim=-1)[None]  # (1, H, W, 2), normalised
    return TF.elastic(img, displacement, fill=0.0)


def _digits(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    img = TF.affine(img, angle=float(rng.uniform(-15, 15)), translate=[int(rng.integers(-2, 3)),
                    int(rng.integers(-2, 3))], scale=float(rng.uniform(0.9, 1.1)),
                    shear=[float(rng.uniform(-10, 10)), 0.0], fill=0.0)
    return _elastic(img, rng)


def _tissue(img: torch.Tensor, rng: np.random.Generator, sigma: float = 0.05) -> torch.Tensor:
    from skimage.color import hed2rgb, rgb2hed

    img = torch.rot90(img.flip(-1) if rng.random() < 0.5 else img, int(rng.integers(0, 4)), dims=(-2, -1))
    hed = rgb2hed(img.permute(1, 2, 0).numpy())
    hed = hed * rng.uniform(1 - sigma, 1 + sigma, size=3) + rng.uniform(-sigma, sigma, size=3) * hed.std(axis=(0, 1))
    img = torch.from_numpy(np.clip(hed2rgb(hed), 0, 1).astype(np.float32)).permute(2, 0, 1)
    img = TF.gaussian_blur(img, [3, 3], [float(rng.uniform(0.1, 1.0))])
    img = TF.adjust_brightness(img, float(rng.uniform(0.9, 1.1)))
    return TF.adjust_contrast(img, float(rng.uniform(0.9, 1.1)))


def strong_augment(tiles: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """Return uint8 NHWC tiles, each strongly augmented (``kind`` ``digits`` or ``tissue``) with draws from ``seed``."""
    if kind not in ("digits", "tissue"):
        raise ValueError(f"unknown classical augmentation {kind!r}; choose 'digits' or 'tissue'")
    rng = np.random.default_rng(seed)
    step = _digits if kind == "digits" else _tissue
    out = []
    for tile in tiles:
        img = torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1).float() / 255.0
        out.append((step(img, rng).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    return np.stack(out) if out else tiles.copy()


def kind_for(recipe_augment: str) -> str:
    """Return the classical augmentation family that matches a recipe's label-safe augmentation."""
    return "tissue" if recipe_augment == "dihedral" else "digits"
