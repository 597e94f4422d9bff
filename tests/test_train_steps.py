"""The GAN updates of model/gan.py run alone, on CPU, without Ray: losses, phases, no gradient leak."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.config import TrainConfig
from model.completion import CompletionNetwork
from model.discriminator import ContextDiscriminator, crop_patches
from model.gan import complete, completion_step, discriminator_step, joint_generator_step, make_optimizer
from model.losses import discriminator_loss, hole_l1, hole_mse, psnr, ssim
from pipeline.train_data import batch_masks, scale_and_crop

MEAN = (0.4, 0.4, 0.4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(n=4, size=32, local=16, seed=0):
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    masks, boxes = batch_masks([f"k{i}" for i in range(n)], step=0, seed=seed, image_size=size,
                               local_size=local, hole_range=(6, 12))  # fmt: skip
    return images, torch.from_numpy(masks), torch.from_numpy(boxes)


def test_hole_losses_ignore_known_pixels():
    images, masks, _ = _batch()
    wrong_outside = torch.where(masks.bool(), images, 1 - images)
    assert hole_mse(wrong_outside, images, masks).item() == 0.0
    assert hole_l1(wrong_outside, images, masks).item() == 0.0
    wrong_inside = torch.where(masks.bool(), images + 0.5, images)
    assert hole_mse(wrong_inside, images, masks).item() == pytest.approx(0.25)
    assert hole_l1(wrong_inside, images, masks).item() == pytest.approx(0.5)


def test_metrics_on_known_cases():
    images, _, _ = _batch()
    assert torch.allclose(ssim(images, images), torch.ones(4))
    assert ssim(images, 1 - images).max() < 0.5
    assert psnr(images, (images + 0.1).clamp(0, 1)).min() > 19.0  # mse <= 0.01 -> >= 20 dB
    logits = torch.tensor([[8.0], [-8.0]])
    assert discriminator_loss(logits[:1], logits[1:]).item() < 0.01


def test_crop_patches_takes_each_images_own_box():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    boxes = torch.tensor([[0, 0, 4, 4], [3, 2, 4, 4]])
    patches = crop_patches(images, boxes, 4)
    assert torch.equal(patches[0], images[0, :, 0:4, 0:4])
    assert torch.equal(patches[1], images[1, :, 3:7, 2:6])


def test_generator_loss_leaves_no_gradient_on_the_discriminator():
    """The popular port's bug: D's next step also applied G's adversarial gradient."""
    torch.manual_seed(0)
    images, masks, boxes = _batch()
    generator, discriminator = CompletionNetwork(0.125), ContextDiscriminator(32, 16, 0.125)
    opt_g = make_optimizer("adam", generator.parameters(), 1e-3)
    opt_d = make_optimizer("adam", discriminator.parameters(), 1e-3)
    output, completed = complete(generator, images, masks, MEAN)
    discriminator_step(discriminator, opt_d, images, completed, boxes, 16)
    d_after_own_step = {k: v.clone() for k, v in discriminator.state_dict().items()}
    d_grads = [p.grad.clone() for p in discriminator.parameters()]
    g_before = [p.clone() for p in generator.parameters()]

    joint_generator_step(opt_g, discriminator, output, completed, images, masks, boxes, 16, alpha=1.0)

    for grad, p in zip(d_grads, discriminator.parameters(), strict=True):
        assert torch.equal(p.grad, grad)  # the generator's backward added nothing
    assert all(p.requires_grad for p in discriminator.parameters())
    params = dict(discriminator.named_parameters())
    for name, value in d_after_own_step.items():
        if name in params:
            assert torch.equal(params[name], value), name
    assert any(not torch.equal(a, b) for a, b in zip(g_before, generator.parameters(), strict=True))
    # The adversarial term really reaches the generator: alpha changes its gradient.
    assert all(p.grad is not None for p in generator.parameters())


def test_discriminator_sees_the_composite_and_only_updates_itself():
    images, masks, boxes = _batch()
    generator, discriminator = CompletionNetwork(0.125), ContextDiscriminator(32, 16, 0.125)
    output, completed = complete(generator, images, masks, MEAN)
    outside = ~masks.bool().expand_as(images)
    assert torch.equal(completed[outside], images[outside])
    assert torch.equal(completed[~outside], output[~outside])
    opt_d = make_optimizer("adadelta", discriminator.parameters(), 1.0)
    loss = discriminator_step(discriminator, opt_d, images, completed, boxes, 16)
    assert np.isfinite(loss)
    assert all(p.grad is None for p in generator.parameters())


def test_phase_one_hole_mse_drops_on_real_photos(photos):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    crops = np.stack([scale_and_crop(p, 32, rng) for p in photos[:8]])
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    mean = tuple(images.mean((0, 2, 3)).tolist())
    generator = CompletionNetwork(0.25)
    optimizer = make_optimizer("adam", generator.parameters(), 2e-3)
    losses = []
    for step in range(60):
        masks, _ = batch_masks([str(i) for i in range(8)], step=step, seed=0, image_size=32,
                               local_size=16, hole_range=(8, 14))  # fmt: skip
        losses.append(completion_step(generator, optimizer, images, torch.from_numpy(masks), mean))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), losses


def test_config_rejects_inconsistent_schedules_and_sizes():
    base = dict(images="x", output="y")
    assert TrainConfig(**base).storage_path == "y-runs"
    assert [TrainConfig(**base, tc=2, td=3, t_train=10).phase(s) for s in (0, 1, 2, 4, 5, 9)] == [
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    with pytest.raises(ValueError, match="t_train"):
        TrainConfig(**base, tc=10, td=10, t_train=15)
    with pytest.raises(ValueError, match="multiple of num_workers"):
        TrainConfig(**base, batch_size=5, num_workers=2)
    with pytest.raises(ValueError, match="hole_min"):
        TrainConfig(**base, image_size=64, local_size=32, hole_min=8, hole_max=40)
