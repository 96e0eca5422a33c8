"""The autoencoder, ingest, guidance, generative and tracking benchmark areas run for real at tiny size and return well-formed figures.

Each test calls the area's ``run()`` on the session's Ray (the areas reuse an initialised Ray and
leave it running), with the area's size knobs lowered; production defaults are untouched. The
figures are not judged against their goals here (tiny sizes on a shared machine), only checked
for shape: every entry passes ``bench.runner.check_entry`` and every number is finite and positive.
"""

from __future__ import annotations

import json
import math

import pytest

from bench import runner

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _numbers(value):
    """Return every number in a figure's value (a number, or a dict of numbers, possibly nested)."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    assert isinstance(value, (int, float)) and not isinstance(value, bool), value
    return [value]


def _check(figures: dict, expected: set[str]) -> None:
    assert set(figures) == expected
    for key, fig in figures.items():
        runner.check_entry(key, fig)
        assert isinstance(fig["unit"], str) and fig["unit"] and isinstance(fig["goal"], str) and fig["goal"]
        for n in _numbers(fig["value"]):
            assert math.isfinite(n) and n > 0, (key, fig["value"])


def test_autoencoder_area_runs_tiny(ray_local, tmp_path):
    from bench.areas import autoencoder

    figures = autoencoder.run(str(tmp_path), n_tiles=128, warmup_steps=1, measured_steps=4)
    _check(figures, {"cached_vs_onthefly_ratio", "cached_vs_onthefly_ideal", "cached_vs_onthefly_detail"})
    detail = figures["cached_vs_onthefly_detail"]["value"]
    assert set(detail) == {"cached_samples_per_s", "onthefly_samples_per_s", "fraction_of_ideal",
                           "isolated_decode_ms_per_sample", "isolated_encode_ms_per_sample",
                           "isolated_train_ms_per_sample"}


def test_ingest_area_runs_tiny(ray_local, tmp_path):
    from bench.areas import ingest

    figures = ingest.run(str(tmp_path), n_tiles=200)
    _check(figures, {"ingest_tiles_per_s_shards", "ingest_tiles_per_s_loose", "ingest_tiles_per_s_naive",
                     "ingest_shards_vs_loose_ratio", "ingest_shards_vs_naive_ratio"})


def test_guidance_area_runs_tiny(ray_local, tmp_path):
    from bench.areas import guidance

    figures = guidance.run(str(tmp_path), unet_steps=30, classifier_steps=30, ratio_repeats=1,
                           accepted_per_class=2, max_samples_per_class=8)
    _check(figures, {"guided_vs_unguided_step_ratio", "accepted_tiles_per_s", "toy_guidance_precision_guided",
                     "toy_guidance_precision_unguided"})


def test_generative_area_runs_tiny(ray_local, tmp_path):
    from bench.areas import generative

    figures = generative.run(str(tmp_path), two_node_rounds=1, rounds=1)  # the two-node layouts in a child process
    _check(figures, {"ray_train_overhead_ratio", "mfu_cpu", "rss_10x_over_1x", "two_vs_one_worker_ratio",
                     "two_plain_processes_vs_one_ratio", "two_ddp_processes_vs_one_ratio",
                     "two_workers_in_memory_vs_one_ratio",
                     "denoiser_samples_per_s", "multinode_two_node_vs_one_node_ratio"})
    assert "best of 1 each" in figures["multinode_two_node_vs_one_node_ratio"]["goal"]


def test_tracking_area_runs_tiny(tmp_path):
    from bench.areas import tracking

    _check(tracking.run(str(tmp_path)), {"tracking_log_ms_per_step", "tracking_buffered_ms_per_step",
                                         "tracking_dead_server_total_s"})


def test_the_ddp_knobs_command_measures_every_variant_for_real(capsys):
    """`python -m bench.ddp_knobs` at one step per variant: two real gloo processes, every variant timed."""
    from bench import ddp_knobs

    assert ddp_knobs.main(["--rounds", "1", "--steps", "1"]) == 0
    table = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(table) == set(ddp_knobs.VARIANTS) and all(ms > 0 for ms in table.values())
    with pytest.raises(SystemExit):
        ddp_knobs.main(["--rounds", "0"])
