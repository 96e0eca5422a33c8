"""Submit a stage, the pipeline or the sweep to a Ray cluster through Ray's job API.

The job's runtime_env ships this checkout: ``py_modules`` carries ``platform/histodiff``
(so the cluster runs exactly this code, over whatever version its image installed) and
``working_dir`` carries ``jobs/``, ``jobs/configs/`` and ``tuning/``. The config is
validated here, before anything is sent. Secrets are not sent: the cluster's own
credentials (a Kubernetes secret, an instance role) are used on the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path

from histodiff.config import ConfigError, load_config, resolve_preset

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = Path(__file__).resolve().parent
# Settings (never secrets) that the job needs to find storage and tracking on the cluster.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "AWS_EC2_METADATA_DISABLED", "MLFLOW_S3_ENDPOINT_URL")
EXCLUDES = [".venv", ".git", "outputs", "mlflow.db", "mlruns", "mlartifacts", "bench/_work", "*.egg-info",
            "__pycache__", ".pytest_cache", "platform", ".whl", ".gpu", ".gl"]


def _relative_to_repo(path: Path, what: str) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        raise ConfigError(f"{what} {str(path)!r} is outside {REPO_ROOT}; only files inside the checkout are "
                          "shipped to the cluster: copy it under jobs/configs/ (or tuning/)") from None


def entrypoint(stage: str, config: str, overrides: list[str], space: str | None = None) -> str:
    """Return the job's shell command: the same CLI, with the config as a path inside working_dir."""
    cfg_path = _relative_to_repo(resolve_preset(config), "config file")
    # Inside a Ray job the driver must join the cluster, not start an embedded Ray.
    args = ["python", "-m", "histodiff.cli", "sweep" if stage == "sweep" else "run"]
    if stage != "sweep":
        args.append(stage)
    args += ["--config", cfg_path]
    if space:
        args += ["--space", _relative_to_repo(Path(space), "search space")]
    args += [*overrides, "ray.address=auto"]
    return " ".join(shlex.quote(a) for a in args)


def runtime_env(pip: bool = False) -> dict:
    """Return the runtime_env that ships this checkout (code, job files, presets) to the cluster."""
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    # The job's driver passes its own env_vars to ray.init (histodiff.runtime.init_ray); without
    # this, Ray refuses to merge two runtime_envs that name the same variable.
    env_vars["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    env = {"working_dir": str(REPO_ROOT), "excludes": EXCLUDES, "py_modules": [str(PACKAGE_DIR)],
           "env_vars": env_vars}
    if pip:
        import tomllib

        with open(REPO_ROOT / "pyproject.toml", "rb") as f:
            env["pip"] = list(tomllib.load(f)["project"]["dependencies"])
    return env


def auth_headers(token: str | None) -> dict[str, str]:
    """Return the Authorization header for Ray token auth (explicit, env, or token file), or {}."""
    token = token or os.environ.get("RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if not token and os.path.isfile(path):
        token = Path(path).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        sys.stdout.write(lines)
        sys.stdout.flush()


def submit(stage: str, address: str, config: str, overrides: list[str], token: str | None = None,
           pip: bool = False, follow: bool = True, space: str | None = None) -> int:
    """Submit the job, print its id, follow its logs; return 0 when it succeeded (or was not followed)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg = load_config(config, overrides)  # fail here, not on the cluster
    if cfg.tracking.enabled and cfg.tracking.tracking_uri.startswith("sqlite") and \
            not os.environ.get("MLFLOW_TRACKING_URI"):
        log.warning("tracking.tracking_uri is %s: on a cluster that file lives in the job's temporary "
                    "directory; set tracking.tracking_uri=http://MLFLOW:5000", cfg.tracking.tracking_uri)
    if not cfg.paths.root.startswith("s3://") and not os.path.isabs(cfg.paths.root):
        log.warning("paths.root=%s is relative: the job writes under its temporary working directory on the "
                    "cluster; use paths.root=s3://BUCKET/PREFIX", cfg.paths.root)
    command = entrypoint(stage, config, overrides, space)
    client = JobSubmissionClient(address, headers=auth_headers(token))
    job_id = None
    for attempt in range(30):  # a head that just started has no job agent yet: Ray says "try again later"
        try:
            job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env(pip),
                                       metadata={"histodiff.stage": stage, "histodiff.name": cfg.name})
            break
        except (RuntimeError, ConnectionError, OSError) as exc:
            # requests' ConnectionError is an OSError: a head under load may drop the upload.
            transient = "No available agent" in str(exc) or isinstance(exc, OSError)
            if not transient or attempt == 29:
                raise
            log.info("the cluster is not ready to take the job (%s); retrying (%d/30)", type(exc).__name__, attempt + 1)
            time.sleep(2)
    print(f"submitted job {job_id}: {command}")
    print(f"  logs:   ray job logs {job_id} --address {address} --follow")
    print(f"  status: ray job status {job_id} --address {address}")
    if not follow:
        return 0
    asyncio.run(_follow(client, job_id))
    status = client.get_job_status(job_id)
    print(f"job {job_id} {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1
