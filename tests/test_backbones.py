"""Tests for trainers.backbones: output shapes, stems, gradient flow and argument errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainers.backbones import BACKBONES, BasicBlock, build_backbone

EXPECTED_DIMS = {"resnet_small": 256, "resnet18": 512, "resnet50": 2048}


def test_backbones_constant_lists_every_buildable_name() -> None:
    assert set(BACKBONES) == set(EXPECTED_DIMS)
    assert BACKBONES[0] == "resnet_small"  # the CPU-friendly default comes first


@pytest.mark.parametrize("name", ["resnet_small", "resnet18"])
@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32)])
def test_output_shape_and_feature_dim(name: str, shape: tuple[int, int, int, int]) -> None:
    torch.manual_seed(0)
    model, dim = build_backbone(name, in_channels=shape[1])
    assert dim == EXPECTED_DIMS[name]
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_resnet50_single_small_forward() -> None:
    torch.manual_seed(0)
    model, dim = build_backbone("resnet50", in_channels=1)
    assert dim == 2048
    model.eval()  # a batch of one would break BatchNorm's training statistics
    with torch.no_grad():
        out = model(torch.randn(1, 1, 28, 28))
    assert out.shape == (1, 2048)


@pytest.mark.parametrize("name", ["resnet_small", "resnet18"])
def test_imagenet_stem_accepts_larger_images(name: str) -> None:
    model, dim = build_backbone(name, in_channels=3, cifar_stem=False)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, dim)


@pytest.mark.parametrize("name", BACKBONES)
def test_cifar_stem_changes_first_conv_and_maxpool(name: str) -> None:
    cifar, _ = build_backbone(name, in_channels=3, cifar_stem=True)
    imagenet, _ = build_backbone(name, in_channels=3, cifar_stem=False)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_first_conv_takes_in_channels(name: str, in_channels: int) -> None:
    model, _ = build_backbone(name, in_channels=in_channels)
    assert model.conv1.in_channels == in_channels


@pytest.mark.parametrize("name", ["resnet_small", "resnet18"])
def test_gradient_reaches_first_conv(name: str) -> None:
    torch.manual_seed(0)
    model, _ = build_backbone(name, in_channels=1)
    model(torch.randn(2, 1, 28, 28)).pow(2).mean().backward()
    grad = model.conv1.weight.grad
    assert grad is not None
    assert grad.abs().sum() > 0


def test_resnet_small_has_one_block_per_stage_with_specified_widths() -> None:
    model, _ = build_backbone("resnet_small", in_channels=1)
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert all(isinstance(stage, BasicBlock) for stage in stages)
    assert [stage.conv2.out_channels for stage in stages] == [32, 64, 128, 256]
    assert [stage.conv1.stride for stage in stages] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert model.conv1.out_channels == 32


def test_basic_block_uses_projection_only_when_shape_changes() -> None:
    same = BasicBlock(32, 32, stride=1)
    assert isinstance(same.shortcut, nn.Identity)
    wider = BasicBlock(32, 64, stride=2)
    assert isinstance(wider.shortcut, nn.Sequential)
    assert wider(torch.randn(2, 32, 8, 8)).shape == (2, 64, 4, 4)


def test_unknown_backbone_names_value_and_choices() -> None:
    with pytest.raises(ValueError, match=r"backbone must be one of \(.*resnet_small.*\), got 'vit'"):
        build_backbone("vit", in_channels=3)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_bad_in_channels_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        build_backbone("resnet_small", in_channels=bad)  # type: ignore[arg-type]
