"""Ray start-up, worker environment, logging and devices: the process-level plumbing.

Stages call :func:`init_ray` once; it connects to ``cfg.ray.address`` when set (a cluster,
or ``auto`` inside ``ray job submit``) and otherwise starts an embedded local Ray.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from histodiff.config import HistodiffConfig, StorageConfig
from histodiff.redaction import configured_keys, strip_userinfo

log = logging.getLogger(__name__)

# Settings (never secrets) that Ray workers need for storage and tracking. Credentials are not
# passed this way: Ray writes runtime_env into its logs. Workers take them from their node's own
# environment (an embedded local Ray inherits the driver's; a cluster's nodes carry a secret or
# an instance role) or from storage.* settings the user put in the config.
SETTINGS_ENV = (
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_EC2_METADATA_DISABLED",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
)
# Ray Train's placement-group cleaner asks the state API (the dashboard) every second whether the
# controller lives; without a dashboard each ask fails with this warning, ~200 lines a run.
_RAY_TRAIN_NOISE = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                    "Failed to query Ray Train Controller actor state")


class _DropMessage(logging.Filter):
    """Drop log records whose message starts with one text; keep every other record of the logger."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        """Return False for the one noisy message."""
        return not str(record.msg).startswith(self.prefix)


def quiet_ray_train() -> None:
    """Silence Ray Train's repeated controller-state warning in this process (once; real warnings stay)."""
    name, prefix = _RAY_TRAIN_NOISE
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_DropMessage(prefix))


def worker_setup() -> None:
    """Ray's ``worker_process_setup_hook``: runs in every worker process of a Ray that histodiff started."""
    import ray

    quiet_ray_train()
    # Ray's state API (which that cleaner polls) looks for "the" local Ray by scanning processes and
    # dies with a traceback when a machine runs several; name the one this worker belongs to.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def setup_logging(verbose: bool = False) -> None:
    """Configure the console once: histodiff's lines, libraries quiet unless ``verbose``."""
    from histodiff import console

    console.setup(verbose)


def worker_env(storage_cfg: StorageConfig | None = None, tracking_uri: str | None = None) -> dict[str, str]:
    """Return the environment settings (no secrets) that Ray workers need for storage and tracking."""
    env = {k: os.environ[k] for k in SETTINGS_ENV if os.environ.get(k)}
    if tracking_uri:
        env.setdefault("MLFLOW_TRACKING_URI", absolute_tracking_uri(tracking_uri))
    if storage_cfg is not None and storage_cfg.endpoint_url:
        env.setdefault("AWS_ENDPOINT_URL_S3", storage_cfg.endpoint_url)
    # Ray writes runtime_env into its logs: no URL carries its user:password@ there.
    env = {k: strip_userinfo(v) for k, v in env.items()}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    from histodiff import console

    # Workers print their own warnings and progress bars: the same quiet (or verbose) settings reach them.
    for key, value in console.quiet_env().items():
        env.setdefault(key, os.environ.get(key, value))
    if console.verbose():
        env[console.VERBOSE_ENV] = "1"
    return env


def absolute_tracking_uri(uri: str) -> str:
    """Return a tracking URI that means the same thing from any working directory."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def init_ray(cfg: HistodiffConfig, **extra: Any) -> None:
    """Connect to (or start) Ray with the worker environment; a no-op if already connected."""
    from histodiff import console

    console.quiet_libraries()  # sets Ray's variables before Ray reads them
    import ray

    if ray.is_initialized():
        return
    quiet_ray_train()
    # Keys set in the config serve this process through the environment (never a log): nothing
    # that travels to Ray carries keys, and an embedded Ray's processes inherit this environment.
    keys = configured_keys(cfg.storage)
    if keys is not None:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", keys[0])
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", keys[1])
    runtime_env = {"env_vars": worker_env(cfg.storage, cfg.tracking.tracking_uri if cfg.tracking.enabled else None),
                   "worker_process_setup_hook": f"{__name__}.worker_setup"}
    extra.setdefault("logging_level", logging.INFO if console.verbose() else logging.ERROR)
    if cfg.ray.address:
        log.info("connecting to Ray at %s", cfg.ray.address)
        ray.init(address=cfg.ray.address, runtime_env=runtime_env, log_to_driver=True, **extra)
    else:
        log.info("starting an embedded local Ray (num_cpus=%s)", cfg.ray.num_cpus or "all")
        ray.init(
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
            **extra,
        )
    console.quiet_libraries()  # again: importing Ray (Data) set its own logger levels
    console.filter_worker_output()
    if cfg.ray.address:
        check_shared_storage(cfg, sum(1 for node in ray.nodes() if node.get("Alive")))


def local_outputs(cfg: HistodiffConfig) -> list[str]:
    """Return the ``paths.*`` outputs of ``cfg`` that are local paths (not s3:// URIs)."""
    from histodiff.storage import is_s3

    skip = {"unlabeled_sources", "labeled_source", "labeled_test_source"}  # inputs: read once, by ingest
    return [f"paths.{key}={value}" for key, value in cfg.paths.model_dump().items()
            if key not in skip and isinstance(value, str) and not is_s3(value)]


def check_shared_storage(cfg: HistodiffConfig, nodes: int, address: str | None = None) -> None:
    """Raise ConfigError when a cluster of several nodes would write stage outputs to a local path.

    A local path names a different folder on every node: checkpoints, shards and trial results
    written there are lost with their node and unreadable from the others (the classic head-local
    ``storage_path`` trap). Checked right after connecting, before any stage takes resources.
    """
    from histodiff.config import ConfigError

    local = local_outputs(cfg)
    if nodes > 1 and local:
        more = f" (and {len(local) - 1} more outputs)" if len(local) > 1 else ""
        raise ConfigError(f"the Ray cluster at {address or cfg.ray.address} has {nodes} nodes, but {local[0]}{more} "
                          "is a local path: each node would write its own copy and lose it with the node; set "
                          "paths.root=s3://BUCKET/PREFIX (any S3 endpoint)")


def set_worker_threads(threads: int | None) -> None:
    """Give a CPU training worker ``threads`` torch threads (None: Ray's default, its CPUs)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def prefetch_batches(device: Any) -> int:
    """Return how many batches Ray Data should prefetch for a training worker on ``device``.

    On a GPU, prefetching overlaps input with compute. On a CPU the prefetch thread competes
    with torch's compute threads for the same cores: measured on 2 cores with 2 threads, one
    Ray Train worker reached 0.71 of a plain loop's samples/s with prefetch and 0.90 without.
    """
    return 2 if getattr(device, "type", "cpu") == "cuda" else 0


def device_for(use_gpu: bool) -> "Any":
    """Return the torch device a worker should use."""
    import torch

    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast(device: Any) -> Any:
    """Return a bf16 autocast context on CUDA and a null context on the CPU."""
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
