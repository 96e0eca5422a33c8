"""Guided DDIM sampler: exact unguided at scale 0, seeds, per-sample seeds, alpha_bar indexing."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from histodiff.config import ScheduleConfig
from histodiff.diffusion.guidance import classifier_grad_fn
from histodiff.diffusion.sampling import ddim_sample
from histodiff.diffusion.schedule import ddim_scheduler

SHAPE = (4, 3, 4, 4)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=4, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


@pytest.fixture(scope="module")
def classifier():
    from bench.toys import toy_classifier

    torch.manual_seed(0)
    return toy_classifier().eval()


def _sample(unet, seed=0, steps=5, eta=1.0, cond_fn=None, shape=SHAPE):
    return ddim_sample(unet, ddim_scheduler(ScheduleConfig()), shape, torch.Generator().manual_seed(seed), steps, eta,
                       cond_fn=cond_fn)


def test_scale_zero_is_bitwise_unguided(unet, classifier):
    y = torch.tensor([0, 1, 2, 0])
    for eta in (0.0, 1.0):
        plain = _sample(unet, eta=eta)
        zero = _sample(unet, eta=eta, cond_fn=classifier_grad_fn(classifier, y, 0.0))
        assert torch.equal(plain, zero)
    # A tiny nonzero scale must change the result: the test above can fail.
    assert not torch.equal(_sample(unet), _sample(unet, cond_fn=classifier_grad_fn(classifier, y, 1e-2)))


def test_same_seed_same_latents_other_seed_differs(unet):
    a, b, c = _sample(unet, seed=3), _sample(unet, seed=3), _sample(unet, seed=4)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.1


def test_per_sample_generators_make_samples_batch_independent(unet):
    seeds = [11, 12, 13, 14]
    sched = ddim_scheduler(ScheduleConfig())
    batch = ddim_sample(unet, sched, SHAPE, [torch.Generator().manual_seed(s) for s in seeds], 5, 1.0)
    alone = ddim_sample(unet, sched, (1, *SHAPE[1:]), [torch.Generator().manual_seed(seeds[2])], 5, 1.0)
    torch.testing.assert_close(batch[2:3], alone, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one per sample"):
        ddim_sample(unet, sched, SHAPE, [torch.Generator()], 5, 1.0)


@pytest.mark.parametrize("steps", [7, 50, 100])
def test_guidance_uses_alpha_bar_of_the_train_timestep(unet, steps):
    """For any step count, eps' = eps - sqrt(1 - alpha_bar[t]) * cond at the actual timestep t."""
    sched = ddim_scheduler(ScheduleConfig())
    ab = sched.alphas_cumprod
    const = torch.full(SHAPE, 0.5)
    seen = []

    def cond_fn(z, t):
        seen.append(int(t))
        return const

    class Shifted(torch.nn.Module):  # the unguided model with the correction written out by hand
        def forward(self, z, t):
            out = unet(z, t)
            out.sample = out.sample - (1 - ab[int(t)]).sqrt() * const
            return out

    guided = _sample(unet, steps=steps, cond_fn=cond_fn)
    by_hand = _sample(Shifted(), steps=steps)
    torch.testing.assert_close(guided, by_hand, atol=1e-5, rtol=1e-5)
    ratio = 1000 // steps
    assert seen == [ratio * i for i in reversed(range(steps))]


def test_bad_arguments(unet):
    with pytest.raises(ValueError, match="num_inference_steps"):
        _sample(unet, steps=0)
    with pytest.raises(ValueError, match="eta"):
        _sample(unet, eta=-1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_guided_sampling_on_gpu_bf16(unet, classifier):
    from histodiff.runtime import autocast

    dev = torch.device("cuda")
    g_unet, g_clf = unet.to(dev), classifier.to(dev)
    cond = classifier_grad_fn(g_clf, torch.tensor([0, 1, 2, 0], device=dev), 3.0)
    z = ddim_sample(g_unet, ddim_scheduler(ScheduleConfig()), SHAPE, torch.Generator().manual_seed(0), 10, 1.0,
                    cond_fn=cond, device=dev, autocast=autocast(dev))
    cpu = _sample(unet.cpu(), steps=10, cond_fn=classifier_grad_fn(classifier.cpu(), torch.tensor([0, 1, 2, 0]), 3.0))
    assert torch.isfinite(z).all()
    assert (z.cpu() - cpu).abs().mean() < 0.2  # same seed, same draws on CPU: close up to bf16 error


def test_anchored_sampling_spans_anchor_to_fresh_sample(unet):
    """Strength 1 is the pure-noise sampler bitwise; strength near 0 returns the anchor; between: a variant."""
    sched = ddim_scheduler(ScheduleConfig())
    anchors = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))

    def sample(**kw):
        return ddim_sample(unet, sched, SHAPE, [torch.Generator().manual_seed(i) for i in range(SHAPE[0])], 10, 1.0,
                           **kw)

    fresh = sample()
    assert torch.equal(sample(anchors=anchors, strength=1.0), fresh)
    assert torch.equal(sample(anchors=anchors, strength=0.01), anchors)  # no step left: the anchor itself
    half = sample(anchors=anchors, strength=0.5)
    assert (half - anchors).pow(2).mean() < (fresh - anchors).pow(2).mean()  # closer to its anchor than a fresh one
    assert not torch.equal(half, anchors)
    with pytest.raises(ValueError, match="strength"):
        sample(anchors=anchors, strength=0.0)
