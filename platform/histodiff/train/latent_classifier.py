"""Latent classifier stage: train p(y | z_t, t) on the labeled TRAIN split's latents with Ray Train.

Mode ``noisy`` (default) noises the scaled latents with the DDPM schedule at t ~ U[0, T) (or up
to ``max_timestep``), as guided-diffusion does; mode ``clean`` trains at t=0 only, the reference
code's flaw, kept so the two can be compared. Held-out (validation split) accuracy is measured
at ``classifier.eval_timesteps`` noise levels, logged per t and as a plot, and the model is
exported to ``cfg.paths.classifier`` with meta {kind, autoencoder_sha256, classes, mode}.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from histodiff import storage
from histodiff.config import HistodiffConfig, LatentClassifierConfig
from histodiff.models.latent_classifier import LatentClassifier

log = logging.getLogger(__name__)

KIND = "latent_classifier"


@dataclass
class ClassifierResult:
    """Where the classifier went, its hash, and its held-out accuracy per timestep."""

    classifier_uri: str
    sha256: str
    classes: list[str]
    mode: str
    val_accuracy: dict[int, float] = field(default_factory=dict)
    skipped: bool = False


def build_classifier(ccfg: LatentClassifierConfig, in_channels: int, num_classes: int) -> LatentClassifier:
    """Return an untrained latent classifier shaped by the config."""
    return LatentClassifier(in_channels=in_channels, num_classes=num_classes,
                            block_out_channels=tuple(ccfg.block_out_channels), layers_per_block=ccfg.layers_per_block,
                            norm_num_groups=ccfg.norm_num_groups, pool=ccfg.pool, attention_heads=ccfg.attention_heads)


def sample_timesteps(n: int, mode: str, num_train_timesteps: int, max_timestep: int | None,
                     generator: torch.Generator) -> torch.Tensor:
    """Return (n,) training timesteps: zeros for ``clean``, U[0, min(T, max_timestep + 1)) for ``noisy``."""
    if mode == "clean":
        return torch.zeros(n, dtype=torch.long)
    if mode != "noisy":
        raise ValueError(f"classifier mode must be 'noisy' or 'clean', got {mode!r}")
    high = num_train_timesteps if max_timestep is None else min(num_train_timesteps, max_timestep + 1)
    return torch.randint(0, high, (n,), generator=generator)


def classifier_step(model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, z0: torch.Tensor, y: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor, autocast: Any = None) -> float:
    """Run one optimisation step on latents noised to z_t = sqrt(ab) z0 + sqrt(1 - ab) eps; return the loss."""
    z_t = scheduler.add_noise(z0, noise, t) if bool((t > 0).any()) else z0
    if autocast is not None:
        with autocast:
            logits = model(z_t, t)
    else:
        logits = model(z_t, t)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def fit_latent_classifier(model: Any, latents: torch.Tensor, labels: torch.Tensor, scheduler: Any, *, mode: str,
                          max_timestep: int | None, steps: int, batch_size: int, lr: float, weight_decay: float,
                          seed: int, device: torch.device | str = "cpu", start_step: int = 0,
                          optimizer: torch.optim.Optimizer | None = None, on_step: Any = None) -> Any:
    """Return ``model`` trained for ``steps`` on scaled latents (plain PyTorch; a Ray worker calls it)."""
    device = torch.device(device)
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    T = scheduler.config.num_train_timesteps
    model.train()
    for step in range(start_step, steps):
        # One generator per step: a resumed run draws exactly the batches it would have drawn.
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        t = sample_timesteps(batch_size, mode, T, max_timestep, gen)
        noise = torch.randn((batch_size, *latents.shape[1:]), generator=gen)
        loss = classifier_step(model, optimizer, scheduler, latents[idx].to(device), labels[idx].to(device),
                               t.to(device), noise.to(device))
        if on_step is not None:
            on_step(step, loss, model, optimizer)
    return model.eval()


@torch.no_grad()
def accuracy_at_timesteps(model: Any, latents: torch.Tensor, labels: torch.Tensor, scheduler: Any,
                          timesteps: list[int], seed: int, batch_size: int = 256,
                          device: torch.device | str = "cpu") -> dict[int, float]:
    """Return {t: accuracy} of the classifier on latents noised at each t (fixed noise per seed)."""
    model.eval()
    out = {}
    for t_val in timesteps:
        gen = torch.Generator().manual_seed(seed + int(t_val))
        correct = 0
        for i in range(0, len(latents), batch_size):
            z0 = latents[i : i + batch_size]
            t = torch.full((len(z0),), int(t_val), dtype=torch.long)
            noise = torch.randn(z0.shape, generator=gen)
            z_t = scheduler.add_noise(z0, noise, t) if t_val > 0 else z0
            pred = model(z_t.to(device), t.to(device)).argmax(-1).cpu()
            correct += int((pred == labels[i : i + batch_size]).sum())
        out[int(t_val)] = correct / max(1, len(latents))
    return out


# ----------------------------------------------------------------------------- Ray Train worker

STAGE = "classifier"


def train_loop(config: dict) -> None:
    """Ray Train worker: load the train-split latents, train (DDP), report and checkpoint, resume."""
    import ray.train.torch

    from histodiff.config import config_from_dict
    from histodiff.diffusion.schedule import ddpm_scheduler
    from histodiff.runtime import device_for, set_worker_threads
    from histodiff.train import common

    cfg = config_from_dict(config["cfg"])
    set_worker_threads(cfg)
    ccfg = cfg.classifier
    info = common.worker_info()
    device = device_for(cfg.ray.use_gpu)
    latents, labels = select_latents(cfg, config["train_sha1"], config["classes"])
    model = build_classifier(ccfg, latents.shape[1], len(config["classes"])).to(device)
    model = ray.train.torch.prepare_model(model) if info.in_ray else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=ccfg.lr, weight_decay=ccfg.weight_decay)
    start = 0
    restored = common.restore(common.latest_complete_checkpoint(), device)
    if restored is not None:
        tensors, st = restored
        _unwrap(model).load_state_dict(tensors["model"])
        from histodiff.checkpoint import optimizer_from_tensors

        optimizer_from_tensors(optimizer, tensors["optimizer"], st["optimizer"])
        start = int(st["step"])
        log.info("classifier resumed at step %d", start)
    tracker = common.worker_tracker(config)
    window: list[float] = []

    def on_step(step: int, loss: float, m: Any, opt: torch.optim.Optimizer) -> None:
        window.append(loss)
        done = step + 1
        if done % ccfg.report_every and done % ccfg.checkpoint_every and done != ccfg.steps:
            return
        metrics = {"train_loss": sum(window) / len(window)}
        window.clear()
        tracker.log_metrics(metrics, step=done)
        if done % ccfg.checkpoint_every == 0 or done == ccfg.steps:
            from histodiff.checkpoint import optimizer_to_tensors

            opt_t, layout = optimizer_to_tensors(opt)
            common.report(metrics, done, {"model": _unwrap(m).state_dict(), "optimizer": opt_t},
                          {"optimizer": layout, "fingerprint": config["fingerprint"]}, config)
        else:
            common.report(metrics, done, loop_config=config)

    # Each rank draws its own batches (seed + rank); DDP averages their gradients.
    fit_latent_classifier(model, latents * config["scale_factor"], labels, ddpm_scheduler(cfg.denoiser.schedule),
                          mode=ccfg.mode, max_timestep=ccfg.max_timestep, steps=ccfg.steps,
                          batch_size=ccfg.batch_size, lr=ccfg.lr, weight_decay=ccfg.weight_decay,
                          seed=cfg.seed * 1000 + info.rank, device=device, start_step=start, optimizer=optimizer,
                          on_step=on_step)


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


def select_latents(cfg: HistodiffConfig, sha1s: list[str], classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (unscaled latents, label ids) of the labeled latents whose tile sha1 is in ``sha1s`` (in that order)."""
    from histodiff.data.encode import load_latents

    uri = storage.join(cfg.paths.labeled_latents, "train")
    z, labels, latent_sha1, _ = load_latents(uri, cfg.storage)
    row = {s: i for i, s in enumerate(latent_sha1)}
    missing = [s for s in sha1s if s not in row]
    if missing:
        raise ValueError(f"{len(missing)} labeled tiles have no latent in {uri!r} (e.g. sha1 {missing[0][:12]}); "
                         "rerun `histodiff run encode` with the current autoencoder")
    idx = torch.tensor([row[s] for s in sha1s], dtype=torch.long)
    index = {c: i for i, c in enumerate(classes)}
    return z[idx], torch.tensor([index[labels[i]] for i in idx.tolist()], dtype=torch.long)


# ----------------------------------------------------------------------------- driver


def _split_sha1s(cfg: HistodiffConfig) -> tuple[list[str], list[str], list[str]]:
    """Return (train tile sha1s, val tile sha1s, class names) from the shared labeled splits."""
    from histodiff.data.shards import pixel_sha1
    from histodiff.data.splits import labeled_splits

    splits = labeled_splits(cfg)
    train, val = splits["train"], splits["val"]
    if len(val[1]) == 0:
        raise ValueError("the labeled validation split is empty: held-out accuracy needs data.val_fraction > 0")
    return [pixel_sha1(t) for t in train[0]], [pixel_sha1(t) for t in val[0]], list(train[2])


def _fingerprint(cfg: HistodiffConfig, latents_meta: dict, train_sha1: list[str]) -> str:
    data = {"classifier": cfg.public_dict()["classifier"], "seed": cfg.seed, "workers": cfg.ray.num_workers,
            "schedule": cfg.public_dict()["denoiser"]["schedule"], "train": sorted(train_sha1),
            "latents": {k: latents_meta.get(k) for k in ("shape", "scale_factor", "autoencoder_sha256")}}
    return storage.sha256_bytes(repr(sorted(data.items())).encode())[:16]


def _accuracy_plot(acc: dict[int, float], mode: str, num_classes: int) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.plot(list(acc), list(acc.values()), marker="o", label=f"mode={mode}")
    ax.axhline(1.0 / num_classes, color="grey", ls="--", label="chance")
    ax.set(xlabel="timestep t", ylabel="val accuracy", ylim=(0, 1.02), title="latent classifier vs noise")
    ax.legend()
    return fig


def run(cfg: HistodiffConfig) -> ClassifierResult:
    """Train the latent classifier with Ray Train, measure val accuracy per t, export; skip if done."""
    import contextlib

    import pyarrow.fs as pafs
    import ray.train

    from histodiff import checkpoint as ckpt
    from histodiff import tracking
    from histodiff.data.encode import read_latents_meta
    from histodiff.diffusion.schedule import ddpm_scheduler
    from histodiff.runtime import init_ray
    from histodiff.train import common

    latents_meta = read_latents_meta(storage.join(cfg.paths.labeled_latents, "train"), cfg.storage)
    train_sha1, val_sha1, classes = _split_sha1s(cfg)
    fingerprint = _fingerprint(cfg, latents_meta, train_sha1)
    with contextlib.suppress(FileNotFoundError, storage.StorageError):
        done = ckpt.model_meta(cfg.paths.classifier, cfg.storage)
        if done.get("fingerprint") == fingerprint:
            log.info("latent classifier at %s is up to date; skipping", cfg.paths.classifier)
            acc = {int(k): v for k, v in done.get("val_accuracy", {}).items()}
            return ClassifierResult(cfg.paths.classifier, done["sha256"], done["classes"], done["mode"], acc, True)
    init_ray(cfg)
    with tracking.stage_run(cfg, STAGE, params={"classes": ",".join(classes), "train_latents": len(train_sha1)}) as tracker:
        loop_config = {"cfg": cfg.public_dict(), "train_sha1": train_sha1, "classes": classes,
                       "scale_factor": float(latents_meta["scale_factor"]), "fingerprint": fingerprint,
                       **common.tracking_loop_config(tracker)}
        common.build_trainer(cfg, train_loop, loop_config, STAGE).fit()
        path, fs, _ = common.storage_path_and_fs(cfg)
        found = common.list_complete_checkpoints(fs or pafs.LocalFileSystem(), f"{path}/{common.run_name(cfg, STAGE)}")
        if not found or found[-1][0] < cfg.classifier.steps:
            raise RuntimeError(f"classifier training left no final checkpoint in {common.run_uri(cfg, STAGE)!r}; "
                               "rerun with the same config to resume")
        tensors, _ = common.restore(ray.train.Checkpoint(path=found[-1][1], filesystem=fs) if fs else found[-1][1])
        model = build_classifier(cfg.classifier, latents_meta["shape"][0], len(classes))
        model.load_state_dict(tensors["model"])
        val_z, val_y = select_latents(cfg, val_sha1, classes)
        acc = accuracy_at_timesteps(model, val_z * float(latents_meta["scale_factor"]), val_y,
                                    ddpm_scheduler(cfg.denoiser.schedule), cfg.classifier.eval_timesteps, cfg.seed)
        for t, a in acc.items():
            tracker.log_metrics({"val_accuracy": a, f"val_accuracy_t{t}": a}, step=t)
        tracker.log_figure(_accuracy_plot(acc, cfg.classifier.mode, len(classes)), "val_accuracy_vs_t.png")
        sha = ckpt.export_model(model, cfg.paths.classifier, {
            "kind": KIND, "autoencoder_sha256": latents_meta.get("autoencoder_sha256"), "classes": classes,
            "mode": cfg.classifier.mode, "scale_factor": latents_meta["scale_factor"], "fingerprint": fingerprint,
            "val_accuracy": {str(k): v for k, v in acc.items()}}, cfg.storage)
        tracker.set_tags({"classifier.sha256": sha, "classifier.uri": cfg.paths.classifier})
    log.info("latent classifier (%s): val accuracy by t %s", cfg.classifier.mode, acc)
    return ClassifierResult(cfg.paths.classifier, sha, classes, cfg.classifier.mode, acc)
