"""The one stage runner: a spec's fields decide skip or rerun, a VERSION bump reruns, a crash leaves no marker."""

from __future__ import annotations

import os

import pytest

from bench import toys
from histodiff import runner
from histodiff.cli import STAGE_NAMES
from histodiff.config import _merge, config_from_dict, parse_overrides
from histodiff.runner import MARKER, fingerprint, run_stage
from histodiff.stages import NAMES, STAGES, by_name, selector
from histodiff.storage import Store


def _with(cfg, *overrides):
    return config_from_dict(_merge(cfg.public_dict(), parse_overrides(list(overrides))))


@pytest.fixture
def toy_cfg(tmp_path):
    return toys.write_toy_inputs(str(tmp_path))


def test_stage_names_are_module_names_and_the_cli_knows_them():
    assert NAMES == tuple(s.__name__.rsplit(".", 1)[1] for s in STAGES) == STAGE_NAMES
    assert NAMES.index("selector") == NAMES.index("classifier") + 1 == NAMES.index("synthesize") - 1
    for stage in STAGES:
        assert isinstance(stage.VERSION, int) and callable(stage.spec) and callable(stage.work)
    with pytest.raises(ValueError, match="unknown stage 'foo'; choose one of ingest, autoencoder"):
        by_name("foo")


def test_the_fingerprint_is_the_spec_the_work_receives(toy_cfg):
    store = Store()
    base = selector.spec(toy_cfg, store)
    # A field the selector uses, from another section of the config (the recipe's augmentation): it is
    # part of the spec, so changing it changes the fingerprint. An unrelated field changes nothing.
    assert fingerprint(selector, selector.spec(_with(toy_cfg, "evaluation.augment=none"), store)) != \
        fingerprint(selector, base)
    assert fingerprint(selector, selector.spec(_with(toy_cfg, "evaluation.weight_decay=0.5"), store)) != \
        fingerprint(selector, base)
    assert fingerprint(selector, selector.spec(_with(toy_cfg, "denoiser.lr=0.1", "evaluation.seeds=[7]"), store)) \
        == fingerprint(selector, base)
    # The labeled shards' content is in the spec (their manifest fingerprint), not only their path.
    assert base.split.labeled_fingerprint == "toy"


@pytest.mark.slow
def test_a_used_field_or_a_version_bump_reruns_the_stage_and_nothing_else_does(ray_local, toy_cfg, monkeypatch):
    first = run_stage(selector, toy_cfg)
    assert not first.skipped and first.sha256 and first.classes == toys.TOY_CLASS_NAMES
    marker = os.path.join(toy_cfg.paths.selector, MARKER)
    assert Store().read_json(marker)["fingerprint"] == fingerprint(selector, selector.spec(toy_cfg, Store()))
    assert run_stage(selector, toy_cfg).skipped
    assert run_stage(selector, _with(toy_cfg, "denoiser.lr=0.1", "synthesis.guidance_scale=7")).skipped
    changed = run_stage(selector, _with(toy_cfg, "evaluation.augment=none"))
    assert not changed.skipped
    assert run_stage(selector, _with(toy_cfg, "evaluation.augment=none")).skipped
    monkeypatch.setattr(selector, "VERSION", selector.VERSION + 1)  # the algorithm changed
    assert not run_stage(selector, _with(toy_cfg, "evaluation.augment=none")).skipped


def test_a_crashed_stage_leaves_no_marker_and_runs_again(toy_cfg, monkeypatch):
    def broken(spec, ctx):
        raise RuntimeError("disk full")

    monkeypatch.setattr("histodiff.runtime.init_ray", lambda cfg, **kw: None)  # this stage needs no Ray
    monkeypatch.setattr(selector, "work", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_stage(selector, toy_cfg)
    assert not os.path.exists(os.path.join(toy_cfg.paths.selector, MARKER))
    assert runner.finished(selector, selector.spec(toy_cfg, Store()), Store()) is None
