"""Submit a stage, the pipeline or the sweep to a Ray cluster through Ray's job API.

The job's runtime_env ships this code: ``py_modules`` carries the ``histodiff`` package with
its presets (so the cluster runs exactly this code, over whatever version its image installed)
and ``working_dir`` carries the checkout's ``jobs/`` and ``tuning/`` (for an installed
histodiff, the current directory), where a config given as a YAML path must lie. The config
is validated here, before anything is sent. Secrets are not sent: the cluster's own
credentials (a Kubernetes secret, an instance role) are used on the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from histodiff.config import ConfigError, load_config, resolve_preset
from histodiff.redaction import strip_userinfo
from histodiff.runtime import SETTINGS_ENV, check_shared_storage
from histodiff.errors import UserError

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
# Settings (never secrets) that the job needs to find storage and tracking on the cluster: the
# same list Ray workers get (Ray logs runtime_env; credentials come from the cluster's nodes).
FORWARDED_ENV = SETTINGS_ENV
EXCLUDES = [".venv", ".git", "outputs", "mlflow.db", "mlruns", "mlartifacts", "bench/_work", "*.egg-info",
            "__pycache__", ".pytest_cache", "platform", ".whl", ".gpu", ".gl"]


def checkout_root() -> Path | None:
    """Return the repository this package runs from (``platform/histodiff``), or None for an installed package."""
    root = PACKAGE_DIR.parents[1]
    return root if PACKAGE_DIR.parent.name == "platform" and (root / "pyproject.toml").is_file() else None


def working_dir() -> Path:
    """Return the folder shipped as the job's working_dir: the checkout, else the current directory."""
    return checkout_root() or Path.cwd()


def _inside_working_dir(path: Path, what: str) -> str:
    root = working_dir()
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        raise ConfigError(f"{what} {str(path)!r} is outside {root}, the folder shipped to the cluster as the "
                          f"job's working_dir; move it inside {root} (a preset name such as 'tiny' needs no file)") \
            from None


def _config_arg(config: str) -> str:
    path = resolve_preset(config)  # raises ConfigError for an unknown preset or a missing file
    if Path(config).suffix in (".yaml", ".yml"):
        return _inside_working_dir(path, "config file")
    return config  # a preset name: the presets travel inside the package (py_modules)


def entrypoint(stage: str, config: str, overrides: list[str], space: str | None = None,
               stages: str | None = None) -> str:
    """Return the job's shell command: the same CLI, with a preset name or a YAML path inside working_dir.

    ``stages`` (the pipeline only) is checked here, before anything reaches the cluster.
    """
    cfg_path = _config_arg(config)
    # Inside a Ray job the driver must join the cluster, not start an embedded Ray.
    args = ["python", "-m", "histodiff.cli", "sweep" if stage == "sweep" else "run"]
    if stage != "sweep":
        args.append(stage)
    if stages:
        from histodiff.pipeline import resolve_stages

        if stage != "pipeline":
            raise UserError(f"--stages {stages} applies to the pipeline only, not to {stage!r}")
        args += ["--stages", ",".join(resolve_stages(stages.split(",")))]
    args += ["--config", cfg_path]
    if space:
        args += ["--space", _inside_working_dir(Path(space), "search space")]
    args += [*overrides, "ray.address=auto"]
    return " ".join(shlex.quote(a) for a in args)


def runtime_env(pip: bool = False) -> dict:
    """Return the runtime_env that ships this code (the package with its presets, the working_dir) to the cluster."""
    env_vars = {k: strip_userinfo(os.environ[k]) for k in FORWARDED_ENV if os.environ.get(k)}
    # The job's driver passes its own env_vars to ray.init (histodiff.runtime.init_ray); without
    # this, Ray refuses to merge two runtime_envs that name the same variable.
    env_vars["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    env = {"working_dir": str(working_dir()), "excludes": EXCLUDES, "py_modules": [str(PACKAGE_DIR)],
           "env_vars": env_vars}
    if pip:
        env["pip"] = dependencies()
    return env


def dependencies() -> list[str]:
    """Return histodiff's runtime requirements: the checkout's pyproject.toml, else the installed metadata."""
    root = checkout_root()
    if root is not None:  # the checkout's own list: it may be newer than what was installed from it
        import tomllib

        with open(root / "pyproject.toml", "rb") as f:
            return list(tomllib.load(f)["project"]["dependencies"])
    from importlib.metadata import requires

    return [r for r in requires("histodiff") or [] if "extra ==" not in r]


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


def _client(address: str, token: str | None) -> Any:
    """Return a job client connected to ``address``, or raise a UserError naming the address and the fix."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers(token))
    except Exception as exc:  # Ray raises ConnectionError, ValueError or its own AuthenticationError
        if "Authentication" in type(exc).__name__:
            raise UserError(f"the Ray cluster at --address {address!r} refused the auth token; pass --token or set "
                            "RAY_AUTH_TOKEN") from exc
        raise UserError(f"cannot reach the Ray cluster at --address {address!r} ({type(exc).__name__}); check the "
                        "address (or RAY_ADDRESS) and that the head's dashboard port (8265) answers") from exc


def alive_nodes(address: str) -> int | None:
    """Return how many nodes of the cluster at ``address`` are alive (None when its dashboard does not say)."""
    try:
        from ray.util.state import list_nodes

        return len(list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False))
    except Exception as exc:  # an older head, auth, a proxy: the job's driver checks again when it connects
        log.info("could not count the cluster's nodes (%s); the job checks its storage when it starts",
                 type(exc).__name__)
        return None


def submit(stage: str, address: str, config: str, overrides: list[str], token: str | None = None,
           pip: bool = False, follow: bool = True, space: str | None = None, stages: str | None = None) -> int:
    """Submit the job, print its id, follow its logs; return 0 when it succeeded (or was not followed)."""
    from ray.job_submission import JobStatus

    cfg = load_config(config, overrides)  # fail here, not on the cluster
    command = entrypoint(stage, config, overrides, space, stages)
    client = _client(address, token)
    if cfg.tracking.enabled and cfg.tracking.tracking_uri.startswith("sqlite") and \
            not os.environ.get("MLFLOW_TRACKING_URI"):
        log.warning("tracking.tracking_uri is %s: on a cluster that file lives in the job's temporary "
                    "directory; set tracking.tracking_uri=http://MLFLOW:5000", cfg.tracking.tracking_uri)
    if not cfg.paths.root.startswith("s3://") and not os.path.isabs(cfg.paths.root):
        log.warning("paths.root=%s is relative: the job writes under its temporary working directory on the "
                    "cluster; use paths.root=s3://BUCKET/PREFIX", cfg.paths.root)
    nodes = alive_nodes(address)
    if nodes is not None:
        check_shared_storage(cfg, nodes, address)  # a head-local paths.root is refused before the job starts
    job_id = None
    for attempt in range(30):  # a head that just started has no job agent yet: Ray says "try again later"
        try:
            job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env(pip),
                                       metadata={"histodiff.stage": stage, "histodiff.name": cfg.name})
            break
        except (RuntimeError, ConnectionError, OSError) as exc:
            if re.search(r"(?i)\b(401|403)\b|unauthori[sz]ed|forbidden|auth", str(exc)):
                raise UserError(f"the Ray cluster at --address {address!r} refused the auth token; pass --token or "
                                "set RAY_AUTH_TOKEN") from exc
            # requests' ConnectionError is an OSError: a head under load may drop the upload.
            transient = "No available agent" in str(exc) or isinstance(exc, OSError)
            if not transient or attempt == 29:
                if isinstance(exc, OSError):
                    raise UserError(f"the Ray cluster at --address {address!r} stopped answering while taking the "
                                    f"job ({type(exc).__name__}); check that its head is up, then submit again") \
                        from exc
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
