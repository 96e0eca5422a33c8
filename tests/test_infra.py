"""The manifests in infra/ parse, name jobs that exist, and run images that install this package."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from histodiff.config import load_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _load(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def _check_entrypoint(command: str) -> None:
    """A `python jobs/x.py --config P k=v` command names an existing job and a valid config."""
    args = shlex.split(command)
    assert args[0] == "python" and (ROOT / args[1]).is_file(), f"{args[1]} is not a job in this repo"
    config = args[args.index("--config") + 1]
    overrides = [a for a in args[2:] if "=" in a and not a.startswith("--")]
    load_config(config, overrides)  # raises ConfigError on any bad key


def _images(tree: object) -> list[str]:
    found = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            found += [v] if k == "image" and isinstance(v, str) else _images(v)
    elif isinstance(tree, list):
        for v in tree:
            found += _images(v)
    return found


def test_dockerfile_builds_on_ray_gpu_and_installs_this_package():
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base.startswith("rayproject/ray:") and base.endswith("-gpu")
    ray_version = re.search(r"ray==([\d.]+)", (ROOT / "constraints.txt").read_text()).group(1)
    assert f":{ray_version}-" in base, "the base image's Ray must match constraints.txt"
    assert re.search(r"pip install .*-c constraints\.txt -e \.", text)
    for copied in re.findall(r"^COPY \S* ?(.+) \./?\S*$", text, re.M):
        for name in copied.split():
            if not name.startswith("--"):
                assert (ROOT / name).exists(), f"Dockerfile copies missing {name}"


def test_kuberay_cluster_has_autoscaling_gpu_workers_and_token_auth():
    cluster = _load("kuberay/raycluster.yaml")
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["enableInTreeAutoscaling"] is True
    (gpu,) = cluster["spec"]["workerGroupSpecs"]
    assert gpu["minReplicas"] < gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and gpu["rayStartParams"]["num-gpus"] == "1"
    head_env = {e["name"]: e for e in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["RAY_AUTH_MODE"]["value"] == "token"
    assert "secretKeyRef" in head_env["RAY_AUTH_TOKEN"]["valueFrom"]  # the token is a secret, not inline
    assert set(_images(cluster)) == {"histodiff:latest"}


def test_rayjob_runs_the_pipeline_job_with_a_valid_config():
    job = _load("kuberay/rayjob.yaml")
    assert job["kind"] == "RayJob"
    _check_entrypoint(job["spec"]["entrypoint"])
    assert "jobs/pipeline.py" in job["spec"]["entrypoint"]
    assert set(_images(job)) == {"histodiff:latest"}
    gpu = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_cluster_launcher_uses_gpu_nodes_and_the_image():
    launcher = _load("cluster-gpu.yaml")
    assert launcher["docker"]["image"] == "histodiff:latest"
    worker = launcher["available_node_types"]["gpu_worker"]
    assert worker["max_workers"] >= 1 and worker["node_config"]["InstanceType"].startswith(("g", "p"))
    submit = re.search(r"-- (python jobs/\S+ .*)$", (INFRA / "cluster-gpu.yaml").read_text(), re.M).group(1)
    _check_entrypoint(submit)


def test_compose_has_minio_mlflow_on_postgres_and_a_ray_head():
    compose = _load("docker-compose.yml")
    services = compose["services"]
    assert {"minio", "postgres", "mlflow", "ray-head"} <= set(services)
    assert "postgresql://" in services["mlflow"]["command"] and "s3://" in services["mlflow"]["command"]
    assert services["mlflow"]["build"]["dockerfile"] == "infra/Dockerfile"
    assert (INFRA / services["mlflow"]["build"]["context"]).resolve() == ROOT  # relative to the compose file
    assert services["ray-head"]["image"] == services["mlflow"]["image"] == "histodiff:latest"
    assert "ray start --head" in services["ray-head"]["command"]


def test_readme_submission_commands_name_existing_jobs():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"-- (python (?:jobs|tuning)/\S+\.py [^\n`]*)", readme)
    assert commands, "the README documents the raw `ray job submit` form"
    for command in commands:
        _check_entrypoint(command.replace("\\", "").strip())


# ---------------------------------------------------------------- schema checks (tests/manifest_schema.py)

@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_manifests_match_the_kuberay_and_kubernetes_schemas(name):
    from manifest_schema import kuberay_errors

    assert kuberay_errors(_load(name)) == []


def test_the_launcher_yaml_matches_rays_cluster_schema():
    from manifest_schema import launcher_errors

    assert launcher_errors(_load("cluster-gpu.yaml")) == []


def _plant(text: str, old: str, new: str) -> dict:
    assert old in text, old
    return yaml.safe_load(text.replace(old, new, 1))


def test_a_misspelled_field_fails_the_schema_checks_at_every_level():
    from manifest_schema import kuberay_errors, launcher_errors

    cluster = (INFRA / "kuberay/raycluster.yaml").read_text()
    job = (INFRA / "kuberay/rayjob.yaml").read_text()
    cases = [
        (cluster, "enableInTreeAutoscaling:", "enableInTreeAutoscalling:",
         "RayCluster.spec.enableInTreeAutoscalling: unknown field"),  # KubeRay's own spec
        (cluster, "maxReplicas:", "maxReplica:", "RayCluster.spec.workerGroupSpecs[0].maxReplica: unknown field"),
        (cluster, "tolerations:", "toleration:",  # the Kubernetes pod spec under a worker group
         "RayCluster.spec.workerGroupSpecs[0].template.spec.toleration: unknown field"),
        (cluster, "containerPort: 8265", "containerport: 8265",  # deep inside a container
         "RayCluster.spec.headGroupSpec.template.spec.containers[0].ports[1].containerport: unknown field"),
        (job, "shutdownAfterJobFinishes:", "shutdownAfterJobFinished:",
         "RayJob.spec.shutdownAfterJobFinished: unknown field"),
        (job, "restartPolicy:", "restartPolicyy:", "RayJob.spec.submitterPodTemplate.spec.restartPolicyy: unknown field"),
    ]
    for text, old, new, expected in cases:
        errors = kuberay_errors(_plant(text, old, new))
        assert any(e.startswith(expected) for e in errors), (expected, errors)
    launcher = (INFRA / "cluster-gpu.yaml").read_text()
    errors = launcher_errors(_plant(launcher, "idle_timeout_minutes:", "idle_timeout_minute:"))
    assert any("idle_timeout_minute" in e for e in errors), errors
    errors = launcher_errors(_plant(launcher, "pull_before_run:", "pull_befor_run:"))
    assert any("pull_befor_run" in e for e in errors), errors
