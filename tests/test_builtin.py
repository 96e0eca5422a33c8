"""Built-in tissue data: layout, class counts, the stain rule, disjoint regions, idempotence."""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np
from PIL import Image

from histodiff.data import builtin

BOX = re.compile(r"y(\d{4})_x(\d{4})")


def _files(folder: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)


def _boxes(folder: str) -> np.ndarray:
    """Return (n, 4) crop boxes (y0, x0, y1, x1) parsed from file names and image sizes."""
    out = []
    for path in _files(folder):
        y, x = map(int, BOX.search(os.path.basename(path)).groups())
        with Image.open(path) as img:
            w, h = img.size
        if "pool_" in path:
            w = h = max(w, h)  # pool crops may be rotated: bound the original crop by its longer side
        out.append((y, x, y + h, x + w))
    return np.array(out)


def test_layout_and_class_counts(builtin_data):
    assert set(builtin_data) == {"unlabeled", "labeled_train", "labeled_test"}
    assert builtin_data["labeled_train"].endswith(os.path.join("labeled", "train"))
    for split in ("labeled_train", "labeled_test"):
        assert sorted(os.listdir(builtin_data[split])) == ["BACK", "STR", "TUM"]
        for cls in builtin.CLASSES:
            tiles = os.listdir(os.path.join(builtin_data[split], cls))
            assert len(tiles) == builtin.PER_CLASS >= 40
            assert all(t.endswith(".tif") for t in tiles)
    pool = os.listdir(builtin_data["unlabeled"])
    assert len(pool) == builtin.POOL_SIZE
    assert {p.rsplit(".", 1)[1] for p in pool} == {"png", "jpg", "tif"}
    with Image.open(_files(builtin_data["labeled_train"])[0]) as img:
        assert img.size == (48, 48) and img.mode == "RGB"  # larger than the tiny preset's 32 px tiles


def test_labels_follow_the_documented_stain_rule(builtin_data):
    image = builtin.tissue_image()
    maps = builtin.stain_maps(image)
    for split in ("labeled_train", "labeled_test"):
        for path in _files(builtin_data[split]):
            y, x = map(int, BOX.search(path).groups())
            s = builtin.SOURCE_TILE
            with Image.open(path) as img:
                assert np.array_equal(np.asarray(img), image[y : y + s, x : x + s])  # lossless crop of the image
            frac = {k: m[y : y + s, x : x + s].mean() for k, m in maps.items()}
            assert builtin.stain_label(frac["dab"], frac["nuclei"], frac["white"]) == os.path.basename(
                os.path.dirname(path))
    # the classes differ in stain: TUM is DAB-rich, BACK is near-white
    assert builtin.stain_label(0.9, 0.1, 0.0) == "TUM"
    assert builtin.stain_label(0.0, 0.0, 0.95) == "BACK"
    assert builtin.stain_label(0.05, 0.2, 0.3) == "STR"
    assert builtin.stain_label(0.4, 0.1, 0.1) is None


def test_train_and_pool_never_touch_test_regions(builtin_data):
    test = _boxes(builtin_data["labeled_test"])
    for other in (_boxes(builtin_data["labeled_train"]), _boxes(builtin_data["unlabeled"])):
        # boxes overlap iff they overlap on both axes
        overlap = ((other[:, None, 0] < test[None, :, 2]) & (test[None, :, 0] < other[:, None, 2])
                   & (other[:, None, 1] < test[None, :, 3]) & (test[None, :, 1] < other[:, None, 3]))
        assert not overlap.any()
    assert test[:, 3].max() <= builtin.SPLIT_X
    digest = {hashlib.sha1(open(p, "rb").read()).hexdigest() for p in _files(builtin_data["labeled_test"])}
    assert not digest & {hashlib.sha1(open(p, "rb").read()).hexdigest() for p in _files(builtin_data["labeled_train"])}


def test_rewrite_is_skipped_when_complete(builtin_data):
    root = os.path.dirname(builtin_data["unlabeled"])
    first = _files(builtin_data["labeled_train"])[0]
    stamp = os.stat(first).st_mtime_ns
    assert builtin.write_builtin_data(root) == builtin_data
    assert os.stat(first).st_mtime_ns == stamp
