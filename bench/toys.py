"""Toy models and data shared by the tests and the ``guidance`` and ``generative`` benchmarks.

The guidance toy is a tiny unconditional UNet and a tiny noisy-latent classifier trained for
seconds on structured 3-class "latents", with a rule-based judge that never saw either model
(it correlates with the class templates). :func:`write_toy_inputs` writes everything the
synthesize stage reads; :func:`write_synthetic_latents` writes latents as the encode stage does.
They live here, not in ``tests/``, because the benchmarks run them too and ``tests/`` is not a
package the benchmarks could import.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from histodiff.config import ScheduleConfig
from histodiff.diffusion.schedule import ddpm_scheduler
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


def write_synthetic_latents(uri: str, n: int, shape: tuple[int, ...] = (3, 8, 8), scale_factor: float = 0.5,
                            parts: int = 2, seed: int = 0, storage_cfg: Any = None) -> dict:
    """Write ``n`` smooth random fp16 latents in the encode stage's format (parts, then _latents.json); return the meta."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from histodiff.storage import Store, join

    rng = np.random.default_rng(seed)
    c, h, w = shape
    # Low-frequency structure, as real latents have, so a denoiser has something to learn.
    base = rng.normal(size=(n, c, 2, 2)).repeat(h // 2, axis=2).repeat(w // 2, axis=3)
    z = (base / scale_factor + 0.1 * rng.normal(size=(n, c, h, w))).astype(np.float16)
    names = []
    for i, idx in enumerate(np.array_split(np.arange(n), parts)):
        rows = [z[j].tobytes() for j in idx]
        table = pa.table({"latent": pa.array(rows, pa.binary()), "label": pa.array([None] * len(idx), pa.string()),
                          "sha1": pa.array([hashlib.sha1(r).hexdigest() for r in rows], pa.string())})
        names.append(f"part-{i:05d}.parquet")
        loc = Store(storage_cfg).resolve(join(uri, names[-1]))
        loc.fs.create_dir(loc.path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, loc.path, filesystem=loc.fs)
    meta = {"shape": list(shape), "scale_factor": scale_factor, "autoencoder_sha256": "synthetic", "num_latents": n,
            "shards": names}
    Store(storage_cfg).write_json(join(uri, "_latents.json"), meta)
    return meta

