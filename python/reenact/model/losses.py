"""Losses: L1 reconstruction, VGG-19 perceptual, hinge GAN, feature matching, warp.

`ReenactmentLoss` combines them with the weights of a LossConfig and gives the two training
steps of a GAN:

    losses = ReenactmentLoss(config.loss)
    outputs = reenactor(source_image, source_pncc, driving_pncc)
    g = losses.generator_loss(outputs, driving_image, driving_pncc, discriminator)
    g.total.backward()                             # reaches the generator's parameters only
    d = losses.discriminator_loss(discriminator, outputs["output"].detach(), driving_image,
                                  driving_pncc)
    d.total.backward()

The VGG-19 weights are never downloaded: the perceptual loss reads a user-supplied state dict.
The network is built from the shapes in that file, in torchvision's layer layout, so the real
ImageNet weights and a tiny test file both load.
"""
import collections
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_finite, check_safetensors

__all__ = [
    "LossResult",
    "ReenactmentLoss",
    "VGG19Features",
    "PerceptualLoss",
    "load_state_dict_file",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "feature_matching_loss",
    "warp_loss",
]

LossResult = collections.namedtuple("LossResult", ["total", "terms"])
LossResult.__doc__ = """A weighted total loss (scalar tensor with grad) and its unweighted terms.

terms: dict of name -> detached scalar tensor, for logging (only the terms that are switched on).
"""

# torchvision's vgg19().features up to relu5_1: conv widths, "M" = 2x2 max pool. The module
# indices below (conv at 0, 2, 5, ...; relu after each conv) are exactly torchvision's.
_VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
                 512)
# torchvision module indices of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
_VGG19_TAPS = (1, 6, 11, 20, 29)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_NO_PERCEPTUAL_HINT = "or switch the perceptual loss off (loss.perceptual = 0, --no-perceptual)"


def load_state_dict_file(path):
    """Read a state dict from `.safetensors` or a `torch.save` file, never running pickled code.

    A `torch.save` file is read with `torch.load(weights_only=True)`; a checkpoint dict holding
    the weights under "state_dict" is unwrapped.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file  # optional dependency (safetensors)
        except ImportError:
            raise ImportError(
                f"reading {path} needs the safetensors package (pip install safetensors), or "
                f"save the weights with torch.save instead") from None
        from safetensors import SafetensorError  # optional dependency, as above

        check_safetensors(path, "weights file")  # header against the file size, before any read
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read weights file {path}: {' '.join(str(error).split())}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"could not read {path} as a weights-only torch.save file: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict, got {type(state).__name__}")

    check_finite(state, f"weights file {path}")
    return state


class VGG19Features(nn.Module):
    """torchvision's VGG-19 `features` up to relu5_1, with widths read from a state dict.

    Args:
        state_dict: keys `features.<index>.weight` / `.bias` in torchvision's numbering (other
            keys, e.g. `classifier.*`, are ignored).
        source: where the state dict came from, for error messages.

    Returns (forward): the 5 activations relu1_1..relu5_1 of an ImageNet-normalised input.
    """

    def __init__(self, state_dict, source="state_dict"):
        super().__init__()
        layers = []
        in_channels = 3
        for item in _VGG19_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            index = len(layers)
            weight = state_dict.get(f"features.{index}.weight")
            bias = state_dict.get(f"features.{index}.bias")
            if weight is None or bias is None:
                raise ValueError(
                    f"{source} is not a VGG-19 state dict in torchvision's layout: it lacks "
                    f"features.{index}.weight/bias")
            if weight.dim() != 4 or weight.shape[1:] != (in_channels, 3, 3) or tuple(
                    bias.shape) != (weight.shape[0],):
                raise ValueError(
                    f"{source}: features.{index}.weight must have shape (C, {in_channels}, 3, 3) "
                    f"and its bias (C,), got {tuple(weight.shape)} and {tuple(bias.shape)}")
            conv = nn.Conv2d(in_channels, weight.shape[0], 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(weight.float())
                conv.bias.copy_(bias.float())
            layers += [conv, nn.ReLU()]
            in_channels = weight.shape[0]
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # Frozen feature extractor: stays in eval mode whatever the surrounding model does.
        return super().train(False)

    def forward(self, image):
        """image: (B, 3, H, W) in [-1, 1]."""
        x = ((image + 1) / 2 - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _VGG19_TAPS:
                taps.append(x)
        return taps


class PerceptualLoss(nn.Module):
    """sum_l w_l * L1(VGG_l(output), VGG_l(target)) over relu1_1..relu5_1.

    Args:
        weights_path: the VGG-19 state dict file (see load_state_dict_file).
        layer_weights: 5 weights, relu1_1..relu5_1.
    """

    def __init__(self, weights_path, layer_weights=(1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)):
        super().__init__()
        if weights_path is None:
            raise ValueError(
                "the perceptual loss needs VGG-19 weights: set loss.perceptual_weights_path to a "
                f"torchvision vgg19 state dict file (.pth or .safetensors), {_NO_PERCEPTUAL_HINT}")
        path = pathlib.Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"VGG-19 weights file for the perceptual loss not found: {path}; supply "
                f"torchvision's vgg19 state dict there, {_NO_PERCEPTUAL_HINT}")
        self.vgg = VGG19Features(load_state_dict_file(path), source=str(path))
        self.layer_weights = tuple(float(w) for w in layer_weights)

    def forward(self, output, target):
        """output, target: (B, 3, H, W) in [-1, 1]; gradients flow to `output` only."""
        # One VGG pass over both images: half the kernel launches of two passes.
        batch = output.shape[0]
        features = self.vgg(torch.cat((output, target.detach()), dim=0))
        loss = output.new_zeros((), dtype=torch.float32)
        for weight, feature in zip(self.layer_weights, features):
            if weight:
                loss = loss + weight * F.l1_loss(feature[:batch].float(),
                                                 feature[batch:].detach().float())
        return loss


def hinge_discriminator_loss(real_logits, fake_logits):
    """mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), averaged over the scales."""
    loss = 0
    for real, fake in zip(real_logits, fake_logits):
        loss = loss + F.relu(1 - real.float()).mean() + F.relu(1 + fake.float()).mean()
    return loss / len(real_logits)


def hinge_generator_loss(fake_logits):
    """-mean(D(fake)), averaged over the scales."""
    return sum(-fake.float().mean() for fake in fake_logits) / len(fake_logits)


def feature_matching_loss(fake_features, real_features):
    """L1 between the discriminator activations (logits excluded) of fake and real, averaged
    over the layers and the scales; the real activations are constants."""
    loss = 0
    for fake_scale, real_scale in zip(fake_features, real_features):
        layers = list(zip(fake_scale[:-1], real_scale[:-1]))
        for fake, real in layers:
            loss = loss + F.l1_loss(fake.float(), real.detach().float()) / len(layers)
    return loss / len(fake_features)


def warp_loss(warped_image, driving_image):
    """L1 between the corr_warp-ed source RGB (B, 3, h, w) and the driving frame area-pooled to
    (h, w)."""
    target = F.adaptive_avg_pool2d(driving_image, warped_image.shape[-2:])
    return F.l1_loss(warped_image.float(), target.float())


def _call_with_frozen_parameters(module, *args):
    """module(*args) with every parameter detached: gradients flow to the inputs only.

    A DistributedDataParallel wrapper is bypassed: its forward would expect a gradient for every
    parameter in the following backward pass.
    """
    module = getattr(module, "module", module) if isinstance(
        module, nn.parallel.DistributedDataParallel) else module
    frozen = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, frozen, args)


def _split_batch(features, batch):
    fake = [[f[:batch] for f in scale] for scale in features]
    real = [[f[batch:] for f in scale] for scale in features]
    return fake, real


class ReenactmentLoss(nn.Module):
    """The weighted losses of LossConfig, for the generator and the discriminator steps.

    The discriminator is passed to each call rather than owned, so that a training loop can
    hand in the module it optimises (for the discriminator step, a DDP wrapper; for the
    generator step, the plain module, whose parameters it should not update then).

    Args:
        config: a LossConfig. When `config.perceptual` > 0, the VGG-19 weights file is read
            here, so a missing file fails at construction, before any training step.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.perceptual = (PerceptualLoss(config.perceptual_weights_path,
                                          config.perceptual_layer_weights)
                           if config.perceptual > 0 else None)

    @property
    def needs_discriminator(self):
        """Whether generator_loss uses the discriminator (adversarial or feature matching)."""
        return self.config.adversarial > 0 or self.config.feature_matching > 0

    def generator_loss(self, outputs, driving_image, driving_pncc, discriminator=None):
        """Weighted generator loss.

        Args:
            outputs: the dict returned by Reenactor.forward ("output" and "warped" are used).
            driving_image: (B, 3, H, W) in [-1, 1], the target (self-reenactment).
            driving_pncc: (B, 3, H, W), the discriminator's condition.
            discriminator: a MultiScaleDiscriminator (or its DDP wrapper, which is unwrapped
                here); required when the adversarial or the feature-matching weight is > 0. It
                runs with its parameters detached: gradients reach the generator only, so the
                generator step needs no zeroing or freezing of the discriminator, and no DDP
                gradient synchronisation of the discriminator happens in it.

        Returns:
            LossResult(total, terms) with terms among "reconstruction", "perceptual", "warp",
            "adversarial", "feature_matching".
        """
        config = self.config
        output = outputs["output"]
        if output.shape != driving_image.shape:
            raise ValueError(
                f"driving_image must have the shape of the output {tuple(output.shape)}, got "
                f"{tuple(driving_image.shape)}")
        terms = {}
        weighted = []

        def add(name, weight, value):
            terms[name] = value.detach()
            weighted.append(weight * value)

        if config.reconstruction > 0:
            add("reconstruction", config.reconstruction,
                F.l1_loss(output.float(), driving_image.float()))
        if self.perceptual is not None:
            add("perceptual", config.perceptual, self.perceptual(output, driving_image))
        if config.warp > 0:
            add("warp", config.warp, warp_loss(outputs["warped"], driving_image))
        if self.needs_discriminator:
            if discriminator is None:
                raise ValueError(
                    "discriminator is required when loss.adversarial or loss.feature_matching "
                    "is > 0")
            batch = output.shape[0]
            # Fake and real in one forward pass: the discriminator's instance norms see each
            # sample alone, so this equals two passes, and a DDP-wrapped one runs forward once.
            features = _call_with_frozen_parameters(
                discriminator, torch.cat((output, driving_image.detach()), dim=0),
                torch.cat((driving_pncc, driving_pncc), dim=0))
            fake, real = _split_batch(features, batch)
            if config.adversarial > 0:
                add("adversarial", config.adversarial,
                    hinge_generator_loss([scale[-1] for scale in fake]))
            if config.feature_matching > 0:
                add("feature_matching", config.feature_matching,
                    feature_matching_loss(fake, real))
        if not weighted:
            raise ValueError("every generator loss weight is 0; nothing to train")
        return LossResult(sum(weighted), terms)

    def discriminator_loss(self, discriminator, fake_image, real_image, driving_pncc):
        """Hinge loss of the discriminator.

        Args:
            discriminator: the MultiScaleDiscriminator (or its DDP wrapper).
            fake_image: (B, 3, H, W) generator output; detach it so the generator is untouched.
            real_image: (B, 3, H, W) driving frame.
            driving_pncc: (B, 3, H, W), the condition of both.

        Returns:
            LossResult(total, {"discriminator": total, "real_logit": ..., "fake_logit": ...});
            the mean logits show whether the discriminator is winning.
        """
        if fake_image.shape != real_image.shape:
            raise ValueError(
                f"fake_image and real_image must have the same shape, got "
                f"{tuple(fake_image.shape)} and {tuple(real_image.shape)}")
        batch = fake_image.shape[0]
        features = discriminator(torch.cat((fake_image, real_image), dim=0),
                                 torch.cat((driving_pncc, driving_pncc), dim=0))
        fake, real = _split_batch(features, batch)
        real_logits = [scale[-1] for scale in real]
        fake_logits = [scale[-1] for scale in fake]
        total = hinge_discriminator_loss(real_logits, fake_logits)
        terms = {
            "discriminator": total.detach(),
            "real_logit": torch.stack([r.float().mean() for r in real_logits]).mean().detach(),
            "fake_logit": torch.stack([f.float().mean() for f in fake_logits]).mean().detach(),
        }
        return LossResult(total, terms)
