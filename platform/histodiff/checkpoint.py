"""Training checkpoints and exported models: safetensors, a small JSON state, a marker last.

A checkpoint directory holds ``<name>.safetensors`` for each group of tensors (model,
ema, optimizer tensors ...), ``state.json`` (step, RNG, optimizer layout ...), and
``COMPLETE`` written last. A directory without ``COMPLETE`` is a partial write (a worker
died mid-upload) and is never loaded. Weights load with safetensors only.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from histodiff.storage import Store, is_s3, join, sha256_bytes

COMPLETE = "COMPLETE"
STATE = "state.json"


def save_checkpoint(directory: str, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
    """Write tensor groups and a JSON state into a local directory, marker last."""
    os.makedirs(directory, exist_ok=True)
    for group, tdict in tensors.items():
        flat = {k: v.detach().contiguous().cpu() for k, v in tdict.items()}
        save_file(flat, os.path.join(directory, f"{group}.safetensors"))
    with open(os.path.join(directory, STATE), "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    with open(os.path.join(directory, COMPLETE), "w") as f:
        f.write("ok\n")


def is_complete(directory: str) -> bool:
    """Return True when a local checkpoint directory carries its completion marker."""
    return os.path.isfile(os.path.join(directory, COMPLETE))


def load_checkpoint(directory: str, device: str | torch.device = "cpu") -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Return (tensor groups, state) from a complete local checkpoint directory."""
    if not is_complete(directory):
        raise ValueError(f"checkpoint {directory!r} is incomplete (no {COMPLETE} marker); refusing to load it")
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors[name[: -len(".safetensors")]] = load_file(os.path.join(directory, name), device=str(device))
    with open(os.path.join(directory, STATE)) as f:
        state = json.load(f)
    return tensors, state


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return an optimizer's state as flat tensors plus a JSON-able layout."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], layout: dict) -> None:
    """Load an optimizer's state written by :func:`optimizer_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in layout.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": layout["param_groups"]})


def rng_state() -> dict[str, Any]:
    """Return the torch CPU RNG state as JSON-able data."""
    return {"torch_cpu": torch.get_rng_state().tolist()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the torch CPU RNG state saved by :func:`rng_state`."""
    if "torch_cpu" in state:
        torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))


MODEL_META = "histodiff.json"


def export_model(model: Any, uri: str, meta: dict[str, Any], store: Store) -> str:
    """Save a diffusers-style model (save_pretrained, safetensors) to a URI; return its sha256.

    ``meta`` (kind, config hashes ...) is written beside it with the weights' hash, last,
    so an export without ``histodiff.json`` is incomplete.
    """
    import tempfile

    # An older export here must stop looking complete before its weights are overwritten.
    store.delete(join(uri, MODEL_META))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        weights = sorted(n for n in os.listdir(tmp) if n.endswith(".safetensors"))
        digest = sha256_bytes(b"".join(open(os.path.join(tmp, n), "rb").read() for n in weights))
        store.upload_dir(tmp, uri)
    store.write_json(join(uri, MODEL_META), {**meta, "sha256": digest})
    return digest


def model_meta(uri: str, store: Store, stage: str = "the stage that makes it") -> dict[str, Any]:
    """Return the metadata of an exported model, or raise naming the stage to run if the export is incomplete."""
    meta_uri = join(uri, MODEL_META)
    if not store.exists(meta_uri):
        raise FileNotFoundError(f"no complete model at {uri!r} (missing {MODEL_META}); run {stage} first")
    return store.read_json(meta_uri)


def load_exported(model_cls: Any, uri: str, store: Store) -> tuple[Any, dict[str, Any]]:
    """Return (model, meta) for a model written by :func:`export_model` (safetensors only)."""
    import tempfile

    meta = model_meta(uri, store)
    local = store.download_dir(uri, tempfile.mkdtemp(prefix="histodiff-model-")) if is_s3(uri) else \
        store.resolve(uri).path
    model = model_cls.from_pretrained(local, use_safetensors=True)
    model.eval()
    return model, meta
