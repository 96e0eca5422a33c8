"""The one training-loop skeleton every Ray Train stage runs: restore, step, report, checkpoint.

A stage fills in a :class:`Trainee` (its state and its step); :func:`train` does the rest
the same way for the autoencoder, the denoiser and the latent classifier: it restores the
newest complete checkpoint, calls ``train_step`` until ``Cadence.steps``, averages the step
metrics over each report window, reports every ``report_every`` steps (to Ray Train and to the
stage's MLflow run, from rank 0), and checkpoints every ``checkpoint_every`` steps and at the
end. Callbacks (``callback(rank, step)``, after every step) are how tests inject faults.
Outside Ray Train the same loop runs in plain PyTorch (reports are logged, nothing is saved).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from histodiff import console
from histodiff.train import common

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cadence:
    """How long to train and how often to report and checkpoint."""

    steps: int
    report_every: int
    checkpoint_every: int


class Trainee(Protocol):
    """What a training stage fills in: its global step, one optimizer step, and its checkpoint."""

    step: int

    def train_step(self) -> dict[str, float]:
        """Run one optimizer step on the trainee's own next batch; return its metrics."""

    def checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Return (tensor groups, JSON state) that resume training exactly."""

    def restore(self, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
        """Load a checkpoint written by :meth:`checkpoint` (and set ``step``)."""

    def report_extras(self, report: dict[str, float], saving: bool) -> dict[str, float]:
        """Return extra metrics for a report (e.g. a probe loss at checkpoints); may log artifacts."""


def train(trainee: Trainee, cadence: Cadence, loop_config: dict, *, device: torch.device | str = "cpu",
          callbacks: Sequence[Callable[[int, int], None]] = (), restore: bool = True) -> None:
    """Train ``trainee`` to ``cadence.steps``, first resuming from the newest complete checkpoint of this run.

    ``restore=False`` when the caller restored already (it needs the restored state before training).
    """
    info = common.worker_info()
    tracker = common.worker_tracker(loop_config)
    restored = common.restore(common.latest_complete_checkpoint(), device) if restore else None
    if restored is not None:
        trainee.restore(*restored)
        log.info("rank %d resumed at step %d", info.rank, trainee.step)
    window: dict[str, list[float]] = {}
    t0, since = time.perf_counter(), 0
    progress = _progress(trainee, cadence, loop_config) if info.rank == 0 else None
    while trainee.step < cadence.steps:
        metrics = trainee.train_step()
        loss = metrics.get("loss")
        if loss is not None and not math.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {trainee.step}; lower the learning rate")
        for callback in callbacks:
            callback(info.rank, trainee.step)
        for key, value in metrics.items():
            window.setdefault(key, []).append(float(value))
        since += 1
        done = trainee.step >= cadence.steps
        saving = trainee.step % cadence.checkpoint_every == 0 or done
        if not saving and trainee.step % cadence.report_every:
            continue
        report = {key: sum(values) / len(values) for key, values in window.items()}
        report["steps_per_s"] = since / max(time.perf_counter() - t0, 1e-9)
        report.update(trainee.report_extras(report, saving))
        window.clear()
        tracker.log_metrics(report, step=trainee.step)
        if progress is not None:
            progress.update(trainee.step, _headline(report), rate=report["steps_per_s"], force=done)
        if saving:
            tensors, state = trainee.checkpoint()
            common.report(report, trainee.step, tensors, state, loop_config)
        else:
            common.report(report, trainee.step, loop_config=loop_config)
        t0, since = time.perf_counter(), 0
    tracker.release()  # send what waited for MLflow, or leave it for the driver


def _progress(trainee: Trainee, cadence: Cadence, loop_config: dict) -> console.Progress:
    """Return the console progress of this training run (rank 0 prints it; the driver shows it)."""
    label = str(loop_config.get("progress_label") or "training")
    return console.Progress(label, cadence.steps, "steps")


def _headline(report: dict[str, float]) -> dict[str, float]:
    """Return the figures a progress line shows: the loss(es) and samples/s when the trainee knows them."""
    out = {k: v for k, v in report.items() if "loss" in k or k in ("l1", "accuracy")}
    out = dict(list(out.items())[:3])
    if "samples_per_s" in report:
        out["samples/s"] = report["samples_per_s"]
    return out
