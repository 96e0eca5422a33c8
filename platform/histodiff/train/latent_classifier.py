"""The noisy-latent classifier p(y | z_t, t): its step, its plain-PyTorch fit and its Ray Train worker.

Mode ``noisy`` (default) noises the scaled latents with the DDPM schedule at t ~ U[0, T) (or up
to ``max_timestep``), as guided-diffusion does; mode ``clean`` trains at t=0 only, the reference
code's flaw, kept so the two can be compared. The driver is the ``classifier`` stage
(:mod:`histodiff.stages.classifier`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from histodiff.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from histodiff.config import LatentClassifierConfig
from histodiff.models.latent_classifier import LatentClassifier
from histodiff.storage import Store
from histodiff.train import common, loop

log = logging.getLogger(__name__)


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
                    t: torch.Tensor, noise: torch.Tensor, autocast: Any = None,
                    weights: torch.Tensor | None = None) -> float:
    """Run one optimisation step on latents noised to z_t = sqrt(ab) z0 + sqrt(1 - ab) eps; return the loss.

    ``weights`` (per row) weight the cross-entropy, e.g. a pseudo-label's confidence.
    """
    z_t = scheduler.add_noise(z0, noise, t) if bool((t > 0).any()) else z0
    if autocast is not None:
        with autocast:
            logits = model(z_t, t)
    else:
        logits = model(z_t, t)
    per_row = F.cross_entropy(logits.float(), y, reduction="none")
    loss = per_row.mean() if weights is None else (per_row * weights).sum() / weights.sum().clamp_min(1e-8)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


class ClassifierTrainee:
    """The latent classifier in the training loop: each step draws its batch from one per-step generator."""

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer, latents: torch.Tensor, labels: torch.Tensor,
                 scheduler: Any, *, mode: str, max_timestep: int | None, batch_size: int, seed: int,
                 device: torch.device | str, weights: torch.Tensor | None = None) -> None:
        self.model, self.optimizer, self.latents, self.labels = model, optimizer, latents, labels
        self.weights = weights
        self.scheduler, self.mode, self.max_timestep = scheduler, mode, max_timestep
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.step = 0

    def train_step(self) -> dict[str, float]:
        """Run one step on a batch drawn by this step's own generator (a resumed run draws the same)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        n, T = self.batch_size, self.scheduler.config.num_train_timesteps
        idx = torch.randint(0, len(self.latents), (n,), generator=gen)
        t = sample_timesteps(n, self.mode, T, self.max_timestep, gen)
        noise = torch.randn((n, *self.latents.shape[1:]), generator=gen)
        self.model.train()
        weights = None if self.weights is None else self.weights[idx].to(self.device)
        loss = classifier_step(self.model, self.optimizer, self.scheduler, self.latents[idx].to(self.device),
                               self.labels[idx].to(self.device), t.to(self.device), noise.to(self.device),
                               weights=weights)
        self.step += 1
        return {"loss": loss}

    def checkpoint(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Return the weights and the optimizer state."""
        opt_t, layout = optimizer_to_tensors(self.optimizer)
        return {"model": _unwrap(self.model).state_dict(), "optimizer": opt_t}, {"optimizer": layout}

    def restore(self, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
        """Load the weights and the optimizer state; continue at the saved step."""
        _unwrap(self.model).load_state_dict(tensors["model"])
        optimizer_from_tensors(self.optimizer, tensors["optimizer"], state["optimizer"])
        self.step = int(state["step"])

    def report_extras(self, report: dict[str, float], saving: bool) -> dict[str, float]:
        """Return nothing extra: the loss is the report."""
        return {}


def fit_latent_classifier(model: Any, latents: torch.Tensor, labels: torch.Tensor, scheduler: Any, *, mode: str,
                          max_timestep: int | None, steps: int, batch_size: int, lr: float, weight_decay: float,
                          seed: int, device: torch.device | str = "cpu") -> Any:
    """Return ``model`` trained for ``steps`` on scaled latents in plain PyTorch (the same loop as on Ray)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    trainee = ClassifierTrainee(model, optimizer, latents, labels, scheduler, mode=mode, max_timestep=max_timestep,
                                batch_size=batch_size, seed=seed, device=device)
    loop.train(trainee, loop.Cadence(steps, steps, steps), {}, device=device)
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


def train_loop(config: dict) -> None:
    """Ray Train worker: load the train-split latents, train (DDP) through the loop skeleton, resume."""
    from histodiff.diffusion.schedule import ddpm_scheduler
    from histodiff.runtime import device_for, set_worker_threads

    set_worker_threads(config["threads_per_worker"])
    spec = config["spec"]
    ccfg = spec.classifier
    info = common.worker_info()
    device = device_for(config["use_gpu"])
    latents, labels = select_latents(spec.latents.uri, config["store"], config["train_sha1"], config["classes"])
    weights = None
    if config.get("pseudo"):  # labeled latents, then the pool's pseudo-labeled ones weighted by their confidence
        pseudo = config["pseudo"]
        pool_z = select_pool_latents(spec.pool.uri, config["store"], pseudo["sha1"])
        latents = torch.cat([latents, pool_z])
        labels = torch.cat([labels, torch.tensor(pseudo["label_ids"], dtype=torch.long)])
        weights = torch.cat([torch.ones(len(config["train_sha1"])), torch.tensor(pseudo["confidence"]).float()])
    model = build_classifier(ccfg, latents.shape[1], len(config["classes"])).to(device)
    model = common.prepare_ddp(model) if info.in_ray else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=ccfg.lr, weight_decay=ccfg.weight_decay, fused=True)
    # Each rank draws its own batches (seed + rank); DDP averages their gradients.
    trainee = ClassifierTrainee(model, optimizer, latents * spec.latents.scale_factor, labels,
                                ddpm_scheduler(spec.schedule), mode=ccfg.mode, max_timestep=ccfg.max_timestep,
                                batch_size=ccfg.batch_size, seed=spec.seed * 1000 + info.rank, device=device,
                                weights=weights)
    loop.train(trainee, loop.Cadence(ccfg.steps, ccfg.report_every, ccfg.checkpoint_every), config, device=device,
               callbacks=config.get("callbacks", ()))


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


def select_pool_latents(uri: str, store: Store, sha1s: list[str]) -> torch.Tensor:
    """Return the (unscaled) latents of the tiles ``sha1s`` from a latents directory, in that order."""
    from histodiff.data.encode import load_latents

    z, _, latent_sha1, _ = load_latents(uri, store)
    row = {s: i for i, s in enumerate(latent_sha1)}
    missing = [s for s in sha1s if s not in row]
    if missing:
        raise ValueError(f"{len(missing)} tiles have no latent in {uri!r}; rerun `histodiff run encode`")
    return z[torch.tensor([row[s] for s in sha1s], dtype=torch.long)]


def select_latents(uri: str, store: Store, sha1s: list[str], classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (unscaled latents, label ids) of the labeled latents whose tile sha1 is in ``sha1s`` (in that order)."""
    from histodiff.data.encode import load_latents

    z, labels, latent_sha1, _ = load_latents(uri, store)
    row = {s: i for i, s in enumerate(latent_sha1)}
    missing = [s for s in sha1s if s not in row]
    if missing:
        raise ValueError(f"{len(missing)} labeled tiles have no latent in {uri!r} (e.g. sha1 {missing[0][:12]}); "
                         "rerun `histodiff run encode` with the current autoencoder")
    idx = torch.tensor([row[s] for s in sha1s], dtype=torch.long)
    index = {c: i for i, c in enumerate(classes)}
    return z[idx], torch.tensor([index[labels[i]] for i in idx.tolist()], dtype=torch.long)
