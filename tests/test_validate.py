"""Method validation on MNIST: data preparation, per-budget configs, and the protocol's orchestration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import validation as validate


def test_mnist_tiles_are_padded_rgb_and_splits_are_disjoint():
    x, y = validate.mnist_tiles()
    assert x.shape == (5000, 32, 32, 3) and x.dtype == np.uint8
    assert x[:, :2].max() == 0 and x[:, :, -2:].max() == 0  # 2-pixel zero padding around 28x28
    assert np.array_equal(x[..., 0], x[..., 2])
    idx = validate.split_indices(y, 0, val_per_class=3, test_per_class=4)
    assert np.bincount(y[idx["val"]]).tolist() == [3] * 10 and np.bincount(y[idx["test"]]).tolist() == [4] * 10
    assert len(np.intersect1d(idx["pool"], idx["test"])) == 0 and len(np.intersect1d(idx["pool"], idx["val"])) == 0
    assert len(idx["pool"]) + 70 == 5000
    assert np.array_equal(idx["pool"], validate.split_indices(y, 0, 3, 4)["pool"])


def test_budget_config_scales_epochs_and_shares_pretraining(tmp_path):
    sizes = {"pool": 4000, "val": 200, "test": 800}
    b2 = validate.budget_config(str(tmp_path), 2, sizes, [])
    b10 = validate.budget_config(str(tmp_path), 10, sizes, ["evaluation.seeds=[7]"])
    assert b2.data.labels_per_class == 2 and b2.evaluation.augment == "shift"
    # the same downstream steps for every arm and budget; the selector gets ~150 steps on the real labels
    assert (b2.evaluation.steps, b2.evaluation.epochs) == (validate.EVAL_STEPS, validate.EVAL_ROUNDS)
    assert b10.evaluation.steps == validate.EVAL_STEPS
    assert b2.synthesis.selector.epochs == 75 and b10.synthesis.selector.epochs == 22
    assert b2.paths.denoiser == b10.paths.denoiser and b2.paths.classifier != b10.paths.classifier
    assert b2.name != b10.name  # Ray Train run names must not collide between budgets
    assert b10.evaluation.seeds == [7]
    assert b2.data.val_fraction == pytest.approx(200 / 4200)


def _stub_stages(calls: list[str]):
    """Stand-ins for the generator stages: a real (untrained) autoencoder export, and 'synthesis' that
    copies labeled pool tiles (filtered run) or the same tiles with shuffled labels (mode none)."""
    from histodiff import checkpoint
    from histodiff.data import shards
    from histodiff.data.splits import labeled_splits
    from histodiff.models.autoencoder import build_autoencoder

    def autoencoder(cfg):
        checkpoint.export_model(build_autoencoder(cfg.autoencoder), cfg.paths.autoencoder, {"kind": "autoencoder"})

    def synthesize(cfg):
        tiles, ids, classes = labeled_splits(cfg)["val"]
        labels = np.array(classes)[ids]
        if cfg.synthesis.selector.mode == "none":  # unfiltered (and unguided) runs: labels are often wrong
            labels = np.random.default_rng(0).permutation(labels)
        uri = f"{cfg.paths.synthetic}/accepted"
        shards.write_table(shards.tiles_table(tiles, labels.tolist(), "synthetic", map(str, range(len(tiles)))),
                           f"{uri}/{shards.shard_name(0)}")
        shards.write_manifest(shards.Manifest(uri, [shards.shard_name(0)], len(tiles), sorted(set(labels)), 32))

    fns = {"autoencoder": autoencoder, "synthesize": synthesize}

    def stage(name):
        def call(cfg):
            calls.append(f"{name}:{cfg.name}:{cfg.synthesis.selector.mode}:{cfg.synthesis.guidance_scale}")
            return fns.get(name, lambda c: None)(cfg)
        return call

    return stage


@pytest.mark.slow
def test_run_validation_orchestrates_the_protocol(ray_local, tmp_path):
    calls: list[str] = []
    out = validate.run_validation(
        str(tmp_path), budgets=(2, 3), seeds=(0, 1), val_per_class=3, test_per_class=3, max_pool=300, stage=_stub_stages(calls),
        overrides=["evaluation.backbone=test_resnet", "evaluation.epochs=1", "evaluation.steps=2", "evaluation.image_size=16",
                   "autoencoder.block_out_channels=[8,8]", "autoencoder.norm_num_groups=4",
                   "evaluation.pseudo_label_threshold=0.0"])
    assert [c.split(":")[0] for c in calls] == ["autoencoder", "encode", "pretrain", "classifier", "synthesize",
                                                "synthesize", "synthesize", "classifier", "synthesize", "synthesize"]
    # selected, then the unfiltered control (guided, mode none), then unguided samples for the judge: those
    # do not depend on the budget, so only the first budget makes them
    assert [c.split(":", 2)[2] for c in calls[4:7]] == ["confidence:3.0", "none:3.0", "none:0.0"]
    assert [c.split(":", 2)[2] for c in calls[8:]] == ["confidence:3.0", "none:3.0"]
    assert out["validate_curve"]["3"]["guidance_precision_unguided"] == out["guidance_precision_unguided"]
    curve = out["validate_curve"]["2"]
    assert out["validate_baseline_acc"] == curve["baseline_acc"] and 0 <= curve["baseline_acc"] <= 100
    assert out["validate_gain_points"] == pytest.approx(curve["augmented_acc"] - curve["baseline_acc"])
    assert curve["gain_ci_low"] <= curve["gain_points"] <= curve["gain_ci_high"]
    assert not math.isnan(out["validate_unfiltered_gain_points"])
    assert set(curve["cheap_baselines"]) == {"pseudo_label", "latent_knn", "latent_linear"}
    assert out["validate_cheap_baseline_acc"] == max(curve["cheap_baselines"].values())
    assert out["validate_wall_s"] > 0 and curve["num_seeds"] == 2
    assert 0 <= out["guidance_precision_unguided"] <= 1 and 0 <= out["guidance_precision_guided"] <= 1
