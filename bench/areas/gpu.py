"""GPU check of histodiff's own steps in plain PyTorch: denoiser MFU, autoencoder, guidance, backbone.

No Ray, MLflow or S3: each figure runs the stage's own per-worker code (the functions a Ray
Train worker calls) on one GPU at the ``paper`` preset's shapes, under the stages' bf16
autocast (:func:`histodiff.runtime.autocast`). Each figure is measured in its own try, and
``<out>/histodiff_gpu.json`` (figures only, in the benchmark format) is rewritten after each,
so a run cut short still reports; failures go to ``histodiff_gpu_errors.json`` and the log.

- ``gpu_bf16_matmul_tflops``: an 8192^3 bf16 matmul (:func:`bench.common.matmul_flops`), the peak
  the MFU is taken against; ``gpu_anchor.json`` (the baseline script) measures the same product.
- ``mfu_gpu``, ``gpu_denoiser_samples_per_s``, ``gpu_denoiser_train_flops_per_sample``:
  ``train.denoiser.train_step`` on 64x64x3 latents at the paper batch (halved on OOM), eager
  (the preset's ``denoiser.compile=true``: ``mfu_gpu_compiled``), FLOPs counted by
  ``torch.utils.flop_counter`` (:func:`bench.common.plain_rate`). Target > 0.23, the H200 eager baseline.
- ``mfu_gpu_compiled``, ``gpu_denoiser_compiled_samples_per_s``: the same with ``denoiser.compile=true``
  (last: compilation takes minutes).
- ``gpu_autoencoder_samples_per_s``: ``train.autoencoder.train_step`` on 256 px tiles at the paper batch.
- ``gpu_guided_vs_unguided_step_ratio``: a DDIM step of ``diffusion.sampling.ddim_sample`` guided by
  the paper-size latent classifier vs unguided, as ``SynthesisWorker.generate`` calls it. Target <= 1.7.
  ``gpu_guided_step_ms`` adds the same guided step with the classifier under bf16 autocast.
- ``gpu_backbone_samples_per_s``: the downstream backbone's (timm, random init) training step as
  ``train.backbone.fit_classifier`` takes it: augment on the CPU, copy, resize to 224, bf16.

  python -m bench.areas.gpu [--out DIR]    # from the repo root, on a GPU (about a minute on an H100)
  python -m bench.areas.gpu --small        # toy sizes on the CPU: a dry run of every path

The figures themselves are in :mod:`bench.gpu_figures`. As a benchmark area (``histodiff bench gpu``),
:func:`run` returns no figures without CUDA.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
from typing import Any

import torch

from bench.gpu_figures import FIGURES, Setup, free, make_setup

log = logging.getLogger(__name__)

RESULTS = "histodiff_gpu.json"
ERRORS = "histodiff_gpu_errors.json"


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def measure(small: bool = False, out: str | None = None, only: list[str] | None = None) -> Setup:
    """Measure every figure (or ``only`` those groups), each in its own try; rewrite ``out``'s JSON after each."""
    s = make_setup(small)
    log.info("gpu benchmark on %s", s.measured)
    if out:
        os.makedirs(out, exist_ok=True)
        for name in (RESULTS, ERRORS):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    for name, fn in FIGURES.items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        try:
            got = fn(s)
            s.figures.update(got)
            for key, value in got.items():
                print(json.dumps({key: value}), flush=True)
        except Exception as exc:  # one failure must not lose the other figures
            s.errors[name] = f"{type(exc).__name__}: {exc}"[:1000]
            log.error("gpu figure %s failed:\n%s", name, traceback.format_exc())
            free(s.device)
        log.info("gpu figure %s took %.1f s", name, time.perf_counter() - start)
        if out:
            _write_json(os.path.join(out, RESULTS), s.figures)
            if s.errors:
                _write_json(os.path.join(out, ERRORS), s.errors)
    return s


def run(workdir: str) -> dict[str, dict]:
    """Return the GPU figures (see the module docstring); none without CUDA, so CPU benchmark runs skip it."""
    if not torch.cuda.is_available():
        log.info("no CUDA device: the gpu area measures nothing here (python -m bench.areas.gpu on a GPU)")
        return {}
    s = measure(out=workdir)
    if s.errors and not s.figures:
        raise RuntimeError(f"every gpu figure failed: {s.errors}")
    for name, err in s.errors.items():
        log.error("gpu figure %s failed: %s", name, err)
    return s.figures


def main(argv: list[str] | None = None) -> int:
    """Command line: measure, print each figure as it lands, exit 1 if any figure failed."""
    parser = argparse.ArgumentParser(prog="python -m bench.areas.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="toy sizes on the CPU (a dry run of every path)")
    parser.add_argument("--out", default=".", help=f"folder for {RESULTS} (and {ERRORS} when a figure fails)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(FIGURES)}")
    args = parser.parse_args(argv)
    from histodiff.runtime import setup_logging

    setup_logging()
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figure group(s) {unknown}; choose from {list(FIGURES)}")
    s = measure(args.small, args.out, only)
    bad = [k for k, v in s.figures.items() if not _finite_positive(v["value"])]
    print(json.dumps({"done": sorted(s.figures), "errors": s.errors, "not_finite_positive": bad}), flush=True)
    return 1 if s.errors or bad else 0


def _finite_positive(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(_finite_positive(v) for v in value.values())
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


if __name__ == "__main__":
    sys.exit(main())
