"""Ray Train plumbing shared by every training stage: the one place that builds trainers.

Driver side: :func:`build_trainer` turns the stage's context (``ray`` settings, the checkpoints
URI, the store) into a ``TorchTrainer`` whose run directory is ``<checkpoints>/<run name>``;
rerunning with the same run name resumes from it (Ray Train V2: same ``RunConfig(name, storage_path)``).

Worker side: :func:`report` writes a checkpoint (safetensors + ``state.json`` + ``COMPLETE``
last), uploads it from rank 0 only, with retries and the marker uploaded last, and
:func:`latest_complete_checkpoint` / :func:`restore` find and load the newest checkpoint
that carries its marker, ignoring half-written ones.

Training math stays in plain-PyTorch ``fit``/``train_step`` functions; the helpers here
degrade to no-ops outside a Ray Train worker so those functions also run without Ray.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow.fs as pafs
import torch

from histodiff import checkpoint as ckpt
from histodiff import runtime, tracking
from histodiff.storage import Store, is_s3, redact
from histodiff.tracker import NULL_TRACKER, Tracker

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-step-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-step-(\d+)$")
# Words in S3/pyarrow errors that no retry can fix.
_PERMANENT = ("accessdenied", "access denied", "invalidaccesskeyid", "signaturedoesnotmatch", "nosuchbucket",
              "forbidden")


class CheckpointUploadError(OSError):
    """A checkpoint could not be uploaded after the configured number of tries."""


# Gradients are views of DDP's all-reduce buckets: no copy of every gradient into its bucket and back on
# each step (on a CPU every copy takes the cores the step needs). The benchmarks' plain-DDP runs use it too.
DDP_KWARGS = {"gradient_as_bucket_view": True}


def prepare_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """Return ``model`` ready for Ray Train (DDP across workers with :data:`DDP_KWARGS`, on the worker's device)."""
    from ray.train.torch import prepare_model

    return prepare_model(model, parallel_strategy_kwargs=DDP_KWARGS)


# ----------------------------------------------------------------------------- driver side


def storage_path_and_fs(checkpoints_uri: str, store: Store) -> tuple[str, pafs.FileSystem | None, str]:
    """Return (storage_path for RunConfig, its pyarrow filesystem or None, the URI it names)."""
    if is_s3(checkpoints_uri):
        path = checkpoints_uri[5:].strip("/")
        if not path:
            raise ValueError(f"paths.checkpoints={checkpoints_uri!r} names no bucket; use s3://bucket/prefix")
        # No credentials inside the filesystem that travels (pickled) to the Train controller and
        # workers: each process takes them from its node (see histodiff.runtime.SETTINGS_ENV).
        return path, store.s3_without_keys(), checkpoints_uri
    local = store.resolve(checkpoints_uri).path  # absolute: Ray resolves relative paths elsewhere
    return local, None, local


def build_trainer(ctx: Any, train_loop_per_worker: Callable[[dict], None], loop_config: dict, run_name: str,
                  datasets: dict | None = None) -> Any:
    """Return a TorchTrainer for a stage: scaling, storage, failure and checkpoint policy from its context."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray_cfg = ctx.ray
    path, fs, _ = storage_path_and_fs(ctx.checkpoints_uri, ctx.store)
    if fs is None:
        os.makedirs(path, exist_ok=True)
    scaling = ScalingConfig(
        num_workers=ray_cfg.num_workers,
        use_gpu=ray_cfg.use_gpu,
        resources_per_worker={"CPU": ray_cfg.cpus_per_worker},
        placement_strategy=ray_cfg.placement_strategy,
    )
    run_config = RunConfig(
        name=run_name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=ray_cfg.checkpoints_to_keep),
        # Storage and tracking settings must reach the workers even on a cluster whose
        # job-level runtime_env lacks them (a known Ray + MLflow trap).
        worker_runtime_env={"env_vars": runtime.worker_env(ctx.store.cfg)},
    )
    config = {"upload_attempts": ray_cfg.upload_attempts, "upload_backoff_s": ray_cfg.upload_backoff_s,
              "checkpoint_upload_mode": ray_cfg.checkpoint_upload_mode,
              "threads_per_worker": None if ray_cfg.use_gpu else ray_cfg.threads_per_worker,
              "use_gpu": ray_cfg.use_gpu, "callbacks": tuple(ctx.callbacks),
              "progress_label": getattr(ctx, "stage", "") or run_name,
              **tracking.loop_config(ctx.tracker, ctx.store), **loop_config}
    return TorchTrainer(train_loop_per_worker, train_loop_config=config, scaling_config=scaling,
                        run_config=run_config, datasets=datasets or {})


def list_complete_checkpoints(fs: pafs.FileSystem, run_path: str) -> list[tuple[int, str]]:
    """Return sorted (step, path) of the checkpoints under a run directory that carry COMPLETE."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_path, recursive=False, allow_not_found=True))
    except (OSError, ValueError):
        return []
    out = []
    for info in infos:
        match = _CHECKPOINT_RE.match(os.path.basename(info.path.rstrip("/")))
        if not match or info.type != pafs.FileType.Directory:
            continue
        if fs.get_file_info(f"{info.path}/{ckpt.COMPLETE}").type == pafs.FileType.File:
            out.append((int(match.group(1)), info.path))
    return sorted(out)


def completed_checkpoints(checkpoints_uri: str, run_name: str, store: Store) -> list[tuple[int, Any]]:
    """Return sorted (step, ray.train.Checkpoint-able location) of a run's complete checkpoints (driver side)."""
    path, fs, _ = storage_path_and_fs(checkpoints_uri, store)
    fs = fs or pafs.LocalFileSystem()
    return [(step, (p, fs)) for step, p in list_complete_checkpoints(fs, f"{path}/{run_name}")]


def completed_steps(checkpoints_uri: str, run_name: str, store: Store) -> list[int]:
    """Return the steps of a run's complete checkpoints in storage (driver side)."""
    return [step for step, _ in completed_checkpoints(checkpoints_uri, run_name, store)]


def final_checkpoint(checkpoints_uri: str, run_name: str, store: Store, steps: int, what: str) -> tuple[dict, dict]:
    """Return (tensor groups, state) of a run's newest complete checkpoint, or raise unless it reached ``steps``."""
    import ray.train

    found = completed_checkpoints(checkpoints_uri, run_name, store)
    if not found or found[-1][0] < steps:
        at = f"step {found[-1][0]}" if found else "no complete checkpoint"
        raise RuntimeError(f"{what} training stopped at {at} of {steps} (run {run_name!r} under "
                           f"{checkpoints_uri!r}); rerun with the same config to resume")
    path, fs = found[-1][1]
    return restore(ray.train.Checkpoint(path=path, filesystem=fs))


# ----------------------------------------------------------------------------- worker side


@dataclass(frozen=True)
class WorkerInfo:
    """Where this process sits in the training job (rank 0 of 1 outside Ray Train)."""

    rank: int
    world_size: int
    local_rank: int
    in_ray: bool


def worker_info() -> WorkerInfo:
    """Return this worker's rank and world size; (0, 1) outside a Ray Train worker."""
    try:
        import ray.train

        ctx = ray.train.get_context()
    except (RuntimeError, ImportError):
        return WorkerInfo(0, 1, 0, False)
    return WorkerInfo(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(), True)


def worker_tracker(loop_config: dict) -> Tracker:
    """Return rank 0's tracker on the driver's MLflow run and a no-op one for other ranks."""
    return tracking.worker_tracker(loop_config) if worker_info().rank == 0 else NULL_TRACKER


def checkpoint_dir_name(step: int) -> str:
    """Return the deterministic directory name of the checkpoint at a global step."""
    return f"{CHECKPOINT_PREFIX}{step:09d}"


def latest_complete_checkpoint() -> Any:
    """Return the newest complete ray.train.Checkpoint of this run (Ray's and storage's), or None.

    Ray's own latest checkpoint is used when it carries COMPLETE; the run directory is also
    scanned, so a checkpoint uploaded just before a driver crash is not lost, and a
    half-written one (no COMPLETE) is never chosen.
    """
    import ray.train

    if not worker_info().in_ray:
        return None
    sc = ray.train.get_context().get_storage()
    fs = sc.storage_filesystem
    candidates = list_complete_checkpoints(fs, sc.experiment_fs_path)
    reported = ray.train.get_checkpoint()
    if reported is not None:
        match = _CHECKPOINT_RE.match(os.path.basename(reported.path.rstrip("/")))
        complete = reported.filesystem.get_file_info(f"{reported.path}/{ckpt.COMPLETE}").type == pafs.FileType.File
        if complete and match and all(p != reported.path for _, p in candidates):
            candidates.append((int(match.group(1)), reported.path))
        elif not complete:
            log.warning("ignoring Ray's latest checkpoint %s: it has no %s marker", reported.path, ckpt.COMPLETE)
    if not candidates:
        return None
    step, path = max(candidates)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def restore(checkpoint: Any, device: str | torch.device = "cpu") -> tuple[dict, dict] | None:
    """Return (tensor groups, state) from a ray.train.Checkpoint or a local directory, or None."""
    if checkpoint is None:
        return None
    if hasattr(checkpoint, "as_directory"):  # a ray.train.Checkpoint (local or remote)
        with checkpoint.as_directory() as local:
            return ckpt.load_checkpoint(local, device)
    return ckpt.load_checkpoint(os.fspath(checkpoint), device)


def _is_permanent(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (PermissionError, FileNotFoundError)) or any(w in text for w in _PERMANENT)


def with_retries(fn: Callable[[], Any], what: str, attempts: int, backoff_s: float,
                 sleep: Callable[[float], None] = time.sleep) -> Any:
    """Return fn(); retry transient OSErrors with doubling backoff, raise after ``attempts`` in a row."""
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as exc:
            if _is_permanent(exc) or attempt == attempts:
                raise CheckpointUploadError(redact(
                    f"{what} failed after {attempt} attempt(s) in a row: {exc}. Check that the storage "
                    "endpoint is reachable and the credentials are valid, then rerun with the same "
                    "config to resume from the last complete checkpoint.")) from None
            log.warning("%s failed (attempt %d/%d): %s; retrying in %.1fs", what, attempt, attempts,
                        redact(str(exc)), delay)
            sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def copy_checkpoint_dir(local_dir: str, fs: pafs.FileSystem, dest: str) -> None:
    """Copy a local checkpoint directory to (fs, dest), replacing a stale one, COMPLETE last."""
    if fs.get_file_info(dest).type != pafs.FileType.NotFound:
        fs.delete_dir(dest)  # a half-written leftover of a crashed upload
    fs.create_dir(dest, recursive=True)
    names = sorted(os.listdir(local_dir), key=lambda n: n == ckpt.COMPLETE)
    for name in names:
        with open(os.path.join(local_dir, name), "rb") as src, fs.open_output_stream(f"{dest}/{name}") as out:
            while chunk := src.read(8 << 20):
                out.write(chunk)


def _upload_fn(attempts: int, backoff_s: float) -> Callable[[Any, str], Any]:
    def upload(checkpoint: Any, dir_name: str) -> Any:
        import ray.train

        sc = ray.train.get_context().get_storage()
        dest = sc.build_checkpoint_path_from_name(dir_name)
        with_retries(lambda: copy_checkpoint_dir(checkpoint.path, sc.storage_filesystem, dest),
                     f"checkpoint upload to {dest!r}", attempts, backoff_s)
        return ray.train.Checkpoint(path=dest, filesystem=sc.storage_filesystem)

    return upload


def report(metrics: dict[str, float], step: int, tensors: dict[str, dict[str, torch.Tensor]] | None = None,
           state: dict | None = None, loop_config: dict | None = None) -> None:
    """Report metrics at a step to Ray Train; with tensors, rank 0 also saves a checkpoint.

    Every rank must call this the same number of times (it is a barrier). Outside Ray it
    only logs. ``loop_config`` carries the upload policy set by :func:`build_trainer`.
    """
    import ray.train

    info = worker_info()
    metrics = {**{k: float(v) for k, v in metrics.items()}, "step": int(step)}
    if not info.in_ray:
        log.info("step %d: %s", step, metrics)
        return
    lc = loop_config or {}
    if tensors is None:
        ray.train.report(metrics)
        return
    name = checkpoint_dir_name(step)
    if info.rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    from ray.train import CheckpointUploadMode

    local = tempfile.mkdtemp(prefix=f"hd-{name}-")
    ckpt.save_checkpoint(local, tensors, {**(state or {}), "step": int(step)})
    mode = CheckpointUploadMode.ASYNC if lc.get("checkpoint_upload_mode") == "async" else CheckpointUploadMode.SYNC
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(local),
        checkpoint_dir_name=name,
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=True,
        checkpoint_upload_fn=_upload_fn(int(lc.get("upload_attempts", 5)), float(lc.get("upload_backoff_s", 1.0))),
    )
