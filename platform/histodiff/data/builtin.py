"""Built-in tissue data for the demo and the tests: real tissue, made offline.

Everything is cut from scikit-image's 512x512 colon-tissue image
(``skimage.data.immunohistochemistry()``: IHC, hematoxylin counterstain + DAB) and written
in the layouts users bring, so the demo walks the same path as real data:

- ``unlabeled/``: a pool of augmented crops (random position and size, slight aspect and
  scale jitter, flips, rot90) saved as a mix of .png, .jpg and .tif;
- ``labeled/train/<CLASS>/`` and ``labeled/test/<CLASS>/``: the NCT-CRC-HE-100K layout
  (one folder per class, .tif tiles), 3 classes labeled by a stain rule (see
  :func:`stain_label`).

No leakage: the image is split at x = 256. Labeled *test* tiles come only from the left
half, labeled *train* tiles and the whole unlabeled pool only from the right half, so no
test pixel reaches any training stage. File names carry the crop box
(``y0120_x0300.tif``), which the tests use to prove the regions are disjoint.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from PIL import Image

from histodiff.storage import Store, join

log = logging.getLogger(__name__)

VERSION = 2
MARKER = "_builtin.json"
CLASSES = ("BACK", "STR", "TUM")
SOURCE_TILE = 48  # larger than the tiny preset's 32 px tile, so ingest's resize is exercised
STRIDE = 4  # overlapping strides: background is rare in this image
SPLIT_X = 256  # test tiles: x + 48 <= 256; train tiles and the pool: x >= 256
PER_CLASS = 48  # at most this many tiles per class and split
POOL_SIZE = 320
POOL_FORMATS = ("png", "jpg", "tif")
SEED = 1234

# Stain-rule thresholds (fractions of a tile's pixels); see stain_label.
DAB_POSITIVE = 0.05  # DAB optical density above which a pixel counts as DAB-positive
HEM_POSITIVE = 0.04  # hematoxylin optical density above which a pixel counts as a nucleus


def tissue_image() -> np.ndarray:
    """Return the 512x512 RGB uint8 colon-tissue image that ships with scikit-image."""
    from skimage import data

    return np.ascontiguousarray(data.immunohistochemistry()[..., :3])


def stain_maps(image: np.ndarray) -> dict[str, np.ndarray]:
    """Return per-pixel boolean maps ``dab``, ``nuclei`` and ``white`` of an RGB image."""
    from skimage import color

    hed = color.rgb2hed(image)  # colour deconvolution: hematoxylin, eosin, DAB
    hsv = color.rgb2hsv(image)
    return {
        "dab": hed[..., 2] > DAB_POSITIVE,
        "nuclei": hed[..., 0] > HEM_POSITIVE,
        # near-white and unstained: glass or lumen
        "white": (hsv[..., 2] > 0.85) & (hsv[..., 1] < 0.1),
    }


def stain_label(dab_frac: float, nuclei_frac: float, white_frac: float) -> str | None:
    """Return the class of a tile from its stain fractions, or None when ambiguous.

    The rule (fractions of the tile's pixels, after ``skimage.color.rgb2hed``):

    - ``BACK`` (background / lumen): >= 60% near-white pixels, < 2% hematoxylin-positive
      and < 15% DAB-positive;
    - ``TUM`` (DAB-positive epithelium): >= 60% DAB-positive pixels;
    - ``STR`` (hematoxylin stroma): <= 10% DAB-positive and >= 5% hematoxylin-positive;
    - anything else (mixed borders) is left out, so every label is unambiguous.
    """
    if white_frac >= 0.6 and nuclei_frac < 0.02 and dab_frac < 0.15:
        return "BACK"
    if dab_frac >= 0.6:
        return "TUM"
    if dab_frac <= 0.1 and nuclei_frac >= 0.05:
        return "STR"
    return None


def labeled_boxes(image: np.ndarray, split: str) -> dict[str, list[tuple[int, int]]]:
    """Return ``{class: [(y, x), ...]}`` of every labeled tile position in one split's region."""
    maps = stain_maps(image)
    size = SOURCE_TILE
    h, w = image.shape[:2]
    x_lo, x_hi = (SPLIT_X, w) if split == "train" else (0, SPLIT_X)
    boxes: dict[str, list[tuple[int, int]]] = {c: [] for c in CLASSES}
    for y in range(0, h - size + 1, STRIDE):
        for x in range(x_lo, x_hi - size + 1, STRIDE):
            frac = {k: float(m[y : y + size, x : x + size].mean()) for k, m in maps.items()}
            label = stain_label(frac["dab"], frac["nuclei"], frac["white"])
            if label is not None:
                boxes[label].append((y, x))
    return boxes


def _encode(tile: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {"quality": 95} if fmt == "jpg" else {}
    Image.fromarray(tile).save(buf, format={"png": "PNG", "jpg": "JPEG", "tif": "TIFF"}[fmt], **kwargs)
    return buf.getvalue()


def _pool_tiles(image: np.ndarray, rng: np.random.Generator,
                anchors: list[tuple[int, int]]) -> list[tuple[str, np.ndarray]]:
    """Return (file name, crop) pairs of the unlabeled pool, all from the training half.

    A third of the crops lie anywhere; the rest are jittered around ``anchors`` (positions of
    every tissue kind in equal numbers), so that kinds rare in this image, such as background,
    are in the pool as they are in a slide's tiles. The pool still carries no labels.
    """
    h, w = image.shape[:2]
    out = []
    for i in range(POOL_SIZE):
        side = int(rng.integers(40, 65))  # slight scale jitter around the 48 px source size
        aspect = float(rng.uniform(0.85, 1.15))  # non-square, so ingest's center crop is exercised
        ch, cw = side, int(round(side * aspect))
        if i % 3 and anchors:
            ay, ax = anchors[int(rng.integers(len(anchors)))]
            y = int(np.clip(ay + rng.integers(-8, 9), 0, h - ch))
            x = int(np.clip(ax + rng.integers(-8, 9), SPLIT_X, w - cw))
        else:
            y = int(rng.integers(0, h - ch + 1))
            x = int(rng.integers(SPLIT_X, w - cw + 1))
        crop = image[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.ascontiguousarray(np.rot90(crop, int(rng.integers(0, 4))))
        fmt = POOL_FORMATS[i % len(POOL_FORMATS)]
        out.append((f"pool_{i:05d}_y{y:04d}_x{x:04d}.{fmt}", crop))
    return out


def write_builtin_data(root: str) -> dict[str, str]:
    """Write the built-in tissue data under ``root``; return the folder of each set.

    Keys: ``unlabeled``, ``labeled_train``, ``labeled_test``. Idempotent: a complete
    earlier write (its marker, written last, names the same version) is reused.
    """
    store = Store()
    paths = {
        "unlabeled": join(root, "unlabeled"),
        "labeled_train": join(root, "labeled", "train"),
        "labeled_test": join(root, "labeled", "test"),
    }
    marker = join(root, MARKER)
    if store.exists(marker) and store.read_json(marker).get("version") == VERSION:
        return paths
    image = tissue_image()
    rng = np.random.default_rng(SEED)
    counts: dict[str, Any] = {}
    all_boxes = {split: labeled_boxes(image, split) for split in ("train", "test")}
    for split, boxes in all_boxes.items():
        counts[split] = {}
        for label in CLASSES:
            found = boxes[label]
            if not found:
                raise RuntimeError(f"the stain rule found no {label} tiles in the {split} region; "
                                   "check the thresholds in histodiff.data.builtin")
            keep = rng.choice(len(found), size=min(PER_CLASS, len(found)), replace=False)
            for idx in sorted(keep):
                y, x = found[idx]
                tile = image[y : y + SOURCE_TILE, x : x + SOURCE_TILE]
                name = f"y{y:04d}_x{x:04d}.tif"
                store.write_bytes(join(paths[f"labeled_{split}"], label, name), _encode(tile, "tif"))
            counts[split][label] = len(keep)
    per_kind = min(len(v) for v in all_boxes["train"].values())
    anchors = [v[j] for v in all_boxes["train"].values() for j in rng.choice(len(v), per_kind, replace=False)]
    for name, crop in _pool_tiles(image, rng, anchors):
        store.write_bytes(join(paths["unlabeled"], name), _encode(crop, name.rsplit(".", 1)[1]))
    counts["unlabeled"] = POOL_SIZE
    store.write_json(marker, {"version": VERSION, "counts": counts, "paths": paths})
    log.info("wrote built-in tissue data under %s: %s", root, counts)
    return paths
