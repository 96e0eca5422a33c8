"""Classifier guidance: the closure's gradient, the eps correction, and guidance on trained tiny models."""

from __future__ import annotations

import pytest
import torch

from bench import toys as toy
from histodiff.diffusion.guidance import alpha_bar_at, classifier_grad_fn, guided_eps
from histodiff.diffusion.sampling import ddim_sample
from histodiff.diffusion.schedule import ddim_scheduler, ddpm_scheduler
from histodiff.train.latent_classifier import fit_latent_classifier


@pytest.fixture(scope="module")
def trained():
    """A tiny UNet and a noisy-latent classifier trained for seconds on 3-class toy latents."""
    torch.manual_seed(0)
    unet = toy.train_toy_unet(steps=250, seed=0)
    clf = toy.toy_classifier()
    z, y = toy.toy_latents(600, seed=1)
    fit_latent_classifier(clf, z, y, ddpm_scheduler(toy.toy_schedule()), mode="noisy", max_timestep=None, steps=200,
                          batch_size=64, lr=2e-3, weight_decay=0.0, seed=0)
    return unet, clf


def test_guided_eps_formula():
    eps = torch.tensor([1.0, -2.0])
    cond = torch.tensor([0.5, 4.0])
    out = guided_eps(eps, cond, torch.tensor(0.64))  # sqrt(1 - 0.64) = 0.6
    torch.testing.assert_close(out, torch.tensor([1.0 - 0.3, -2.0 - 2.4]))
    ab = torch.linspace(0.99, 0.01, 1000)
    assert float(alpha_bar_at(ab, torch.tensor(980))) == pytest.approx(float(ab[980]))


def test_cond_fn_is_scaled_gradient_of_log_prob():
    torch.manual_seed(0)
    clf = toy.toy_classifier().eval()
    z = torch.randn(3, *toy.TOY_SHAPE)
    t = torch.tensor(300)
    y = torch.tensor([2, 0, 1])
    g1 = classifier_grad_fn(clf, y, 1.0)(z, t)
    g5 = classifier_grad_fn(clf, y, 5.0)(z, t)
    torch.testing.assert_close(g5, 5 * g1)
    zz = z.clone().requires_grad_(True)
    torch.log_softmax(clf(zz, t), -1)[1, 0].backward()
    torch.testing.assert_close(g1[1], zz.grad[1])  # per-sample: sample 1's gradient is only its own
    # A small step along the gradient raises log p(y | z_t, t).
    before = torch.log_softmax(clf(z, t), -1).gather(1, y[:, None])
    after = torch.log_softmax(clf(z + 0.05 * g1, t), -1).gather(1, y[:, None])
    assert bool((after > before).all())
    with pytest.raises(ValueError, match="guidance scale"):
        classifier_grad_fn(clf, y, -1.0)
    assert torch.equal(classifier_grad_fn(clf, y, 0.0)(z, t), torch.zeros_like(z))


def guidance_rates(unet, clf, scale: float, n_per_class: int = 16, steps: int = 20, seed: int = 7) -> float:
    """Return the fraction of samples the independent judge assigns to their target class."""
    y = torch.arange(toy.TOY_CLASSES).repeat_interleave(n_per_class)
    cond = classifier_grad_fn(clf, y, scale) if scale > 0 else None
    z = ddim_sample(unet, ddim_scheduler(toy.toy_schedule()), (len(y), *toy.TOY_SHAPE),
                    torch.Generator().manual_seed(seed), steps, 1.0, cond_fn=cond)
    return float((toy.toy_judge(z) == y).float().mean())


def test_guided_samples_hit_their_class_far_more_often(trained):
    unet, clf = trained
    unguided = guidance_rates(unet, clf, 0.0)
    guided = guidance_rates(unet, clf, 3.0)
    # Unguided, a target is hit about 1 time in 3 (the classes are balanced).
    assert unguided < 0.55
    assert guided >= 0.8
    assert guided - unguided >= 0.3
