"""The GPU check (bench.areas.gpu): its --small CPU dry run goes through every figure's path."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import gpu_figures, runner
from bench.areas import gpu

EXPECTED = {"gpu_bf16_matmul_tflops", "mfu_gpu", "gpu_denoiser_samples_per_s", "gpu_denoiser_train_flops_per_sample",
            "gpu_autoencoder_samples_per_s", "gpu_guided_vs_unguided_step_ratio", "gpu_guided_step_ms",
            "gpu_backbone_samples_per_s", "mfu_gpu_compiled", "gpu_denoiser_compiled_samples_per_s"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _numbers(value):
    return list(value.values()) if isinstance(value, dict) else [value]


def test_small_dry_run_writes_every_figure(tmp_path, capsys):
    assert gpu.main(["--small", "--out", str(tmp_path)]) == 0
    figures = json.loads((tmp_path / gpu.RESULTS).read_text())
    assert set(figures) == EXPECTED
    assert not (tmp_path / gpu.ERRORS).exists()
    for key, fig in figures.items():
        runner.check_entry(key, fig)
        assert "CPU --small dry run" in fig["measured"] and torch.__version__ in fig["measured"]
        for v in _numbers(fig["value"]):
            assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (key, fig["value"])
    assert set(figures["gpu_guided_step_ms"]["value"]) == {"unguided", "guided", "guided_bf16_classifier"}
    assert figures["gpu_guided_vs_unguided_step_ratio"]["goal"].startswith("<= 1.7")
    assert figures["mfu_gpu"]["goal"].startswith("> 0.23")
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == {"done": sorted(EXPECTED), "errors": {}, "not_finite_positive": []}


def test_one_failing_figure_keeps_the_others(tmp_path, monkeypatch):
    def boom(s):
        raise RuntimeError("planted")

    monkeypatch.setattr(gpu, "FIGURES", {"peak": gpu_figures.peak, "boom": boom, "after": gpu_figures.peak})
    s = gpu.measure(small=True, out=str(tmp_path))
    assert set(json.loads((tmp_path / gpu.RESULTS).read_text())) == {"gpu_bf16_matmul_tflops"}
    assert json.loads((tmp_path / gpu.ERRORS).read_text()) == {"boom": "RuntimeError: planted"}
    assert set(s.errors) == {"boom"}


def test_out_of_memory_halves_the_batch():
    tried = []

    def fn(b):
        tried.append(b)
        if b > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (planted)")
        return b * 10

    assert gpu_figures.halving(fn, 64, torch.device("cpu")) == (160, 16)
    assert tried == [64, 32, 16]
    with pytest.raises(torch.OutOfMemoryError):
        gpu_figures.halving(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("always")), 2, torch.device("cpu"))


def test_benchmark_area_returns_nothing_without_cuda(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "gpu" in runner.areas()
    with caplog.at_level("INFO", logger="bench.areas.gpu"):
        assert gpu.run(str(tmp_path)) == {}
    assert "no CUDA" in caplog.text
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="--small"):
        gpu_figures.make_setup(small=False)
