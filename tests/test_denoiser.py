"""models/denoiser.py and train/denoiser.py: the UNet, plain-PyTorch steps, and the Ray pretrain stage."""

from __future__ import annotations

import copy

import pytest
import torch

from bench.toys import write_synthetic_latents as write_latents
from histodiff import checkpoint as ckpt
from histodiff.config import load_config
from histodiff.models import denoiser as dn
from histodiff.runner import run_stage
from histodiff.stages import pretrain
from histodiff.storage import Store
from histodiff.train import common
from histodiff.train import denoiser as tr

SMALL = ["denoiser.block_out_channels=[32, 32]", "denoiser.attention_levels=[false, true]",
         "denoiser.norm_num_groups=8", "denoiser.attention_head_dim=8", "denoiser.batch_size=8",
         "denoiser.lr=2e-3", "denoiser.warmup_steps=0", "denoiser.loss=l2"]


def _latents(n=32, seed=0):
    torch.manual_seed(seed)
    base = torch.randn(n, 3, 2, 2).repeat_interleave(4, 2).repeat_interleave(4, 3)
    return base + 0.1 * torch.randn(n, 3, 8, 8)


def test_presets_build_the_documented_sizes():
    tiny = dn.build_unet(load_config("tiny").denoiser, 3, 8)
    assert 3e6 < dn.count_parameters(tiny) < 8e6
    names = [type(b).__name__ for b in tiny.down_blocks]
    assert names == ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]
    assert tiny.config.resnet_time_scale_shift == "scale_shift"
    with torch.device("meta"):  # the paper UNet: count parameters without allocating 1 GB
        paper = dn.build_unet(load_config("paper").denoiser, 3, 64)
    assert 2.5e8 < dn.count_parameters(paper) < 3.2e8
    assert [type(b).__name__ for b in paper.up_blocks][-1] == "UpBlock2D"


def test_bad_latent_shapes_are_rejected_early():
    cfg = load_config("tiny").denoiser
    with pytest.raises(ValueError, match="divisible by 4"):
        dn.build_unet(cfg, 3, 6)
    bad = load_config("tiny", ["denoiser.block_out_channels=[48, 64, 64]"]).denoiser
    with pytest.raises(ValueError, match="norm_num_groups"):
        dn.check_latent_shape(bad, 8)


def test_diffusion_loss_matches_formulas():
    a, b = torch.tensor([1.0, -1.0, 3.0]), torch.tensor([0.0, 1.0, 1.0])
    assert tr.diffusion_loss(a, b, "l1").item() == pytest.approx(5 / 3)
    assert tr.diffusion_loss(a, b, "l2").item() == pytest.approx(9 / 3)


def test_plain_pytorch_training_lowers_the_fixed_batch_loss():
    dcfg = load_config("tiny", SMALL).denoiser
    state = tr.make_state(dcfg, [3, 8, 8], torch.device("cpu"), seed=0)
    data = _latents()
    before = tr.probe_loss(state, data[:16])
    losses = tr.fit(state, tr.in_memory_batches(data, 8, seed=0), until_step=30)
    after = tr.probe_loss(state, data[:16])
    assert len(losses) == 30 and state.step == 30 and all(map(lambda v: v == v, losses))
    assert after < 0.7 * before, (before, after)


def test_checkpoint_state_round_trip_continues_identically():
    dcfg = load_config("tiny", SMALL + ["denoiser.grad_accum=2"]).denoiser
    state = tr.make_state(dcfg, [3, 8, 8], torch.device("cpu"), seed=1)
    data = _latents()
    tr.fit(state, tr.in_memory_batches(data, 8, seed=1), until_step=3)
    tensors, st = tr.state_tensors(state)
    tensors, st = copy.deepcopy(tensors), copy.deepcopy(st)
    gen_state = state.generator.get_state()
    batch = [data[:8], data[8:16]]
    loss_a = tr.train_step(state, batch)
    fresh = tr.make_state(dcfg, [3, 8, 8], torch.device("cpu"), seed=99)
    tr.load_state(fresh, tensors, st)
    fresh.generator.set_state(gen_state)
    assert fresh.step == 3 and fresh.ema.optimization_step == 3
    loss_b = tr.train_step(fresh, batch)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for p, q in zip(state.unet.parameters(), fresh.unet.parameters()):
        torch.testing.assert_close(p, q)
    ema_a, ema_b = dn.ema_model(state.unet, state.ema), dn.ema_model(fresh.unet, fresh.ema)
    torch.testing.assert_close(next(ema_a.parameters()), next(ema_b.parameters()))


def test_ema_weights_lag_the_trained_weights():
    dcfg = load_config("tiny", SMALL + ["denoiser.ema_decay=0.9"]).denoiser
    state = tr.make_state(dcfg, [3, 8, 8], torch.device("cpu"), seed=0)
    init = [p.detach().clone() for p in state.unet.parameters()]
    tr.fit(state, tr.in_memory_batches(_latents(), 8, 0), until_step=5)
    ema = dn.ema_model(state.unet, state.ema)
    moved = sum((p - i).abs().sum() for p, i in zip(state.unet.parameters(), init))
    ema_moved = sum((p - i).abs().sum() for p, i in zip(ema.parameters(), init))
    assert 0 < ema_moved < moved


def test_run_name_keeps_a_run_across_steps_and_cadences_but_not_across_recipes(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}", *SMALL])
    write_latents(cfg.paths.latents, 64)

    def name(*extra):
        return pretrain.run_name(pretrain.spec(load_config("tiny", [f"paths.root={tmp_path}", *SMALL, *extra]),
                                               Store()), "n")

    assert name() == name("denoiser.steps=5", "denoiser.checkpoint_every=2", "denoiser.sample_every=3")
    assert name() != name("denoiser.lr=1e-3") and name() != name("denoiser.layers_per_block=2")
    assert name().startswith("n-pretrain-")


def test_missing_or_small_latents_fail_before_ray(tmp_path):
    cfg = load_config("tiny", [f"paths.root={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="encode"):
        run_stage(pretrain, cfg)
    write_latents(cfg.paths.latents, 8)
    with pytest.raises(ValueError, match="fewer than one batch"):
        run_stage(pretrain, cfg)


def ray_cfg(tmp_path, *extra):
    """Return a tiny 2-worker pretrain config on test latents under tmp_path."""
    return load_config("tiny", [f"paths.root={tmp_path}", "ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.threads_per_worker=1",
                                "tracking.enabled=false", "denoiser.report_every=100", *SMALL, *extra])


@pytest.mark.slow
def test_two_workers_train_export_and_skip_on_rerun(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = ray_cfg(tmp_path, "denoiser.steps=12", "denoiser.checkpoint_every=6", "tracking.enabled=true",
                  f"tracking.tracking_uri={uri}", "name=two")
    write_latents(cfg.paths.latents, 64)
    result = run_stage(pretrain, cfg)
    assert result.step == 12 and not result.skipped and result.final_loss == result.final_loss
    steps, losses = zip(*result.probe_losses)
    assert steps == (0, 6, 12) and losses[-1] < 0.8 * losses[0], losses
    assert common.completed_steps(cfg.paths.checkpoints, result.run_uri.rsplit("/", 1)[-1], Store()) == [6, 12]
    unet, meta = ckpt.load_exported(__import__("diffusers").UNet2DModel, cfg.paths.denoiser, Store())
    assert meta["kind"] == "denoiser" and meta["step"] == 12 and meta["latent_shape"] == [3, 8, 8]
    assert meta["scale_factor"] == 0.5 and meta["autoencoder_sha256"] == "synthetic" and meta["sha256"] == result.sha256
    client = MlflowClient(uri)
    run = client.search_runs(client.get_experiment_by_name(cfg.tracking.experiment).experiment_id)[0]
    history = client.get_metric_history(run.info.run_id, "probe_loss")
    assert [m.step for m in history] == [6, 12]  # rank 0 only: no duplicates from rank 1
    again = run_stage(pretrain, cfg)
    assert again.skipped and again.sha256 == result.sha256


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_steps_lower_the_loss():
    dcfg = load_config("tiny", SMALL).denoiser
    state = tr.make_state(dcfg, [3, 8, 8], torch.device("cuda"), seed=0)
    data = _latents()
    before = tr.probe_loss(state, data[:16])
    tr.fit(state, tr.in_memory_batches(data, 8, seed=0), until_step=30)
    assert tr.probe_loss(state, data[:16]) < 0.7 * before
