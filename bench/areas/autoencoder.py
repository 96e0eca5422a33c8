"""Cached latents vs on-the-fly encoding: denoiser training samples/s through Ray Data -> Ray Train.

One run writes tissue tiles as shards, exports an autoencoder (the ``tiny`` preset's
architecture; throughput does not depend on its weights), caches the latents with the
encode stage, and then trains the ``tiny`` denoiser with one Ray Train worker twice:
(a) on ``latent_dataset`` (the cache), (b) on ``tile_dataset`` with the tiles encoded in
the training loop by the same autoencoder. It also times decode, encode and one train step
in isolation (same thread count as the worker) for the ideal ratio
(decode + encode + train) / train. The target: measured ratio >= 0.9 x ideal.
"""

from __future__ import annotations

import logging
import os
import platform
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

N_TILES = 768
TILE = 32
WARMUP_STEPS = 3
MEASURED_STEPS = 10


def _tiles(n: int, seed: int = 0) -> np.ndarray:
    from histodiff.data.builtin import tissue_image

    image = tissue_image()
    rng = np.random.default_rng(seed)
    ys, xs = rng.integers(0, image.shape[0] - TILE, size=(2, n))
    return np.stack([np.rot90(image[y : y + TILE, x : x + TILE], int(rng.integers(4))) for y, x in zip(ys, xs)])


def _bench_loop(config: dict) -> None:
    """Ray Train worker: train the denoiser on cached latents or on tiles encoded on the fly; report samples/s."""
    import ray.train
    from diffusers import AutoencoderKL
    from ray.train.torch import prepare_model

    from histodiff.checkpoint import load_exported
    from histodiff.config import config_from_dict
    from histodiff.runtime import autocast, device_for, prefetch_batches
    from histodiff.storage import Store
    from histodiff.train import denoiser as dn_train

    cfg = config_from_dict(config["cfg"])
    device = device_for(cfg.ray.use_gpu)
    state = dn_train.make_state(cfg.denoiser, config["latent_shape"], device, cfg.seed, wrap=prepare_model)
    batch_size = cfg.denoiser.batch_size
    vae = None
    if config["mode"] == "onthefly":
        vae = load_exported(AutoencoderKL, cfg.paths.autoencoder, Store(cfg.storage))[0].to(device).eval()
    column = "latent" if vae is None else "image"
    shard = ray.train.get_dataset_shard("train")

    def batches():
        while True:
            for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True,
                                              prefetch_batches=prefetch_batches(device),
                                              dtypes=torch.float32, device=device):
                yield b[column]

    def step(x: torch.Tensor) -> None:
        if vae is not None:
            with torch.no_grad(), autocast(device):
                x = vae.encode(x).latent_dist.mean.float() * config["scale_factor"]
        dn_train.train_step(state, [x])

    it = batches()
    for _ in range(config["warmup_steps"]):
        step(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(config["measured_steps"]):
        step(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = config["measured_steps"] * batch_size / (time.perf_counter() - start)
    # Train V2's Result.metrics is None without a checkpoint: hand the figure over through storage.
    Store(cfg.storage).write_json(config["out_uri"], {"samples_per_s": rate})
    ray.train.report({"samples_per_s": rate})


def _isolated_costs(cfg: Any, tiles_png: list[bytes], latent_shape: list[int], repeats: int = 5) -> dict[str, float]:
    """Return seconds per sample for PNG decode, encode and one denoiser train step, each alone."""
    from diffusers import AutoencoderKL

    from histodiff.checkpoint import load_exported
    from histodiff.data.readers import decode_batch
    from histodiff.runtime import autocast, device_for
    from histodiff.storage import Store
    from histodiff.train import denoiser as dn_train

    device = device_for(cfg.ray.use_gpu)
    b = cfg.denoiser.batch_size
    raw = np.array(tiles_png[:b], dtype=object)
    vae = load_exported(AutoencoderKL, cfg.paths.autoencoder, Store(cfg.storage))[0].to(device).eval()
    state = dn_train.make_state(cfg.denoiser, latent_shape, device, cfg.seed)
    x = torch.from_numpy(decode_batch({"image": raw}, [], augment=False)["image"]).to(device)
    z = torch.randn(b, *latent_shape, device=device)

    def timed(fn: Any) -> float:
        fn()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats / b

    def enc() -> None:
        with torch.no_grad(), autocast(device):
            vae.encode(x).latent_dist.mean.float()

    return {"decode": timed(lambda: decode_batch({"image": raw}, [], augment=False)), "encode": timed(enc),
            "train": timed(lambda: dn_train.train_step(state, [z]))}


def run(workdir: str, preset: str = "tiny", n_tiles: int = N_TILES, warmup_steps: int = WARMUP_STEPS,
        measured_steps: int = MEASURED_STEPS) -> dict[str, dict]:
    """Return cached vs on-the-fly denoiser samples/s, their ratio, and the ideal ratio from isolated costs.

    The size arguments keep their defaults for the benchmark; the tests' tiny run lowers them.
    """
    import ray

    from histodiff import checkpoint as ckpt
    from histodiff.config import load_config
    from histodiff.data import encode, shards
    from histodiff.data.readers import read_spec, tile_dataset
    from histodiff.models.autoencoder import build_autoencoder, downsample_factor
    from histodiff.runner import Context
    from histodiff.storage import Store, join
    from histodiff.train import common

    gpu = torch.cuda.is_available()
    root = os.path.abspath(os.path.join(workdir, uuid.uuid4().hex[:8]))
    cfg = load_config(preset, [f"paths.root={root}", "tracking.enabled=false", f"ray.use_gpu={str(gpu).lower()}",
                               "ray.num_workers=1", "ray.address=null"])
    store = Store(cfg.storage)
    read = read_spec(cfg)
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False)
    try:
        tiles = _tiles(n_tiles)
        png = [shards.encode_png(t) for t in tiles]
        names = []
        for i in range(0, n_tiles, 256):
            table = shards.tiles_table(tiles[i : i + 256], [None] * len(tiles[i : i + 256]), "bench",
                                       [f"b{j}" for j in range(i, i + 256)])
            names.append(shards.shard_name(len(names)))
            shards.write_table(table, join(cfg.paths.unlabeled_shards, names[-1]), store)
        shards.write_manifest(shards.Manifest(cfg.paths.unlabeled_shards, names, n_tiles, [], TILE), store)
        torch.manual_seed(cfg.seed)
        vae = build_autoencoder(cfg.autoencoder)
        f = downsample_factor(cfg.autoencoder)
        sha = ckpt.export_model(vae, cfg.paths.autoencoder, {"kind": "autoencoder", "fingerprint": "bench",
                                                             "downsample_factor": f, "tile_size": TILE,
                                                             "latent_channels": cfg.autoencoder.latent_channels},
                                store)
        meta = encode.encode_set(cfg.paths.unlabeled_shards, cfg.paths.latents, store,
                                 autoencoder_uri=cfg.paths.autoencoder, autoencoder_sha256=sha, downsample_factor=f,
                                 encode_batch_size=cfg.autoencoder.encode_batch_size,
                                 encode_actors=cfg.autoencoder.encode_actors, read=read,
                                 cpus_per_actor=cfg.ray.cpus_per_worker, use_gpu=cfg.ray.use_gpu)
        rates = {}
        for mode in ("cached", "onthefly"):
            if mode == "cached":
                ds = encode.latent_dataset(cfg.paths.latents, store, read)
            else:
                ds = tile_dataset(cfg.paths.unlabeled_shards, store, read, augment=False,
                                  batch_size=cfg.denoiser.batch_size)
            out_uri = join(root, f"rate-{mode}.json")
            loop_config = {"cfg": cfg.public_dict(), "mode": mode, "latent_shape": meta["shape"],
                           "scale_factor": meta["scale_factor"], "out_uri": out_uri,
                           "warmup_steps": warmup_steps, "measured_steps": measured_steps}
            ctx = Context(store=store, ray=cfg.ray, name=cfg.name, checkpoints_uri=cfg.paths.checkpoints,
                          stage=f"bench-{mode}")
            common.build_trainer(ctx, _bench_loop, loop_config, f"bench-{mode}", datasets={"train": ds}).fit()
            rates[mode] = float(store.read_json(out_uri)["samples_per_s"])
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))  # as many threads as the Ray worker had
        try:
            costs = _isolated_costs(cfg, png, meta["shape"])
        finally:
            torch.set_num_threads(threads)
    finally:
        if started:
            ray.shutdown()
    ratio = rates["cached"] / rates["onthefly"]
    ideal = (costs["decode"] + costs["encode"] + costs["train"]) / costs["train"]
    log.info("cached %.1f vs on-the-fly %.1f samples/s; ratio %.2f, ideal %.2f; isolated s/sample %s",
             rates["cached"], rates["onthefly"], ratio, ideal, costs)
    load = os.getloadavg()[0]
    device = torch.cuda.get_device_name(0) if gpu else f"{os.cpu_count()} CPUs"
    measured = (f"{datetime.now(timezone.utc):%Y-%m-%d} {platform.machine()} {device} (load avg {load:.1f}), "
                f"{preset} preset, {TILE}px tiles -> {meta['shape']} latents, batch {cfg.denoiser.batch_size}, "
                "1 Ray Train worker")

    def figure(value: Any, unit: str, goal: str) -> dict[str, Any]:
        return {"value": value, "unit": unit, "goal": goal, "measured": measured}

    return {
        "cached_vs_onthefly_ratio": figure(round(ratio, 3), "x", f">= 0.9 x ideal ({0.9 * ideal:.2f})"),
        "cached_vs_onthefly_ideal": figure(round(ideal, 3), "x", "reference: (decode + encode + train) / train"),
        "cached_vs_onthefly_detail": figure(
            {"cached_samples_per_s": round(rates["cached"], 1), "onthefly_samples_per_s": round(rates["onthefly"], 1),
             "fraction_of_ideal": round(ratio / ideal, 3),
             **{f"isolated_{k}_ms_per_sample": round(v * 1e3, 3) for k, v in costs.items()}},
            "mixed", "measured ratio / ideal >= 0.9"),
    }
