"""Feature networks of ``reenact eval`` that need user-supplied weights: Inception-v3 (FID) and an
ArcFace-style IResNet (identity similarity).

Trust model: weights are data, never code. A weights file is a ``.safetensors`` file or a
``torch.save`` state dict read with ``torch.load(weights_only=True)``
(:func:`reenact.model.losses.load_state_dict_file`, the loader of the VGG-19 perceptual weights);
nothing is unpickled and no TorchScript or other code is loaded. The architectures are defined
here, and a file must match them key for key and shape for shape, or it is refused with a message
that names the file and the first mismatches.

- :class:`InceptionV3Features`: torchvision's ``inception_v3`` layout (``Conv2d_1a_3x3`` ...
  ``Mixed_7c``; ``AuxLogits.*`` and ``fc.*`` are ignored), 2048-d pooled features of 299x299
  inputs in [-1, 1]. These are the ImageNet weights torchvision ships, not the TF-graph weights of
  the original FID, so FIDs are comparable between runs of this tool, not with published values.
- :class:`IResNet`: insightface's ``arcface_torch`` IResNet layout (``conv1``, ``bn1``, ``prelu``,
  ``layer1..4`` of ``IBasicBlock``, ``bn2``, ``fc``, ``features``); the depth (r18/r34/r50/r100) is
  read from the keys. 512-d embeddings of 112x112 inputs in [-1, 1]. Our face crops are not
  ArcFace's 5-point alignment; the similarity is meaningful for comparing models on one dataset.

Neither network's numerical parity with its reference implementation is tested here: no weights
are available offline. The tests check the wiring (layouts round-trip, refusals, output shapes).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..model.losses import load_state_dict_file


class _ConvBN(nn.Module):
    """torchvision's BasicConv2d: conv (no bias), batch norm (eps 1e-3), ReLU."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _pool_branch(x, conv):
    return conv(F.avg_pool2d(x, 3, stride=1, padding=1))


class _BlockA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _ConvBN(cin, 48, 1), _ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, padding=1)
        self.branch_pool = _ConvBN(cin, pool_features, 1)

    def forward(self, x):
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), double,
                          _pool_branch(x, self.branch_pool)], 1)


class _BlockB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = _ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, 3, stride=2)], 1)


def _seven(cin, cout, vertical):
    """A 1x7 (horizontal) or 7x1 (vertical) same-size convolution."""
    return _ConvBN(cin, cout, (7, 1) if vertical else (1, 7), padding=(3, 0) if vertical else (0, 3))


class _BlockC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = _ConvBN(cin, c7, 1), _seven(c7, c7, False), _seven(c7, 192, True)
        self.branch7x7dbl_1 = _ConvBN(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = _seven(c7, c7, True), _seven(c7, c7, False)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _seven(c7, c7, True), _seven(c7, 192, False)
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x), single, double, _pool_branch(x, self.branch_pool)], 1)


class _BlockD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _ConvBN(cin, 192, 1), _ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = _ConvBN(cin, 192, 1), _seven(192, 192, False)
        self.branch7x7x3_3, self.branch7x7x3_4 = _seven(192, 192, True), _ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        seven = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = layer(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch1x1 = _ConvBN(cin, 320, 1)
        self.branch3x3_1 = _ConvBN(cin, 384, 1)
        self.branch3x3_2a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = _ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBN(cin, 192, 1)

    def forward(self, x):
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(single), self.branch3x3_2b(single),
                          self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
                          _pool_branch(x, self.branch_pool)], 1)


class InceptionV3Features(nn.Module):
    """Inception-v3 up to the global average pool: (B, 3, H, W) in [-1, 1] -> (B, 2048).

    Inputs are resized to 299x299 (bilinear) first.
    """

    input_size = 299
    ignored_prefixes = ("AuxLogits.", "fc.")

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBN(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280), _BlockE(2048)

    def forward(self, images):
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean((2, 3))


class _IBasicBlock(nn.Module):
    """bn -> conv3x3 -> bn -> PReLU -> conv3x3 (stride) -> bn, plus the (downsampled) input."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """ArcFace IResNet: (B, 3, H, W) in [-1, 1] -> (B, 512) embeddings (inputs resized to 112x112).

    Args:
        blocks: IBasicBlocks per stage, e.g. (3, 4, 14, 3) for r50; :meth:`blocks_of` reads them
            from a state dict.
        embedding: embedding size (512 for ArcFace; read from ``fc.weight`` when loading).
    """

    input_size = 112
    widths = (64, 128, 256, 512)
    ignored_prefixes = ()

    def __init__(self, blocks=(3, 4, 14, 3), embedding=512):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        cin = 64
        for stage, (count, width) in enumerate(zip(blocks, self.widths), 1):
            layers = [_IBasicBlock(cin, width, 2)] + [_IBasicBlock(width, width, 1) for _ in range(count - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
            cin = width
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * 7 * 7, embedding)
        self.features = nn.BatchNorm1d(embedding, eps=1e-5)

    @staticmethod
    def blocks_of(state_dict):
        """Blocks per stage of an IResNet state dict (keys ``layer<s>.<k>.``) -> tuple of 4 ints."""
        counts = []
        for stage in range(1, 5):
            indices = {int(key.split(".")[1]) for key in state_dict
                       if key.startswith(f"layer{stage}.") and key.split(".")[1].isdigit()}
            counts.append(max(indices) + 1 if indices else 0)
        return tuple(counts)

    def forward(self, images):
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(self.bn2(x).flatten(1)))


def _load_into(module, state_dict, path):
    """Load a state dict strictly (apart from ``module.ignored_prefixes``); ValueError names the
    file and the first mismatching keys or shapes."""
    state = {k: v for k, v in state_dict.items() if not k.startswith(module.ignored_prefixes)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{label} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("wrong shapes for", wrong)) if keys]
        raise ValueError(f"{path} does not hold {type(module).__name__} weights: {'; '.join(parts)}")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return module.eval()


def load_feature_network(kind, path):
    """``kind`` "inception" or "identity" -> the network with the weights of ``path``, in eval mode.

    Raises FileNotFoundError, ValueError or ImportError with a message naming ``path``.
    """
    state = load_state_dict_file(path)
    if kind == "inception":
        return _load_into(InceptionV3Features(), state, path)
    if kind == "identity":
        blocks = IResNet.blocks_of(state)
        if min(blocks) < 1:
            raise ValueError(f"{path} does not hold IResNet weights: no layer1..layer4 blocks found")
        embedding = state["fc.weight"].shape[0] if state.get("fc.weight", torch.zeros(0)).dim() == 2 else 512
        return _load_into(IResNet(blocks, embedding), state, path)
    raise ValueError(f"unknown feature network {kind!r}")
