"""KL autoencoder: model shapes, losses, optional perceptual/GAN terms, and the Ray Train stage."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histodiff import checkpoint as ckpt
from histodiff.config import AutoencoderConfig, load_config
from histodiff.data import shards
from histodiff.models import autoencoder as m
from histodiff.runner import run_stage
from histodiff.stages import autoencoder as stage
from histodiff.storage import Store, join
from histodiff.train import autoencoder as t

TINY = dict(block_out_channels=[16, 32, 32], norm_num_groups=8, layers_per_block=1, batch_size=8, lr=1e-3)


def smooth_tiles(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """Return n uint8 NHWC tiles of smooth colour fields (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().byte().permute(0, 2, 3, 1).numpy()


def write_shards(uri: str, tiles: np.ndarray, labels: list, per_shard: int = 16, store: Store | None = None) -> None:
    """Write tiles as a complete shard directory (parts, then the manifest)."""
    store = store or Store()
    names = []
    for i in range(0, len(tiles), per_shard):
        names.append(shards.shard_name(len(names)))
        table = shards.tiles_table(tiles[i : i + per_shard], labels[i : i + per_shard], "test",
                                   [f"t{j}" for j in range(i, i + per_shard)])
        shards.write_table(table, join(uri, names[-1]), store)
    classes = sorted({lab for lab in labels if lab is not None})
    shards.write_manifest(shards.Manifest(uri, names, len(tiles), classes, tiles.shape[1], fingerprint=f"fp{len(tiles)}"),
                          store)


def test_build_autoencoder_downsamples_by_f_without_attention():
    cfg = AutoencoderConfig(**TINY)
    vae = m.build_autoencoder(cfg)
    assert m.downsample_factor(cfg) == 4
    z = vae.encode(torch.zeros(2, 3, 16, 16)).latent_dist.mean
    assert tuple(z.shape) == (2, 3, 4, 4)
    assert vae.decode(z).sample.shape == (2, 3, 16, 16)
    assert not [n for n, mod in vae.named_modules() if type(mod).__name__ == "Attention"]
    f2 = AutoencoderConfig(**{**TINY, "block_out_channels": [16, 32]})
    assert m.downsample_factor(f2) == 2
    with pytest.raises(ValueError, match="norm_num_groups"):
        m.build_autoencoder(AutoencoderConfig(**{**TINY, "block_out_channels": [12, 32, 32]}))


def test_vae_loss_is_l1_plus_weighted_kl_per_pixel():
    x = torch.zeros(2, 3, 4, 4)
    recon = torch.full_like(x, 0.5)
    mean, logvar = torch.ones(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    out = m.vae_loss(x, recon, mean, logvar, kl_weight=0.1)
    # KL(N(1, 1) || N(0, 1)) = 0.5 per element, 12 elements per sample, over 48 pixels.
    assert out["l1"].item() == pytest.approx(0.5)
    assert out["kl"].item() == pytest.approx(0.5 * 12 / 48)
    assert out["loss"].item() == pytest.approx(0.5 + 0.1 * 0.125)
    assert m.kl_per_sample(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)).item() == 0.0


def test_few_steps_reduce_l1_on_a_fixed_batch(one_thread):
    torch.manual_seed(0)
    cfg = AutoencoderConfig(**TINY)
    parts = t.make_parts(cfg, torch.device("cpu"))
    x = shards.to_model_range(smooth_tiles(8))
    history = [t.train_step(parts, x, s, cfg, torch.device("cpu"))["l1"] for s in range(25)]
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.8 * history[0]


@pytest.fixture(scope="module")
def vgg_state() -> dict[str, torch.Tensor]:
    """A random VGG16 feature state dict, keyed as torchvision's vgg16 state dict is."""
    torch.manual_seed(0)
    return {f"features.{k}": v for k, v in m.vgg16_features().state_dict().items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_perceptual_loss_loads_user_weights(tmp_path, suffix, vgg_state, one_thread):
    from safetensors.torch import save_file

    path = str(tmp_path / f"vgg{suffix}")
    state = vgg_state
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    loaded = t.load_perceptual_state(path, Store())
    assert torch.equal(loaded["features.0.weight"], state["features.0.weight"])
    net = m.PerceptualLoss(loaded)
    x = shards.to_model_range(smooth_tiles(2, size=32))
    assert net(x, x).abs().max().item() < 1e-6
    assert (net(x, x.flip(-1)) > 0).all()
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="VGG16"):
        m.PerceptualLoss({"features.0.weight": state["features.0.weight"]})


def test_perceptual_term_trains(vgg_state, one_thread):
    cfg = AutoencoderConfig(**{**TINY, "perceptual_weight": 0.5, "perceptual_weights_uri": "unused"})
    parts = t.make_parts(cfg, torch.device("cpu"), vgg_state)
    x = shards.to_model_range(smooth_tiles(4, size=32))
    outs = [t.train_step(parts, x, s, cfg, torch.device("cpu")) for s in range(3)]
    assert all(o["perceptual"] > 0 for o in outs)
    assert outs[0]["loss"] == pytest.approx(outs[0]["l1"] + 0.5 * outs[0]["perceptual"] + 1e-6 * outs[0]["kl"], rel=1e-5)


def test_hinge_losses():
    assert m.hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert m.hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0
    assert m.generator_gan_loss(torch.full((4,), 3.0)).item() == -3.0


@pytest.mark.parametrize("adaptive", [True, False])
def test_discriminator_starts_at_disc_start_step(adaptive, one_thread):
    torch.manual_seed(0)
    cfg = AutoencoderConfig(**{**TINY, "disc_weight": 0.5, "disc_start_step": 2, "disc_adaptive": adaptive,
                               "disc_layers": 2, "disc_channels": 8})
    parts = t.make_parts(cfg, torch.device("cpu"))
    x = shards.to_model_range(smooth_tiles(8))
    d_before = [p.detach().clone() for p in parts.disc.parameters()]
    outs = [t.train_step(parts, x, s, cfg, torch.device("cpu")) for s in range(4)]
    assert "d_loss" not in outs[0] and "d_loss" not in outs[1]
    assert all(math.isfinite(o["d_loss"]) and math.isfinite(o["g_loss"]) for o in outs[2:])
    if adaptive:
        assert all(o["disc_weight_eff"] > 0 for o in outs[2:])
    else:
        assert all(o["disc_weight_eff"] == pytest.approx(0.5) for o in outs[2:])
    assert any(not torch.equal(a, b) for a, b in zip(d_before, parts.disc.parameters()))
    tensors, state = t.parts_tensors(parts)
    assert {"model", "optimizer", "disc", "disc_optimizer"} <= set(tensors)


def test_reconstruction_quality_numbers_and_labelled_grid():
    x = torch.zeros(4, 3, 16, 16)
    recon = x + 0.2  # in [0, 1] units the error is 0.1: MSE 0.01 -> 20 dB
    q = m.reconstruction_quality(x, recon)
    assert q["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert m.reconstruction_quality(x.uniform_(-1, 1), x)["ssim"] == pytest.approx(1.0, abs=1e-5)
    from histodiff.plots import labeled_grid_figure, tile_grid

    grid = tile_grid(np.zeros((3, 16, 16, 3), np.uint8), columns=2, scale=2)
    assert grid.shape == (2 * 32 + 2, 2 * 32 + 2, 3) and grid[:32, :32].max() == 0 and grid[-32:, -32:].min() == 255
    fig = labeled_grid_figure([("original", np.zeros((3, 8, 8, 3), np.uint8)),
                               ("reconstruction", np.full((3, 8, 8, 3), 255, np.uint8))], "title")
    assert [ax.get_ylabel() for ax in fig.axes] == ["original", "reconstruction"]


@pytest.mark.slow
def test_run_trains_two_workers_exports_and_skips(tmp_path, ray_local):
    root = str(tmp_path / "out")
    write_shards(f"{root}/shards/unlabeled", smooth_tiles(48, seed=1), [None] * 48)
    write_shards(f"{root}/shards/labeled", smooth_tiles(16, seed=2), ["a", "b"] * 8)
    cfg = load_config("tiny", [
        f"paths.root={root}", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "ray.num_workers=2", "ray.threads_per_worker=1",
        "ray.cpus_per_worker=0.5", "autoencoder.block_out_channels=[16,32,32]", "autoencoder.norm_num_groups=8",
        "autoencoder.batch_size=8", "autoencoder.steps=4", "autoencoder.checkpoint_every=2",
        "autoencoder.report_every=2", "autoencoder.eval_tiles=8", "autoencoder.lr=1e-3"])
    result = run_stage(stage, cfg)
    assert not result.skipped and result.steps == 4
    meta = ckpt.model_meta(cfg.paths.autoencoder, Store())
    assert meta["sha256"] == result.sha256 and meta["heldout_uri"] == cfg.paths.labeled_shards
    assert 5.0 < result.psnr < 60.0 and -1.0 <= result.ssim <= 1.0
    from histodiff.train import common

    run = stage.run_name(stage.spec(cfg, Store()), cfg.name)
    assert common.completed_steps(cfg.paths.checkpoints, run, Store()) == [2, 4]
    from diffusers import AutoencoderKL

    vae, _ = ckpt.load_exported(AutoencoderKL, cfg.paths.autoencoder, Store())
    assert vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean.shape == (1, 3, 4, 4)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    mlrun = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    assert mlrun.info.run_id == result.run_id and mlrun.info.status == "FINISHED"
    assert mlrun.data.metrics["heldout_psnr"] == pytest.approx(result.psnr)
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "l1")] == [2, 4]  # rank 0 only
    assert "autoencoder_reconstructions.png" in [a.path for a in client.list_artifacts(mlrun.info.run_id)]
    mtime = os.path.getmtime(os.path.join(cfg.paths.autoencoder, ckpt.MODEL_META))
    again = run_stage(stage, cfg)
    assert again.skipped and again.sha256 == result.sha256
    assert os.path.getmtime(os.path.join(cfg.paths.autoencoder, ckpt.MODEL_META)) == mtime


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_train_step_reduces_l1():
    torch.manual_seed(0)
    device = torch.device("cuda")
    # 16 px tiles fit a 2-layer PatchGAN (3 layers need 24 px: HistodiffConfig rejects that pairing)
    cfg = AutoencoderConfig(**{**TINY, "disc_weight": 0.5, "disc_start_step": 10, "disc_layers": 2})
    parts = t.make_parts(cfg, device)
    x = shards.to_model_range(smooth_tiles(8)).to(device)
    history = [t.train_step(parts, x, s, cfg, device) for s in range(30)]
    assert all(math.isfinite(h["total"]) for h in history) and "d_loss" in history[-1]
    assert history[9]["l1"] < 0.8 * history[0]["l1"]


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_discriminator_runs_on_the_smallest_tiles_the_config_allows(layers):
    need = 3 * 2 ** layers  # the bound HistodiffConfig enforces
    disc = m.build_discriminator(AutoencoderConfig(**{**TINY, "disc_layers": layers, "disc_channels": 8}))
    assert disc(torch.zeros(1, 3, need, need)).shape[-1] >= 1
    with pytest.raises(RuntimeError):
        disc(torch.zeros(1, 3, need - 2 ** layers, need - 2 ** layers))
