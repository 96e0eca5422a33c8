"""Benchmark and toy setup for classifier guidance: step cost, acceptance rate, guidance precision.

The toy setup (shared with tests/test_guidance.py) is a tiny unconditional UNet and a tiny
noisy-latent classifier trained for seconds on structured 3-class "latents", with a
rule-based judge that never saw either model (it correlates with the class templates).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import torch
import torch.nn.functional as F

from histodiff.config import ScheduleConfig
from histodiff.diffusion.schedule import ddim_scheduler, ddpm_scheduler
from histodiff.models.latent_classifier import LatentClassifier

TOY_SHAPE = (3, 4, 4)
TOY_CLASSES = 3


def toy_templates() -> torch.Tensor:
    """Return (3, C, H, W) class templates: left/right, top/bottom and 2x2-block checkerboard."""
    c, h, w = TOY_SHAPE
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    t0 = torch.where(xx < w // 2, 1.0, -1.0)
    t1 = torch.where(yy < h // 2, 1.0, -1.0)
    t2 = torch.where(((yy // 2) + (xx // 2)) % 2 == 0, 1.0, -1.0)
    return torch.stack([t.expand(c, h, w) for t in (t0, t1, t2)])


def toy_latents(n: int, seed: int, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (n, C, H, W) latents (about unit scale) and their class labels (balanced)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % TOY_CLASSES
    amp = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen)
    z = toy_templates()[y] * amp + noise * torch.randn(n, *TOY_SHAPE, generator=gen)
    return z, y


def toy_judge(z: torch.Tensor) -> torch.Tensor:
    """Return the class whose template correlates most with each latent (an independent judge)."""
    t = toy_templates().flatten(1)
    return (z.flatten(1) @ t.T).argmax(-1)


def toy_schedule() -> ScheduleConfig:
    """Return the paper's noise schedule (T=1000, scaled_linear)."""
    return ScheduleConfig()


def train_toy_unet(steps: int = 500, seed: int = 0) -> Any:
    """Return a tiny UNet2DModel trained (L2, epsilon) on toy latents."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=TOY_SHAPE[-1], in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    sched = ddpm_scheduler(toy_schedule())
    data, _ = toy_latents(2048, seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    unet.train()
    for _ in range(steps):
        idx = torch.randint(0, len(data), (128,), generator=gen)
        z0 = data[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z0),), generator=gen)
        loss = F.mse_loss(unet(sched.add_noise(z0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval()


def toy_classifier() -> LatentClassifier:
    """Return an untrained tiny latent classifier for the toy latents."""
    return LatentClassifier(in_channels=3, num_classes=TOY_CLASSES, block_out_channels=(16, 32), layers_per_block=1,
                            norm_num_groups=8, pool="attention", attention_heads=4)


TOY_CLASS_NAMES = ["A", "B", "C"]


def toy_tiles(n_per_class: int, seed: int) -> tuple[Any, list[str]]:
    """Return (uint8 NHWC 8x8 tiles, class names): class k is tinted towards RGB channel k."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tiles, labels = [], []
    for k, name in enumerate(TOY_CLASS_NAMES):
        for _ in range(n_per_class):
            t = rng.integers(40, 120, size=(8, 8, 3))
            t[..., k] += 120
            tiles.append(t.astype(np.uint8))
            labels.append(name)
    return np.stack(tiles), labels


def write_toy_inputs(root: str, unet: Any = None, classifier: Any = None, n_per_class: int = 12) -> Any:
    """Write labeled shards, labeled latents and autoencoder/denoiser/classifier exports; return the config."""

    import pyarrow as pa
    from diffusers import AutoencoderKL, UNet2DModel

    from histodiff.checkpoint import export_model
    from histodiff.storage import Store, join
    from histodiff.config import HistodiffConfig
    from histodiff.data import shards

    cfg = HistodiffConfig.model_validate({
        "name": "toy", "seed": 0, "paths": {"root": root}, "tracking": {"enabled": False},
        "ray": {"num_workers": 1, "cpus_per_worker": 1},
        "data": {"tile_size": 8, "val_fraction": 0.25, "test_fraction": 0.0, "tiles_per_shard": 16},
        "classifier": {"block_out_channels": [16, 32], "norm_num_groups": 8, "steps": 20, "batch_size": 16,
                       "report_every": 10, "checkpoint_every": 20, "eval_timesteps": [0, 500]},
        "synthesis": {"accepted_per_class": 4, "max_samples_per_class": 12, "batch_size": 4,
                      "num_inference_steps": 4, "guidance_scale": 1.0, "num_actors": 1,
                      "selector": {"backbone": "test_resnet", "epochs": 1, "batch_size": 8, "threshold": 0.0}},
    })
    store = Store()
    tiles, labels = toy_tiles(n_per_class, cfg.seed)
    shards.write_table(shards.tiles_table(tiles, labels, "toy", [f"toy/{i}" for i in range(len(tiles))]),
                       join(cfg.paths.labeled_shards, shards.shard_name(0)), store)
    shards.write_manifest(shards.Manifest(uri=cfg.paths.labeled_shards, shards=[shards.shard_name(0)],
                                          num_tiles=len(tiles), classes=TOY_CLASS_NAMES, tile_size=8,
                                          fingerprint="toy"), store)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=3, norm_num_groups=8, sample_size=8)
    ae_sha = export_model(vae, cfg.paths.autoencoder, {"kind": "autoencoder"}, store)
    # Latents in the encode contract: unscaled fp16, one per labeled tile, keyed by the tile's pixel sha1.
    order = torch.tensor([TOY_CLASS_NAMES.index(c) for c in labels])
    z = toy_templates()[order] + 0.3 * torch.randn(len(tiles), *TOY_SHAPE, generator=torch.Generator().manual_seed(1))
    scale = 0.5
    lat_uri = join(cfg.paths.labeled_latents, "train")
    table = pa.table({"latent": pa.array([(zz / scale).half().numpy().tobytes() for zz in z], pa.binary()),
                      "label": pa.array(labels, pa.string()),
                      "sha1": pa.array([shards.pixel_sha1(t) for t in tiles], pa.string())})
    shards.write_table(table, join(lat_uri, "part-00000.parquet"), store)
    store.write_json(join(lat_uri, "_latents.json"), {
        "shape": list(TOY_SHAPE), "scale_factor": scale, "autoencoder_sha256": ae_sha, "num_latents": len(tiles),
        "shards": ["part-00000.parquet"]})
    if unet is None:
        torch.manual_seed(cfg.seed)
        unet = UNet2DModel(sample_size=TOY_SHAPE[-1], in_channels=3, out_channels=3, block_out_channels=(16, 32),
                           layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    export_model(unet, cfg.paths.denoiser, {"kind": "denoiser", "autoencoder_sha256": ae_sha, "scale_factor": scale,
                                            "latent_shape": list(TOY_SHAPE)}, store)
    export_model(classifier or toy_classifier(), cfg.paths.classifier, {
        "kind": "latent_classifier", "autoencoder_sha256": ae_sha, "classes": TOY_CLASS_NAMES, "mode": "noisy"},
        store)
    return cfg


def _measured() -> str:
    import os
    import platform

    return f"{datetime.now(timezone.utc):%Y-%m-%d} {platform.machine()} {os.cpu_count()} CPUs (torch {torch.__version__})"


def step_ratio(batch_size: int = 32, steps: int = 10, repeats: int = 3) -> tuple[float, float, float]:
    """Return (guided s/step, unguided s/step, ratio) at the tiny preset's sizes (8x8x3 latents), best of repeats."""
    from histodiff.config import load_config
    from histodiff.diffusion.guidance import classifier_grad_fn
    from histodiff.diffusion.sampling import ddim_sample
    from histodiff.models.denoiser import build_unet
    from histodiff.train.latent_classifier import build_classifier

    cfg = load_config("tiny")
    torch.manual_seed(0)
    unet = build_unet(cfg.denoiser, 3, 8).eval().requires_grad_(False)
    clf = build_classifier(cfg.classifier, 3, 3).eval().requires_grad_(False)
    sched = ddim_scheduler(cfg.denoiser.schedule)
    shape = (batch_size, 3, 8, 8)
    cond = classifier_grad_fn(clf, torch.zeros(batch_size, dtype=torch.long), cfg.synthesis.guidance_scale)
    best = {"guided": float("inf"), "unguided": float("inf")}
    for _ in range(repeats):
        # Interleaved, so a burst of load on a shared machine hits both alike.
        for name, fn in (("unguided", None), ("guided", cond)):
            t0 = time.perf_counter()
            ddim_sample(unet, sched, shape, torch.Generator().manual_seed(0), steps, 1.0, cond_fn=fn)
            best[name] = min(best[name], (time.perf_counter() - t0) / steps)
    return best["guided"], best["unguided"], best["guided"] / best["unguided"]


def run(workdir: str) -> dict[str, dict]:
    """Return the guidance benchmark: step-cost ratio, accepted tiles/s and guided vs unguided precision."""
    import os
    import shutil

    import ray

    from histodiff.augment import synthesize

    measured = _measured()
    guided_s, unguided_s, ratio = step_ratio()
    torch.manual_seed(0)
    unet = train_toy_unet(steps=250, seed=0)
    clf = toy_classifier()
    from histodiff.train.latent_classifier import fit_latent_classifier

    z, y = toy_latents(600, seed=1)
    fit_latent_classifier(clf, z, y, ddpm_scheduler(toy_schedule()), mode="noisy", max_timestep=None, steps=200,
                          batch_size=64, lr=2e-3, weight_decay=0.0, seed=0)
    precision = {}
    for scale in (0.0, 3.0):
        from histodiff.diffusion.guidance import classifier_grad_fn
        from histodiff.diffusion.sampling import ddim_sample

        yy = torch.arange(TOY_CLASSES).repeat_interleave(32)
        cond = classifier_grad_fn(clf, yy, scale) if scale > 0 else None
        zz = ddim_sample(unet, ddim_scheduler(toy_schedule()), (len(yy), *TOY_SHAPE), torch.Generator().manual_seed(7),
                         20, 1.0, cond_fn=cond)
        precision[scale] = float((toy_judge(zz) == yy).float().mean())
    bench_dir = os.path.join(workdir, "guidance-bench")
    shutil.rmtree(bench_dir, ignore_errors=True)  # a finished earlier run would be skipped, timing nothing
    cfg = write_toy_inputs(bench_dir, unet=unet, classifier=clf)
    cfg.synthesis.accepted_per_class = 8
    cfg.synthesis.max_samples_per_class = 32
    cfg.synthesis.batch_size = 8
    cfg.synthesis.num_inference_steps = 20
    cfg.synthesis.guidance_scale = 3.0
    synthesize.ensure_selector(cfg)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = synthesize.run(cfg)
    finally:
        if started:
            ray.shutdown()
    accepted = sum(result.accepted.values())
    entry = lambda value, unit, goal: {"value": value, "unit": unit, "goal": goal, "measured": measured}  # noqa: E731
    return {
        "guided_vs_unguided_step_ratio": entry(round(ratio, 3), "x", "<= 1.7 on CPU at the tiny preset "
                                               f"(guided {guided_s * 1e3:.1f} ms vs unguided {unguided_s * 1e3:.1f} "
                                               "ms per DDIM step, batch 32, 8x8x3 latents)"),
        "accepted_tiles_per_s": entry(round(accepted / max(result.seconds, 1e-9), 3), "tiles/s",
                                      f"higher is better; toy 3-class run, {accepted} accepted of "
                                      f"{sum(result.generated.values())} generated, 20 DDIM steps, incl. actor start"),
        # guidance_precision_* (no prefix) come from the validation benchmark's MNIST data.
        "toy_guidance_precision_guided": entry(precision[3.0], "fraction", "toy latents: guided (s=3) samples judged "
                                               "as their target class by a rule judge; well above unguided"),
        "toy_guidance_precision_unguided": entry(precision[0.0], "fraction", "toy latents: unguided rate (about 1/3)"),
    }
