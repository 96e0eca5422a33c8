"""Downstream evaluation: determinism, test-split isolation, bad input, and the Ray stage end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histodiff.evaluate import downstream
from histodiff.evaluate.downstream import Extra, Recipe, Splits, check_labels, evaluate_arms
from histodiff.runner import run_stage
from histodiff.stages import evaluate
from histodiff.storage import Store

RECIPE = Recipe(backbone="test_resnet", image_size=16, epochs=2, lr=3e-3, weight_decay=0.0, batch_size=8,
                augment="none")
CLASSES = ["dark", "light"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_splits(seed: int = 0, n: int = 6, size: int = 16) -> Splits:
    """Two separable classes (dark vs light noise); test tiles carry a marker pixel (0, 0) = 7."""
    rng = np.random.default_rng(seed)

    def block(k):
        y = np.arange(k) % 2
        x = np.where(y[:, None, None, None] == 0, rng.integers(0, 110, (k, size, size, 3)),
                     rng.integers(140, 256, (k, size, size, 3))).astype(np.uint8)
        x[:, 0, 0, :] = 200  # never the marker value
        return x, y.astype(np.int64)

    tx, ty = block(n)
    vx, vy = block(n)
    sx, sy = block(n)
    sx[:, 0, 0, :] = 7
    return Splits(list(CLASSES), tx, ty, vx, vy, sx, sy)


def _is_test(x: torch.Tensor) -> torch.Tensor:
    # tiles in [-1, 1]: the marker 7 maps to 7 / 127.5 - 1
    return (x[:, :, 0, 0] - (7 / 127.5 - 1)).abs().max(dim=1).values < 1e-4


def test_same_seed_gives_identical_metrics():
    splits = make_splits()
    arms = {"augmented": Extra(splits.train_x[:2].copy(), splits.train_y[:2].copy())}
    a, _ = evaluate_arms(splits, arms, RECIPE, seeds=[3])
    b, _ = evaluate_arms(splits, arms, RECIPE, seeds=[3])
    assert [o.test for o in a] == [o.test for o in b]
    assert [o.val_balanced_accuracy for o in a] == [o.val_balanced_accuracy for o in b]
    assert {o.arm for o in a} == {"baseline", "augmented"}
    assert [o.num_synthetic for o in a] == [0, 2]


def test_test_split_never_reaches_model_selection(monkeypatch):
    import histodiff.train.backbone as bb

    events: list[str] = []
    real_fit, real_predict = bb.fit_classifier, bb.predict_proba
    state = {"in_fit": False}

    def spy_predict(model, x, *args, **kwargs):
        if bool(_is_test(x).any()):
            assert not state["in_fit"], "test tiles were scored during model selection"
            assert bool(_is_test(x).all())
            events.append("score_test")
        else:
            events.append("predict_val" if state["in_fit"] else "predict_other")
        return real_predict(model, x, *args, **kwargs)

    def spy_fit(train_x, train_y, val_x, val_y, **kwargs):
        assert not bool(_is_test(train_x).any()) and not bool(_is_test(val_x).any()), "test tiles reached selection"
        state["in_fit"] = True
        events.append("fit_start")
        try:
            return real_fit(train_x, train_y, val_x, val_y, **kwargs)
        finally:
            state["in_fit"] = False
            events.append("fit_end")

    monkeypatch.setattr(bb, "predict_proba", spy_predict)
    monkeypatch.setattr(downstream, "predict_proba", spy_predict)
    monkeypatch.setattr(downstream, "fit_classifier", spy_fit)
    outcomes, _ = evaluate_arms(make_splits(), {}, RECIPE, seeds=[0])
    # selection predicts validation once per epoch; the test split is scored once, after fit_end
    assert events == ["fit_start", "predict_val", "predict_val", "fit_end", "score_test"]
    assert outcomes[0].test["num_test"] == 6


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"classes \['zebra'\] are not among the real classes"):
        check_labels("synthetic tiles", ["dark", "zebra"], CLASSES, require_all=True)
    with pytest.raises(ValueError, match=r"class\(es\) \['light'\] have no tiles"):
        check_labels("synthetic tiles", ["dark", "dark"], CLASSES, require_all=True)
    splits = make_splits()
    splits.train_y[:] = 0
    with pytest.raises(ValueError, match=r"real train split: class\(es\) \['light'\] have no tiles"):
        evaluate_arms(splits, {}, RECIPE, seeds=[0])
    bad = RECIPE.model_copy(update={"backbone": "resnet_does_not_exist"})
    with pytest.raises(ValueError, match="timm has no model named 'resnet_does_not_exist'"):
        evaluate_arms(make_splits(), {}, bad, seeds=[0])
    splits = make_splits()
    splits.test_x, splits.test_y = splits.test_x[:0], splits.test_y[:0]
    with pytest.raises(ValueError, match="test split is empty"):
        evaluate_arms(splits, {}, RECIPE, seeds=[0])


def _write_shards(uri, tiles, labels, dataset="synthetic"):
    from histodiff.data import shards

    table = shards.tiles_table(tiles, labels, dataset, [f"{dataset}-{i}" for i in range(len(tiles))])
    shards.write_table(table, f"{uri}/{shards.shard_name(0)}", Store())
    shards.write_manifest(shards.Manifest(uri, [shards.shard_name(0)], len(tiles), sorted(set(labels)),
                                          tiles.shape[1], fingerprint=f"{dataset}fp"), Store())


@pytest.mark.slow
def test_run_on_ray_writes_table_logs_gain_and_skips_rerun(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from histodiff.config import load_config

    real = make_splits(n=12)
    syn = make_splits(seed=5, n=8)
    names = lambda ids: [CLASSES[i] for i in ids]  # noqa: E731
    _write_shards(str(tmp_path / "shards" / "labeled"), real.train_x, names(real.train_y), "labeled")
    _write_shards(str(tmp_path / "shards" / "labeled_test"), real.test_x, names(real.test_y), "test")
    _write_shards(str(tmp_path / "synthetic" / "accepted"), syn.train_x, names(syn.train_y))
    _write_shards(str(tmp_path / "synthetic" / "generated"), make_splits(seed=6, n=10).train_x,
                  names(make_splits(seed=6, n=10).train_y))
    db = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config("tiny", [f"paths.root={tmp_path}", f"tracking.tracking_uri={db}", "evaluation.epochs=1",
                               "evaluation.steps=3",
                               "evaluation.image_size=16", "evaluation.backbone=test_resnet", "evaluation.seeds=[0,1]", "evaluation.batch_size=8",
                               "evaluation.memorisation_pairs=2", "evaluation.synthetic_fraction=0.25",
                               "evaluation.controls=[unfiltered,duplicated_real,classical_aug]",
                               # stand-in synthetic tiles have no synthesis lineage to read selector scores from
                               "evaluation.synthetic_weighting=none",
                               "data.labels_per_class=4", "data.val_fraction=0.34"])
    result = run_stage(evaluate, cfg)
    assert len(result.outcomes) == 2 * 5 and not result.skipped
    # labels_per_class=4 of 6 per class after validation -> 8 real tiles; every accepted synthetic tile (8,
    # 4 per class) is used, and each control gets the same volume per class
    volumes = {(o.arm, o.num_real, o.num_synthetic) for o in result.outcomes}
    assert volumes == {("baseline", 8, 0), ("augmented", 8, 8), ("unfiltered", 8, 8), ("duplicated_real", 8, 8),
                       ("classical_aug", 8, 8)}
    assert all(o.test["num_test"] == 12 for o in result.outcomes)
    g = result.gains["augmented"]["accuracy"]
    per_seed = {o.seed: o.test["accuracy"] for o in result.outcomes if o.arm == "augmented"}
    base = {o.seed: o.test["accuracy"] for o in result.outcomes if o.arm == "baseline"}
    assert g["per_seed"] == pytest.approx([per_seed[s] - base[s] for s in (0, 1)])
    assert result.quality["extractor"] == "baseline:test_resnet" and result.quality["fid"] >= -1e-6
    table = (tmp_path / "evaluation" / "table.txt").read_text()
    assert "gain augmented - baseline" in table and "baseline" in table
    assert (tmp_path / "evaluation" / "confusion_augmented.png").stat().st_size > 1000
    assert (tmp_path / "evaluation" / "quality" / "closest_pairs.png").is_file()
    client = MlflowClient(tracking_uri=db)
    run = client.search_runs([client.get_experiment_by_name("histodiff-tiny").experiment_id])[0]
    assert run.data.metrics["gain_accuracy_points"] == pytest.approx(100 * g["mean"], abs=1e-3)  # points
    assert "gain_balanced_accuracy_points_ci_low" in run.data.metrics
    assert run.data.tags["mlflow.runType"] == "evaluation" and run.data.tags["histodiff.expected"]
    assert run.info.run_id == result.run_id
    again = run_stage(evaluate, cfg)
    assert again.skipped and again.gains == result.gains


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_and_score_on_gpu():
    recipe = RECIPE.model_copy(update={"use_gpu": True})
    outcomes, _ = evaluate_arms(make_splits(), {}, recipe, seeds=[0])
    assert 0.0 <= outcomes[0].test["accuracy"] <= 1.0 and outcomes[0].test["num_test"] == 6


def test_table_columns_stay_aligned_for_long_control_names():
    metrics = {m: [0.9, 0.01] for m in ("accuracy", "balanced_accuracy", "macro_f1")}
    summary = {"baseline": metrics, "augmented": metrics, "unguided_selected": metrics, "duplicated_real": metrics}
    rows = downstream.format_table(summary, {}, 2).splitlines()[2:]
    assert len(rows) == 4 and len({row.index("90.0") for row in rows}) == 1  # every arm's first figure in one column


def test_confidence_weighting_reads_each_tiles_selector_score_and_a_zero_weight_teaches_nothing(tmp_path):
    """evaluation.synthetic_weighting=confidence: each accepted tile's loss weight is its selector score from the
    synthesis lineage (by tile id); a row of weight 0 leaves the step exactly as if it were not in the batch."""
    import copy

    import pyarrow as pa

    from histodiff.data import shards
    from histodiff.stages.synthesize import LINEAGE, write_tile_set
    from histodiff.train.backbone import train_step

    splits = make_splits()
    uri = str(tmp_path / "synthetic" / "accepted")
    labels = [CLASSES[i] for i in splits.train_y[:4]]
    _write_shards(uri, splits.train_x[:4], labels)  # tiles the synthesize stage did not write: no lineage named
    with pytest.raises(FileNotFoundError, match="no synthesis lineage at .*synthetic_weighting=none"):
        downstream.load_synthetic(uri, Store(), CLASSES, "confidence")
    # The synthesize stage's writer names the lineage (a sibling of the tile set) in the set's manifest.
    write_tile_set(uri, Store(), list(splits.train_x[:4]), labels, [f"synthetic-{i}" for i in range(4)], 8, {},
                   {"lineage": LINEAGE})
    with pytest.raises(FileNotFoundError, match="no synthesis lineage at .*lineage.parquet"):  # named, not written
        downstream.load_synthetic(uri, Store(), CLASSES, "confidence")
    lineage = pa.table({"tile_id": [f"synthetic-{i}" for i in (3, 9, 0, 2, 1)],  # rejected tile 9 too, any order
                        "selector_score": [0.25, 0.1, 0.9, 0.5, 0.75]})
    shards.write_table(lineage, str(tmp_path / "synthetic" / LINEAGE), Store())
    weighted = downstream.load_synthetic(uri, Store(), CLASSES, "confidence")
    np.testing.assert_allclose(weighted.weight, [0.9, 0.75, 0.5, 0.25])
    assert downstream.load_synthetic(uri, Store(), CLASSES, "none").weight is None
    np.testing.assert_array_equal(weighted.y, splits.train_y[:4])

    torch.manual_seed(0)  # no BatchNorm: rows are independent, so "not in the batch" is well defined
    a = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    b = copy.deepcopy(a)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 1, 0])
    train_step(a, torch.optim.SGD(a.parameters(), lr=0.1), x, y, torch.tensor([0.9, 0.5, 0.0, 0.0]))
    train_step(b, torch.optim.SGD(b.parameters(), lr=0.1), x[:2], y[:2], torch.tensor([0.9, 0.5]))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)
