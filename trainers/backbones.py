"""Encoder backbones for contrastive pretraining: images (B, C, H, W) -> features (B, feature_dim).

Three choices, all without pretrained weights (self-supervised studies must start from scratch):

* ``resnet_small`` (default): a compact four-stage ResNet, one BasicBlock per stage, 256-d output. It is
  small enough to pretrain on 28x28 / 32x32 images on a CPU, which is what most trials of a study run on.
* ``resnet18`` / ``resnet50``: torchvision's ResNets with the classifier removed (512-d / 2048-d).

``cifar_stem`` picks the stem for every backbone: the CIFAR stem (3x3 conv, stride 1, no max-pool) keeps the
full resolution of small images, as in SimCLR's CIFAR variant; the ImageNet stem (7x7 conv, stride 2, then a
3x3 stride-2 max-pool) downsamples 4x first, which is what larger inputs (STL-10, image folders) want.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision import models

BACKBONES: tuple[str, ...] = ("resnet_small", "resnet18", "resnet50")

# Stage widths and strides of resnet_small: the ResNet-18 layout with half the width and one block per
# stage, which keeps a forward+backward pass of a 28x28 batch cheap on a CPU.
_SMALL_WIDTHS: tuple[int, ...] = (32, 64, 128, 256)
_SMALL_STRIDES: tuple[int, ...] = (1, 2, 2, 2)


class BasicBlock(nn.Module):
    """The two-conv residual block of ResNet-18/34: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        # A projection (1x1 conv + BN) only where the identity cannot be added: a change of width or
        # resolution. Elsewhere the identity keeps the block's gradient path clean.
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """The ``resnet_small`` encoder. Attribute names follow torchvision's ResNet (conv1, bn1, maxpool,
    layer1..layer4) so code that inspects or swaps the stem treats all backbones alike."""

    def __init__(self, in_channels: int, *, cifar_stem: bool = True) -> None:
        super().__init__()
        stem_width = _SMALL_WIDTHS[0]
        self.conv1 = _stem_conv(in_channels, stem_width, cifar_stem=cifar_stem)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.Identity() if cifar_stem else nn.MaxPool2d(3, stride=2, padding=1)
        widths_in = (stem_width, *_SMALL_WIDTHS[:-1])
        blocks = [
            BasicBlock(w_in, w_out, stride)
            for w_in, w_out, stride in zip(widths_in, _SMALL_WIDTHS, _SMALL_STRIDES, strict=True)
        ]
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = _SMALL_WIDTHS[-1]
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_backbone(name: str, *, in_channels: int, cifar_stem: bool = True) -> tuple[nn.Module, int]:
    """Build a randomly initialised encoder and return it with its output feature dimension.

    The module maps float images (B, in_channels, H, W) to features (B, feature_dim); any H, W that survive
    the stem's downsampling work because every backbone ends in global average pooling.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels <= 0:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if name == "resnet_small":
        small = SmallResNet(in_channels, cifar_stem=cifar_stem)
        return small, small.feature_dim
    model = models.resnet18(weights=None) if name == "resnet18" else models.resnet50(weights=None)
    feature_dim = model.fc.in_features
    # The classifier head is replaced by the identity: the contrastive method adds its own projection head
    # and the linear probe its own classifier, both on these pooled features.
    model.fc = nn.Identity()
    model.conv1 = _stem_conv(in_channels, model.conv1.out_channels, cifar_stem=cifar_stem)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if cifar_stem:
        model.maxpool = nn.Identity()
    return model, feature_dim


def _stem_conv(in_channels: int, out_channels: int, *, cifar_stem: bool) -> nn.Conv2d:
    """The first convolution: 3x3 stride 1 for small images, torchvision's 7x7 stride 2 otherwise."""
    if cifar_stem:
        return nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False)
    return nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False)


def _init_weights(module: nn.Module) -> None:
    """torchvision's ResNet initialisation (He-normal convs, unit BN), so resnet_small trains like its
    larger siblings and comparisons across backbones are not confounded by initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
