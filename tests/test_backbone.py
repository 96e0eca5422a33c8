"""The shared timm trainer: augmentations, validation-only selection, determinism, bad names."""

from __future__ import annotations

import pytest
import torch

from histodiff.models.backbone import check_backbone_name, create_backbone
from histodiff.train.backbone import fit_classifier, label_safe_augment, shift_augment


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shift_augment_translates_without_flipping():
    x = torch.zeros(4, 1, 8, 8)
    x[:, :, 3, 4] = 1.0
    out = shift_augment(x, torch.Generator().manual_seed(0), max_shift=2)
    assert out.shape == x.shape
    for img in out[:, 0]:
        (r, c), = torch.nonzero(img).tolist()
        assert abs(r - 3) <= 2 and abs(c - 4) <= 2
    same = shift_augment(x, torch.Generator().manual_seed(0), max_shift=2)
    assert torch.equal(out, same)
    rot = label_safe_augment(x, torch.Generator().manual_seed(1))
    assert rot.sum() == x.sum() and rot.shape == x.shape


def test_unknown_timm_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"timm has no model named 'resnet_nope'.*similar names"):
        check_backbone_name("resnet_nope")
    with pytest.raises(ValueError, match="timm has no model named"):
        create_backbone("resnet_nope", 2, 32)
    with pytest.raises(ValueError, match="unknown augmentation 'mixup'"):
        fit_classifier(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]), torch.zeros(2, 3, 8, 8), torch.tensor([0, 1]),
                       backbone="test_resnet", num_classes=2, image_size=8, epochs=1, lr=1e-3, weight_decay=0.0,
                       batch_size=2, seed=0, augment="mixup")


def test_fit_selects_on_validation_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(16) % 2
    x = torch.randn(16, 3, 8, 8, generator=g) * 0.3 + (y.view(-1, 1, 1, 1) * 2 - 1) * 0.5
    kw = dict(backbone="test_resnet", num_classes=2, image_size=8, epochs=3, lr=3e-3, weight_decay=0.0,
              batch_size=4, seed=5, augment="shift")
    a = fit_classifier(x[:8], y[:8], x[8:], y[8:], **kw)
    b = fit_classifier(x[:8], y[:8], x[8:], y[8:], **kw)
    scores = [h["val_balanced_accuracy"] for h in a.history]
    assert a.best_epoch == scores.index(max(scores)) and a.best_val_balanced_accuracy == max(scores)
    assert scores == [h["val_balanced_accuracy"] for h in b.history]
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_steps_give_every_train_set_the_same_optimizer_steps():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = torch.randn(40, 3, 8, 8, generator=g)
    kw = dict(backbone="test_resnet", num_classes=2, image_size=8, epochs=3, lr=1e-3, weight_decay=0.0,
              batch_size=4, seed=0, augment="none")
    by_epochs = [fit_classifier(x[:n], y[:n], x[:4], y[:4], **kw).history for n in (6, 20)]
    assert [h[-1]["step"] for h in by_epochs] == [3 * 1, 3 * 5]  # epochs: more tiles, more (full) batches
    by_steps = [fit_classifier(x[:n], y[:n], x[:4], y[:4], steps=10, **kw).history for n in (6, 40)]
    assert [[r["step"] for r in h] for h in by_steps] == [[4, 7, 10], [4, 7, 10]]  # 3 rounds, 10 steps each
    with pytest.raises(ValueError, match="steps=2 must be at least epochs=3"):
        fit_classifier(x, y, x, y, steps=2, **kw)


def test_no_batch_of_one_reaches_batchnorm():
    y = torch.arange(17) % 2  # 17 = 16 + 1: a last batch of one would break BatchNorm in training
    x = torch.randn(17, 3, 8, 8)
    kw = dict(backbone="test_resnet", num_classes=2, image_size=8, lr=1e-3, weight_decay=0.0, batch_size=16,
              seed=0, augment="none")
    fit = fit_classifier(x, y, x[:4], y[:4], epochs=2, steps=6, **kw)
    assert fit.history[-1]["step"] == 6
    with pytest.raises(ValueError, match="BatchNorm needs at least 2"):
        fit_classifier(x[:1], y[:1], x[:4], y[:4], epochs=1, **kw)
