"""Losses of reenact.model: hinge GAN, feature matching, warp, the VGG-19 perceptual loss and its
weights file, and the generator/discriminator steps of ReenactmentLoss."""
import pickle

import pytest
import torch
import torch.nn.functional as F

from model_fixtures import single_thread, synthetic_batch  # noqa: F401 (autouse fixture)
from reenact.model import (
    LossConfig,
    PerceptualLoss,
    ReenactmentLoss,
    Reenactor,
    ReenactorConfig,
    build_discriminator,
)
from reenact.model.losses import (
    VGG19Features,
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    load_state_dict_file,
    warp_loss,
)

# torchvision's vgg19().features indices of the convolutions up to relu5_1.
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28)
TINY_WIDTHS = (4, 4, 6, 6, 8, 8, 8, 8, 8, 8, 8, 8, 8)


def tiny_vgg_state_dict(seed=0):
    """A VGG-19 state dict in torchvision's layout with tiny widths (plus a classifier key that
    the loader must ignore)."""
    generator = torch.Generator().manual_seed(seed)
    state, in_channels = {}, 3
    for index, width in zip(TORCHVISION_CONV_INDICES, TINY_WIDTHS):
        state[f"features.{index}.weight"] = torch.randn(width, in_channels, 3, 3,
                                                        generator=generator) * 0.3
        state[f"features.{index}.bias"] = torch.randn(width, generator=generator) * 0.1
        in_channels = width
    state["classifier.0.weight"] = torch.zeros(2, 2)
    return state


@pytest.fixture
def vgg_file(tmp_path):
    path = tmp_path / "vgg19_tiny.pth"
    torch.save(tiny_vgg_state_dict(), path)
    return path


def test_hinge_losses():
    high, low = [torch.full((2, 1, 3, 3), 2.0)], [torch.full((2, 1, 3, 3), -2.0)]
    zero = [torch.zeros(2, 1, 3, 3)]
    assert hinge_discriminator_loss(high, low) == 0  # both beyond the margin
    assert hinge_discriminator_loss(zero, zero) == 2
    assert hinge_discriminator_loss(low, high) == 6
    assert hinge_generator_loss(high + low) == 0
    assert hinge_generator_loss(low) == 2


def test_feature_matching_ignores_logits_and_real_gradients():
    real = [[torch.ones(1, 2, 4, 4), torch.zeros(1, 1, 2, 2)]]
    fake = [[torch.ones(1, 2, 4, 4), torch.full((1, 1, 2, 2), 5.0)]]
    assert feature_matching_loss(fake, real) == 0
    fake_feature = torch.full((1, 2, 4, 4), 3.0, requires_grad=True)
    real_feature = torch.ones(1, 2, 4, 4, requires_grad=True)
    loss = feature_matching_loss([[fake_feature, fake[0][1]]], [[real_feature, real[0][1]]])
    assert loss == 2
    loss.backward()
    assert fake_feature.grad.abs().max() > 0 and real_feature.grad is None


def test_warp_loss_compares_with_the_pooled_driving_frame():
    driving = torch.rand(2, 3, 16, 16) * 2 - 1
    pooled = F.avg_pool2d(driving, 4)
    assert warp_loss(pooled, driving) < 1e-6
    assert torch.isclose(warp_loss(pooled + 0.25, driving), torch.tensor(0.25))


def test_perceptual_loss_needs_a_weights_path():
    with pytest.raises(ValueError, match="perceptual_weights_path.*--no-perceptual"):
        PerceptualLoss(None)
    with pytest.raises(ValueError, match="perceptual_weights_path"):
        ReenactmentLoss(LossConfig(perceptual=1.0))


def test_perceptual_loss_names_the_missing_file(tmp_path):
    missing = tmp_path / "vgg19-dcbb9e9d.pth"
    with pytest.raises(FileNotFoundError, match="vgg19-dcbb9e9d.pth.*--no-perceptual"):
        ReenactmentLoss(LossConfig(perceptual=1.0, perceptual_weights_path=str(missing)))
    # Switched off, the file is never looked at.
    assert ReenactmentLoss(LossConfig(perceptual=0.0, perceptual_weights_path=str(missing)))


def test_perceptual_loss_with_a_tiny_weights_file(vgg_file):
    loss = PerceptualLoss(vgg_file)
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(target, target) == 0
    output = (target + 0.3 * torch.randn(2, 3, 32, 32)).clamp(-1, 1).requires_grad_()
    value = loss(output, target)
    assert torch.isfinite(value) and value > 0
    value.backward()
    assert output.grad.abs().max() > 0
    assert all(p.grad is None for p in loss.parameters())
    # The frozen VGG stays in eval mode inside a model switched to training.
    assert not loss.train().vgg.training


def test_vgg_follows_torchvision_layout(vgg_file):
    state = tiny_vgg_state_dict()
    vgg = VGG19Features(load_state_dict_file(vgg_file))
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    taps = vgg(image)
    assert [t.shape[1] for t in taps] == [4, 6, 8, 8, 8]
    assert [t.shape[-1] for t in taps] == [32, 16, 8, 4, 2]

    def conv(x, index):
        return F.relu(F.conv2d(x, state[f"features.{index}.weight"],
                               state[f"features.{index}.bias"], padding=1))

    x = (image + 1) / 2
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    relu1_1 = conv(x, 0)
    relu2_1 = conv(F.max_pool2d(conv(relu1_1, 2), 2), 5)
    torch.testing.assert_close(taps[0], relu1_1)
    torch.testing.assert_close(taps[1], relu2_1)


def test_vgg_rejects_a_wrong_layout(tmp_path):
    state = tiny_vgg_state_dict()
    del state["features.10.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="features.10.weight"):
        PerceptualLoss(path)
    state = tiny_vgg_state_dict()
    state["features.2.weight"] = torch.zeros(4, 5, 3, 3)
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"features.2.weight must have shape \(C, 4, 3, 3\)"):
        PerceptualLoss(path)


class _RunsCodeWhenUnpickled:
    executed = False

    def __reduce__(self):
        return (_mark_executed, ())


def _mark_executed():
    _RunsCodeWhenUnpickled.executed = True
    return {}


def test_weights_loading_never_runs_pickled_code(tmp_path):
    path = tmp_path / "malicious.pth"
    with open(path, "wb") as f:
        pickle.dump(_RunsCodeWhenUnpickled(), f, protocol=2)
    torch.save({"features.0.weight": _RunsCodeWhenUnpickled()}, tmp_path / "malicious2.pth")
    for name in ("malicious.pth", "malicious2.pth"):
        with pytest.raises(ValueError, match=name):
            load_state_dict_file(tmp_path / name)
    assert not _RunsCodeWhenUnpickled.executed


def test_safetensors_weights(tmp_path):
    path = tmp_path / "vgg19.safetensors"
    try:
        from safetensors.torch import save_file
    except ImportError:
        path.write_bytes(b"")
        with pytest.raises(ImportError, match="safetensors"):
            load_state_dict_file(path)
        return
    state = tiny_vgg_state_dict()
    save_file(state, str(path))
    loaded = load_state_dict_file(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    config = ReenactorConfig.small(64)
    generator = Reenactor(config.model)
    discriminator = build_discriminator(config.model)
    batch = synthetic_batch(2, 64, seed=4)
    return config, generator, discriminator, batch


def test_generator_and_discriminator_steps(model_and_batch, vgg_file):
    config, generator, discriminator, batch = model_and_batch
    loss_config = LossConfig(**{**vars(config.loss), "perceptual": 2.0,
                                "perceptual_weights_path": str(vgg_file)})
    losses = ReenactmentLoss(loss_config)
    generator.zero_grad()
    discriminator.zero_grad()
    outputs = generator(batch["source_image"], batch["source_pncc"], batch["driving_pncc"])
    g = losses.generator_loss(outputs, batch["driving_image"], batch["driving_pncc"],
                              discriminator)
    assert set(g.terms) == {"reconstruction", "perceptual", "warp", "adversarial",
                            "feature_matching"}
    assert all(torch.isfinite(v) and not v.requires_grad for v in g.terms.values())
    expected = sum(getattr(loss_config, name) * value for name, value in g.terms.items())
    torch.testing.assert_close(g.total.detach(), expected)
    g.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in generator.parameters())
    # The generator step leaves the discriminator's parameters alone.
    assert all(p.grad is None for p in discriminator.parameters())

    generator.zero_grad()
    discriminator.zero_grad()
    d = losses.discriminator_loss(discriminator, outputs["output"].detach(),
                                  batch["driving_image"], batch["driving_pncc"])
    assert set(d.terms) == {"discriminator", "real_logit", "fake_logit"}
    assert torch.isfinite(d.total) and d.total > 0
    d.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in discriminator.parameters())
    assert all(p.grad is None for p in generator.parameters())


def test_generator_loss_without_discriminator(model_and_batch):
    config, generator, _, batch = model_and_batch
    with torch.no_grad():
        outputs = generator(batch["source_image"], batch["source_pncc"], batch["driving_pncc"])
    with pytest.raises(ValueError, match="discriminator is required"):
        ReenactmentLoss(config.loss).generator_loss(outputs, batch["driving_image"],
                                                    batch["driving_pncc"])
    no_gan = LossConfig(perceptual=0.0, adversarial=0.0, feature_matching=0.0)
    result = ReenactmentLoss(no_gan).generator_loss(outputs, batch["driving_image"],
                                                    batch["driving_pncc"])
    assert set(result.terms) == {"reconstruction", "warp"}
    with pytest.raises(ValueError, match="driving_image"):
        ReenactmentLoss(no_gan).generator_loss(outputs, batch["driving_image"][:, :, :32],
                                               batch["driving_pncc"])
    all_off = LossConfig(reconstruction=0.0, perceptual=0.0, adversarial=0.0,
                         feature_matching=0.0, warp=0.0)
    with pytest.raises(ValueError, match="every generator loss weight is 0"):
        ReenactmentLoss(all_off).generator_loss(outputs, batch["driving_image"],
                                                batch["driving_pncc"])


def test_adversarial_gradient_reaches_the_generator_only(model_and_batch):
    config, generator, discriminator, batch = model_and_batch
    generator.zero_grad()
    discriminator.zero_grad()
    outputs = generator(batch["source_image"], batch["source_pncc"], batch["driving_pncc"])
    adversarial_only = LossConfig(reconstruction=0.0, perceptual=0.0, feature_matching=0.0,
                                  warp=0.0, adversarial=1.0)
    result = ReenactmentLoss(adversarial_only).generator_loss(
        outputs, batch["driving_image"], batch["driving_pncc"], discriminator)
    assert set(result.terms) == {"adversarial"}
    result.total.backward()
    assert generator.decoder.to_rgb.weight.grad.abs().max() > 0
    assert all(p.grad is None for p in discriminator.parameters())


def test_distributed_discriminator_in_both_steps(model_and_batch, tmp_path):
    # The same DDP-wrapped discriminator goes to both helpers, twice: DDP raises on the second
    # iteration if a forward pass left it waiting for gradients that never came.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    config, generator, discriminator, batch = model_and_batch
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        wrapped = DistributedDataParallel(discriminator)
        losses = ReenactmentLoss(config.loss)
        for _ in range(2):
            generator.zero_grad()
            wrapped.zero_grad()
            outputs = generator(batch["source_image"], batch["source_pncc"],
                                batch["driving_pncc"])
            losses.generator_loss(outputs, batch["driving_image"], batch["driving_pncc"],
                                  wrapped).total.backward()
            assert all(p.grad is None for p in discriminator.parameters())
            losses.discriminator_loss(wrapped, outputs["output"].detach(),
                                      batch["driving_image"],
                                      batch["driving_pncc"]).total.backward()
            assert all(p.grad is not None for p in discriminator.parameters())
    finally:
        dist.destroy_process_group()
