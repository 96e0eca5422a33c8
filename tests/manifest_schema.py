"""Schema checks of the deployment manifests: every field must exist where it is written.

- KubeRay's RayCluster and RayJob: the field tables of ``tests/data/kuberay_v1.yaml`` (KubeRay v1.6.2's
  API reference), and below them the Kubernetes types (pod templates, env, resources) against the
  OpenAPI models of the ``kubernetes`` Python client;
- the cluster launcher YAML: Ray's own ``ray/autoscaler/ray-schema.json`` (the schema ``ray up`` checks).

A problem is reported as ``path: message`` (``spec.headGroupSpec.template.spec.containers[0].imagePullPolicyy:
unknown field``), every one of them, not only the first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

KUBERAY = yaml.safe_load((Path(__file__).parent / "data" / "kuberay_v1.yaml").read_text())
_PLAIN = {"string": str, "integer": int, "boolean": bool, "number": (int, float), "object": (dict, list)}


def _k8s_model(name: str) -> Any:
    import kubernetes.client as k8s

    return getattr(k8s, name)


def _check_k8s(value: Any, type_name: str, path: str, errors: list[str]) -> None:
    """Check ``value`` against a Kubernetes OpenAPI type name as the client writes it (``V1PodSpec``,
    ``List[V1Container]``, ``Dict[str, str]``, ``str``, ``object``...)."""
    inner = re.fullmatch(r"List\[(.+)\]", type_name)
    if inner:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list")
            return
        for i, item in enumerate(value):
            _check_k8s(item, inner.group(1), f"{path}[{i}]", errors)
        return
    inner = re.fullmatch(r"Dict\[str, (.+)\]", type_name)
    if inner:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a mapping")
            return
        for key, item in value.items():
            _check_k8s(item, inner.group(1), f"{path}.{key}", errors)
        return
    plain = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str}
    if type_name in plain:
        if not isinstance(value, plain[type_name]) or (type_name == "int" and isinstance(value, bool)):
            errors.append(f"{path}: expected {type_name}, got {type(value).__name__}")
        return
    model = _k8s_model(type_name)
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a {type_name} mapping")
        return
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json:
            errors.append(f"{path}.{key}: unknown field (not in Kubernetes {type_name})")
        else:
            _check_k8s(item, model.openapi_types[by_json[key]], f"{path}.{key}", errors)


def _check_kuberay(value: Any, type_name: str, path: str, errors: list[str]) -> None:
    if type_name.startswith("k8s:"):
        _check_k8s(value, type_name[4:], path, errors)
        return
    for prefix, container in (("list[", list), ("map[", dict)):
        if type_name.startswith(prefix):
            item_type = type_name[len(prefix) : -1]
            if not isinstance(value, container):
                errors.append(f"{path}: expected a {container.__name__}")
                return
            items = enumerate(value) if container is list else value.items()
            for key, item in items:
                _check_kuberay(item, item_type, f"{path}[{key}]" if container is list else f"{path}.{key}", errors)
            return
    if type_name in _PLAIN:
        ok = isinstance(value, _PLAIN[type_name]) and not (type_name == "integer" and isinstance(value, bool))
        if not ok:
            errors.append(f"{path}: expected {type_name}, got {type(value).__name__}")
        return
    fields = KUBERAY["types"][type_name]
    if not isinstance(value, dict):
        errors.append(f"{path}: expected a {type_name} mapping")
        return
    for key, item in value.items():
        if key not in fields:
            errors.append(f"{path}.{key}: unknown field (not in KubeRay {KUBERAY['version']} {type_name})")
        else:
            _check_kuberay(item, fields[key], f"{path}.{key}", errors)


def kuberay_errors(manifest: dict) -> list[str]:
    """Return every schema problem of a KubeRay RayCluster or RayJob manifest (empty: valid)."""
    kind = manifest.get("kind")
    if kind not in ("RayCluster", "RayJob") or manifest.get("apiVersion") != "ray.io/v1":
        return [f"kind/apiVersion: expected ray.io/v1 RayCluster or RayJob, got {manifest.get('apiVersion')} {kind}"]
    errors: list[str] = []
    _check_kuberay(manifest, kind, kind, errors)
    return errors


def launcher_errors(config: dict) -> list[str]:
    """Return every problem of a Ray cluster launcher YAML under Ray's own schema (empty: valid)."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in validator.iter_errors(config)]
