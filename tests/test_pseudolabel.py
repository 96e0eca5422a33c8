"""Labels from the pool: denoiser features, kNN propagation, and the pseudolabel stage on toy inputs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from bench import toys
from histodiff.augment.pool_labels import denoiser_features, most_confident, propagate
from histodiff.config import _merge, config_from_dict, parse_overrides
from histodiff.data import shards
from histodiff.data.splits import labeled_splits, split_spec
from histodiff.runner import run_stage
from histodiff.stages import pseudolabel
from histodiff.storage import Store, join


def test_propagation_votes_by_nearest_labeled_neighbours():
    labeled = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=-1)
    pool = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.7, 0.7]]), dim=-1)
    probs = propagate(labeled, torch.tensor([0, 0, 1]), pool, num_classes=2, k=3)
    assert probs.argmax(1).tolist()[:2] == [0, 1] and torch.allclose(probs.sum(1), torch.ones(3))
    assert probs[0, 0] > probs[2, probs[2].argmax()]  # the ambiguous tile is the least confident
    idx, labels, conf = most_confident(probs, per_class=1)
    assert sorted(zip(idx.tolist(), labels.tolist())) == [(0, 0), (1, 1)] and (conf > 0.5).all()


def test_denoiser_features_are_deterministic_unit_vectors():
    unet = toys.train_toy_unet(steps=2)
    z, _ = toys.toy_latents(10, seed=0)
    a, b = denoiser_features(unet, z, 50, seed=1), denoiser_features(unet, z, 50, seed=1)
    assert a.shape[0] == 10 and torch.equal(a, b) and torch.allclose(a.norm(dim=1), torch.ones(10))


@pytest.mark.slow
def test_pool_copies_of_validation_and_test_tiles_never_get_a_pseudo_label(ray_local, tmp_path):
    cfg = toys.write_toy_inputs(str(tmp_path / "toy"))
    cfg = config_from_dict(_merge(cfg.public_dict(), parse_overrides(
        ["data.test_fraction=0.25", "pseudo_labels.per_class=100", f"paths.latents={tmp_path}/pool"])))
    store = Store()
    splits = labeled_splits(split_spec(cfg, store), store)
    z_all, _, sha1_all, meta = __import__("histodiff.data.encode", fromlist=["load_latents"]).load_latents(
        join(cfg.paths.labeled_latents, "train"), store)
    held_out = {shards.pixel_sha1(t) for part in ("val", "test") for t in splits[part][0]}
    fresh, _ = toys.toy_latents(12, seed=5)
    # The pool: latents of the labeled validation and test tiles (same sha1s) plus fresh toy latents.
    rows = [i for i, s in enumerate(sha1_all) if s in held_out]
    latents = torch.cat([z_all[rows], fresh / meta["scale_factor"]])
    sha1s = [sha1_all[i] for i in rows] + [f"fresh{i}" for i in range(len(fresh))]
    table = pa.table({"latent": pa.array([v.half().numpy().tobytes() for v in latents], pa.binary()),
                      "label": pa.array([None] * len(sha1s), pa.string()), "sha1": pa.array(sha1s, pa.string())})
    shards.write_table(table, join(cfg.paths.latents, "part-00000.parquet"), store)
    store.write_json(join(cfg.paths.latents, "_latents.json"), {**meta, "num_latents": len(sha1s),
                                                                 "shards": ["part-00000.parquet"]})
    result = run_stage(pseudolabel, cfg)
    got = store.read_parquet(result.pseudo_labels_uri)
    assert set(got.column("sha1").to_pylist()) == {f"fresh{i}" for i in range(len(fresh))}
    assert sum(result.per_class.values()) == len(fresh)
    conf = np.array(got.column("confidence").to_pylist())
    assert ((conf > 0) & (conf <= 1)).all()
    assert run_stage(pseudolabel, cfg).skipped
