import cv2
import numpy as np
import pytest
import torch
from torch import nn

from model.completion import (
    COMPLETION_LAYERS,
    CompletionNetwork,
    count_parameters,
    images_to_tensor,
    masks_to_tensor,
    prepare_input,
    tensor_to_images,
)
from model.discriminator import ContextDiscriminator, GlobalDiscriminator, LocalDiscriminator, crop_patches
from model.masks import rectangle_mask

MEAN = (0.45, 0.42, 0.38)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_completion_network_is_the_papers_table_1():
    net = CompletionNetwork(1.0)
    assert count_parameters(net) == 6_072_131
    convs = [m for m in net.net if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [c.out_channels for c in convs] == [row[4] for row in COMPLETION_LAYERS]
    assert [c.dilation[0] for c in convs] == [1] * 6 + [2, 4, 8, 16] + [1] * 7
    assert [type(c).__name__ for c in convs].count("ConvTranspose2d") == 2
    # BatchNorm + ReLU after every layer but the last, which ends in a sigmoid.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.net) == len(convs) - 1
    assert isinstance(net.net[-1], nn.Sigmoid) and isinstance(net.net[-2], nn.Conv2d)
    out = net.eval()(torch.rand(1, 4, 64, 48))
    assert out.shape == (1, 3, 64, 48) and 0 <= out.min() and out.max() <= 1


def test_width_scales_every_layer():
    small = CompletionNetwork(0.125)
    assert [c.out_channels for c in small.net if isinstance(c, nn.Conv2d)][:2] == [8, 16]
    assert count_parameters(small) < count_parameters(CompletionNetwork(1.0)) / 40


def test_discriminators_are_the_papers_table_2():
    d = ContextDiscriminator(256, 128, 1.0)
    assert count_parameters(d.global_net) == 25_808_384
    assert count_parameters(d.local_net) == 19_253_248
    assert count_parameters(d) == 45_063_681
    assert sum(isinstance(m, nn.Conv2d) for m in d.global_net.modules()) == 6
    assert sum(isinstance(m, nn.Conv2d) for m in d.local_net.modules()) == 5
    assert d.global_net.fc[1].out_features == d.local_net.fc[1].out_features == 1024
    with torch.no_grad():
        logits = d.eval()(torch.rand(2, 3, 256, 256), torch.rand(2, 3, 128, 128))
    assert logits.shape == (2, 1)
    assert GlobalDiscriminator()(torch.rand(1, 3, 256, 256)).shape == (1, 1024)


@pytest.mark.parametrize("image_size, patch_size", [(64, 32), (32, 16), (48, 24)])
def test_small_discriminators_for_tests_and_demos(image_size, patch_size):
    d = ContextDiscriminator(image_size, patch_size, width=0.125)
    logits = d(torch.rand(3, 3, image_size, image_size), torch.rand(3, 3, patch_size, patch_size))
    assert logits.shape == (3, 1)
    logits.sum().backward()  # logits, not probabilities: gradients flow for BCE-with-logits
    assert d.global_net.convs[0].weight.grad is not None


def test_discriminator_sizes_and_inputs_are_checked():
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 4"):
        GlobalDiscriminator(image_size=30)
    with pytest.raises(ValueError, match="patch_size must be a positive multiple of 4"):
        LocalDiscriminator(patch_size=0)
    with pytest.raises(ValueError, match="patch_size 64 is larger than image_size 32"):
        ContextDiscriminator(32, 64)
    d = ContextDiscriminator(32, 16, 0.125)
    with pytest.raises(ValueError, match=r"expects \(N, 3, 16, 16\) images, got \(2, 3, 32, 32\)"):
        d(torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32))


def test_crop_patches_takes_the_local_box_of_each_image():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = crop_patches(images, [(0, 1, 4, 4), (4, 4, 4, 4)])
    assert torch.equal(patches[0], images[0, :, 0:4, 1:5]) and torch.equal(patches[1], images[1, :, 4:8, 4:8])
    with pytest.raises(ValueError, match="outside the 8x8 image"):
        crop_patches(images, [(0, 0, 4, 4), (5, 5, 4, 4)])
    with pytest.raises(ValueError, match="same size"):
        crop_patches(images, [(0, 0, 4, 4), (0, 0, 2, 2)])


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (31, 17), (6, 2), (33, 64)])
def test_any_size_comes_back_the_same_size(size):
    h, w = size
    net = CompletionNetwork(0.125).eval()
    image = torch.rand(2, 3, h, w)
    mask = torch.zeros(2, 1, h, w)
    mask[..., h // 2 :, : (w + 1) // 2] = 1
    out = net.complete(image, mask, MEAN)
    assert out.shape == image.shape
    assert torch.equal(out[mask.expand_as(out) == 0], image[mask.expand_as(image) == 0])


def test_1000x667_photo_keeps_every_known_pixel_bit_for_bit_through_png(photos):
    # A real photograph of the user's size: tiles of the shipped photos, never resized by us.
    tiles = [photos[i % len(photos)] for i in range(6)]
    image = np.concatenate([np.concatenate(tiles[r * 2 : r * 2 + 2], axis=1) for r in range(2)], axis=0)
    image = np.ascontiguousarray(image[:667, :1000])
    mask = np.zeros((667, 1000), np.uint8)
    mask[300:420, 600:750] = 1
    mask[0:40, 960:1000] = 1  # a hole in the corner too

    net = CompletionNetwork(0.125).eval()
    completed = tensor_to_images(net.complete(images_to_tensor(image), masks_to_tensor(mask), MEAN))[0]
    assert completed.shape == (667, 1000, 3)
    ok, png = cv2.imencode(".png", completed)
    decoded = cv2.imdecode(png, cv2.IMREAD_UNCHANGED)
    known = mask == 0
    assert np.array_equal(decoded[known], image[known])
    assert not np.array_equal(decoded[~known], image[~known])  # the hole was actually filled


def test_the_network_never_sees_what_was_in_the_hole():
    torch.manual_seed(0)
    net = CompletionNetwork(0.125).eval()
    image = torch.rand(1, 3, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 10:24] = 1
    other = image.clone()
    other[mask.expand_as(image).bool()] = torch.rand(int(mask.sum()) * 3)
    assert torch.equal(net.complete(image, mask, MEAN), net.complete(other, mask, MEAN))
    x = prepare_input(image, mask, MEAN)
    assert x.shape == (1, 4, 32, 32) and torch.equal(x[:, 3:], mask)
    assert torch.equal(x[0, :, 10, 12][:3], torch.tensor(MEAN))


def test_uint8_tensor_round_trip_is_exact():
    every_value = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    assert np.array_equal(tensor_to_images(images_to_tensor(every_value))[0], every_value)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        images_to_tensor(np.zeros((4, 4), np.uint8))


def test_a_few_training_steps_reduce_the_hole_mse_on_a_fixed_batch(photos):
    torch.manual_seed(0)
    crops = np.stack([cv2.resize(p, (64, 40), interpolation=cv2.INTER_AREA)[4:36, 16:48] for p in photos[:8]])
    images = images_to_tensor(crops)
    masks = masks_to_tensor(np.stack([rectangle_mask(32, 32, seed=0, key=str(i)).mask for i in range(8)]))
    mean = images.mean(dim=(0, 2, 3)).tolist()
    net = CompletionNetwork(0.125)
    optimizer = torch.optim.Adadelta(net.parameters())  # the paper's optimizer

    def hole_mse() -> torch.Tensor:
        out = net(prepare_input(images, masks, mean))
        return ((out - images).square() * masks).sum() / (masks.sum() * 3)

    with torch.no_grad():
        before = hole_mse().item()
    for _ in range(25):
        optimizer.zero_grad()
        hole_mse().backward()
        optimizer.step()
    with torch.no_grad():
        after = hole_mse().item()
    assert after < 0.6 * before, (before, after)


def test_package_exports_resolve_and_masks_stay_light():
    import subprocess
    import sys

    import model

    for name in model.__all__:
        assert getattr(model, name) is not None, name
    # Mask generation runs in light Ray Data tasks: it must not drag torch into their processes.
    code = "import sys, model.masks, model.postprocess; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
