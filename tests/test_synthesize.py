"""Synthesis stage: input checks, deterministic work items, shards + lineage + report, skip on rerun."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench import toys as toy
from histodiff import storage
from histodiff.augment import synthesize
from histodiff.checkpoint import MODEL_META, model_meta
from histodiff.config import ConfigError, load_config
from histodiff.data import shards
from histodiff.runner import run_stage
from histodiff.stages import selector
from histodiff.stages import synthesize as stage
from histodiff.storage import Store


@pytest.fixture(scope="module")
def toy_cfg(tmp_path_factory, ray_local):
    cfg = toy.write_toy_inputs(str(tmp_path_factory.mktemp("synth")))
    run_stage(selector, cfg)
    return cfg


def _plan(cfg):
    return stage.spec(cfg, Store()).plan


def test_bad_settings_fail_with_one_clear_error(toy_cfg, tmp_path):
    with pytest.raises(ConfigError, match="synthesis.selector.threshold"):
        load_config("tiny", ["synthesis.selector.threshold=1.5"])
    with pytest.raises(ConfigError, match="synthesis.guidance_scale"):
        load_config("tiny", ["synthesis.guidance_scale=-1"])
    bad = toy_cfg.model_copy(deep=True)
    bad.synthesis.classes = ["A", "NOPE"]
    with pytest.raises(ValueError, match=r"\['NOPE'\] are not classes of the latent classifier"):
        stage.spec(bad, Store())
    # A classifier trained on another autoencoder's latents.
    import shutil

    other = str(tmp_path / "clf")
    shutil.copytree(toy_cfg.paths.classifier, other)
    meta = model_meta(other, Store())
    Store().write_json(storage.join(other, MODEL_META), {**meta, "autoencoder_sha256": "f" * 64})
    bad = toy_cfg.model_copy(deep=True)
    bad.paths.classifier = other
    with pytest.raises(ValueError, match="classifier .* was trained on latents of autoencoder ffffffffffff"):
        stage.spec(bad, Store())
    bad.paths.classifier = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        stage.spec(bad, Store())


def test_work_items_are_deterministic_and_batch_independent(toy_cfg):
    plan = _plan(toy_cfg)
    worker = synthesize.SynthesisWorker(plan, Store(), use_gpu=False)
    item = synthesize.work_item(plan, "B", 1)
    assert item["indices"] == [4, 5, 6, 7]
    a, b = worker.generate(item), worker.generate(item)
    assert np.array_equal(a["tiles"], b["tiles"]) and np.array_equal(a["score"], b["score"])
    # Tile 6 alone gives (nearly) the same pixels as inside its batch: it depends on its own seed only.
    single = worker.generate({**item, "indices": [6], "seeds": [item["seeds"][2]]})
    assert np.abs(single["tiles"][0].astype(int) - a["tiles"][2].astype(int)).max() <= 1
    other = worker.generate(synthesize.work_item(plan, "B", 2))
    assert not np.array_equal(other["tiles"], a["tiles"])
    assert synthesize.tile_seed(0, "B", 6) == item["seeds"][2] != synthesize.tile_seed(1, "B", 6)


def test_mode_none_keeps_tiles_whatever_their_score():
    passed = np.array([True, False, True, True, False, True])
    score = np.array([0.1, 0.9, 0.3, 0.99, 0.2, 0.5])
    # the unfiltered control: the first `cap` tiles in generation order, never the best-scoring ones
    assert synthesize.keep_mask(np.ones(6, bool), score, "none", 3).tolist() == [True, True, True, False, False, False]
    # a selection rule: the best-scoring tiles among those that passed it
    assert synthesize.keep_mask(passed, score, "confidence", 2).tolist() == [False, False, False, True, False, True]


@pytest.mark.slow
def test_synthesis_writes_shards_lineage_report_and_skips(ray_local, toy_cfg):
    cfg = toy_cfg.model_copy(deep=True)
    cfg.synthesis.num_actors = 2
    result = run_stage(stage, cfg)
    loc = Store().resolve(result.lineage_uri)
    lineage = pq.read_table(loc.path, filesystem=loc.fs).to_pylist()
    # One lineage row per generated tile, accepted or not.
    assert len(lineage) == sum(result.generated.values()) > 0
    metas = {k: model_meta(getattr(cfg.paths, k), Store())["sha256"] for k in ("denoiser", "autoencoder", "classifier")}
    for row in lineage:
        assert row["denoiser_sha256"] == metas["denoiser"] and row["classifier_sha256"] == metas["classifier"]
        assert row["autoencoder_sha256"] == metas["autoencoder"] and len(row["selector_sha256"]) == 64
        assert row["guidance_scale"] == 1.0 and row["steps"] == 4 and row["eta"] == 1.0
        assert row["accepted"] <= row["passed_rule"]
    for c in toy.TOY_CLASS_NAMES:
        rows = [r for r in lineage if r["class"] == c]
        accepted = sum(r["accepted"] for r in rows)
        assert accepted == result.accepted[c] <= cfg.synthesis.accepted_per_class
        # Stops as soon as the quota is met, otherwise spends the whole budget.
        assert accepted == cfg.synthesis.accepted_per_class or len(rows) == cfg.synthesis.max_samples_per_class
    manifest = shards.read_manifest(result.accepted_uri, Store())
    table = shards.read_table(result.accepted_uri, Store()).to_pylist()
    assert manifest.num_tiles == len(table) == sum(r["accepted"] for r in lineage)
    assert {r["source"] for r in table} == {r["tile_id"] for r in lineage if r["accepted"]}
    assert all(r["dataset"] == "synthetic" and r["width"] == 8 for r in table)
    by_id = {r["tile_id"]: r for r in lineage}
    assert all(by_id[r["source"]]["class"] == r["label"] for r in table)
    report = Store().read_json(storage.join(cfg.paths.synthetic, stage.REPORT))
    assert {c: r["generated"] for c, r in report.items()} == result.generated
    for c, r in report.items():  # selectivity (the rule) and quota fill (the stop) are reported apart
        assert r["selectivity"] == pytest.approx(r["passed_rule"] / r["generated"])
        assert r["quota_fill"] == pytest.approx(r["accepted"] / cfg.synthesis.accepted_per_class)
    # every generated tile, accepted or not, is kept for the unfiltered control and for audits
    generated = shards.read_table(result.generated_uri, Store()).to_pylist()
    assert sorted(r["source"] for r in generated) == sorted(r["tile_id"] for r in lineage)
    assert {r["source"] for r in table} <= {r["source"] for r in generated}
    assert all(sum(r["score_histogram"]) == r["generated"] for r in report.values())
    # Same seed, same tiles: the Ray actors' tiles match a local worker's for the same work item.
    worker = synthesize.SynthesisWorker(_plan(cfg), Store(), use_gpu=False)
    first = [r for r in table if by_id[r["source"]]["batch"] == 0]
    if first:
        row = first[0]
        local = worker.generate(synthesize.work_item(_plan(cfg), row["label"], 0))
        index = int(row["source"].rsplit("-", 1)[1])
        ray_tile = shards.decode_png(row["image"]).astype(int)
        # Same pixels up to float reductions that differ with the thread count of the process.
        assert np.abs(local["tiles"][index].astype(int) - ray_tile).max() <= 1
    again = run_stage(stage, cfg)
    assert again.skipped and again.accepted == result.accepted


def test_anchored_synthesis_varies_its_anchors(toy_cfg):
    """Strength near 0 gives back each anchor's decoding; strength 1 ignores the anchors (generation from noise)."""
    import torch
    from diffusers import AutoencoderKL

    from histodiff.checkpoint import load_exported
    from histodiff.data.encode import load_latents

    near = toy_cfg.model_copy(deep=True)
    near.synthesis.strength = 0.01
    plan = _plan(near)
    assert plan.anchors is not None and sorted(plan.anchors.sha1s) == toy.TOY_CLASS_NAMES
    item = synthesize.work_item(plan, "B", 0)
    assert item["anchors"][0] == plan.anchors.sha1s["B"][0] and len(set(item["anchors"])) > 1
    out = synthesize.SynthesisWorker(plan, Store(), use_gpu=False).generate(item)
    z, _, sha1s, meta = load_latents(plan.anchors.latents_uris[0], Store())
    vae, _ = load_exported(AutoencoderKL, near.paths.autoencoder, Store())
    anchor_z = torch.stack([z[sha1s.index(a)] for a in item["anchors"]])
    with torch.no_grad():
        decoded = shards.to_uint8(vae.decode(anchor_z).sample.float())
    assert np.abs(out["tiles"].astype(int) - decoded.astype(int)).max() <= 1
    full = toy_cfg.model_copy(deep=True)
    full.synthesis.strength = 1.0
    assert _plan(full).anchors is None
    plain = synthesize.SynthesisWorker(_plan(toy_cfg), Store(), use_gpu=False).generate(
        synthesize.work_item(_plan(toy_cfg), "B", 0))
    assert np.array_equal(plain["tiles"], synthesize.SynthesisWorker(_plan(full), Store(), use_gpu=False).generate(
        synthesize.work_item(_plan(full), "B", 0))["tiles"])
