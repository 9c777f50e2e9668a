"""Encoders for NAT: a backbone split into named stages, an optional fixed
Sobel front end, and a linear head to ``d`` followed by L2 normalisation.

Architectures (``build_model(arch, ...)``):
  * ``convnet``: 4 conv layers (16-32-64-64, batch norm, ~60k parameters),
    made for 28x28 inputs; the default for Fashion-MNIST.
  * ``alexnet``: AlexNet with batch norm after every conv and FC layer, as in
    the authors' released code (use with ``sobel=True`` and 224x224 inputs).
  * ``resnet18``/``resnet34``/``resnet50``: torchvision ResNets (the stem is
    made CIFAR-style, 3x3 stride 1 and no max pool, when ``small_input``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

__all__ = ["ARCHS", "CONV_STAGES", "Sobel", "Encoder", "build_model"]

ARCHS = ("convnet", "alexnet", "resnet18", "resnet34", "resnet50")
# The convolutional stages of each architecture, in order: what ``--layer all`` probes.
CONV_STAGES = {"convnet": ("conv1", "conv2", "conv3", "conv4"),
               "alexnet": ("conv1", "conv2", "conv3", "conv4", "conv5"),
               **{a: ("layer1", "layer2", "layer3", "layer4") for a in ("resnet18", "resnet34", "resnet50")}}


class Sobel(nn.Module):
    """Fixed (non-trainable) grayscale + Sobel filters.

    Maps Tensor[B, C, H, W] (C = 1 or 3) to Tensor[B, 2, H, W]: horizontal and
    vertical gradients of the grayscale image.
    """

    def __init__(self) -> None:
        super().__init__()
        gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        # Buffers, not parameters: the optimiser never sees them, checkpoints keep them.
        self.register_buffer("weight", torch.stack([gx, gx.t()]).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        return F.conv2d(x, self.weight.to(x.dtype), padding=1)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _convnet(cin: int) -> tuple[list[tuple[str, nn.Module]], int]:
    stages = [
        # Pool early: the 28x28 layers dominate CPU time; conv3/conv4 work on 7x7 maps.
        ("conv1", nn.Sequential(*_conv_bn(cin, 16), nn.MaxPool2d(2))),
        ("conv2", nn.Sequential(*_conv_bn(16, 32), nn.MaxPool2d(2))),
        ("conv3", nn.Sequential(*_conv_bn(32, 64))),
        ("conv4", nn.Sequential(*_conv_bn(64, 64))),
        ("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())),
    ]
    return stages, 64


def _alexnet(cin: int) -> tuple[list[tuple[str, nn.Module]], int]:
    stages = [
        ("conv1", nn.Sequential(*_conv_bn(cin, 96, 11, 4, 2), nn.MaxPool2d(3, 2))),
        ("conv2", nn.Sequential(*_conv_bn(96, 256, 5, 1, 2), nn.MaxPool2d(3, 2))),
        ("conv3", nn.Sequential(*_conv_bn(256, 384))),
        ("conv4", nn.Sequential(*_conv_bn(384, 384))),
        ("conv5", nn.Sequential(*_conv_bn(384, 256), nn.MaxPool2d(3, 2), nn.AdaptiveAvgPool2d(6))),
        ("fc6", nn.Sequential(nn.Flatten(), nn.Linear(256 * 36, 4096, bias=False),
                              nn.BatchNorm1d(4096), nn.ReLU(inplace=True))),
        ("fc7", nn.Sequential(nn.Linear(4096, 4096, bias=False), nn.BatchNorm1d(4096), nn.ReLU(inplace=True))),
    ]
    return stages, 4096


def _resnet(arch: str, cin: int, small_input: bool) -> tuple[list[tuple[str, nn.Module]], int]:
    net = getattr(torchvision.models, arch)(weights=None)
    if small_input:
        conv1 = nn.Conv2d(cin, 64, 3, 1, 1, bias=False)
        stem = nn.Sequential(conv1, net.bn1, net.relu)
    else:
        conv1 = nn.Conv2d(cin, 64, 7, 2, 3, bias=False)
        stem = nn.Sequential(conv1, net.bn1, net.relu, net.maxpool)
    stages = [("stem", stem), ("layer1", net.layer1), ("layer2", net.layer2),
              ("layer3", net.layer3), ("layer4", net.layer4),
              ("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))]
    return stages, net.fc.in_features


class Encoder(nn.Module):
    """Backbone stages, then a linear head to ``dim`` and L2 normalisation.

    Args:
        stages: (name, module) pairs applied in order.
        width: output width of the last stage.
        dim: output dimension (target dimension for NAT, classes for supervised).
        sobel: prepend the fixed :class:`Sobel` layer.
        normalize: L2-normalise the output (NAT); off for supervised logits.
    """

    def __init__(self, stages: list[tuple[str, nn.Module]], width: int, dim: int,
                 sobel: bool = False, normalize: bool = True) -> None:
        super().__init__()
        self.sobel = Sobel() if sobel else None
        self.stages = nn.ModuleDict(stages)
        self.head = nn.Linear(width, dim)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x Tensor[B, C, H, W]. Returns: Tensor[B, dim] (unit rows if ``normalize``)."""
        if self.sobel is not None:
            x = self.sobel(x)
        for stage in self.stages.values():
            x = stage(x)
        x = self.head(x)
        return F.normalize(x.float(), dim=1) if self.normalize else x

    def keep_until(self, layer: str) -> "Encoder":
        """Drop the stages after ``layer`` and the head, in place (returns self): a probe of frozen
        features never runs them. AlexNet's fc6, fc7 and head hold 80% of its weights (218 MB of
        267 MB at d = 2048), which the evaluation then does not keep for each encoder."""
        names = list(self.stages)
        if layer not in names:
            raise ValueError(f"layer should be one of {names}, got {layer!r}")
        for name in names[names.index(layer) + 1:]:
            del self.stages[name]
        self.head = nn.Identity()
        return self

    def stage_outputs(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """The outputs of several stages from one forward pass (it stops after the last one asked for;
        with gradients unless the caller turns them off).

        Args:
            x: Tensor[B, C, H, W] images.
            layers: stage names (see ``self.stages``).

        Returns:
            {layer: Tensor[B, C', H', W'] (or Tensor[B, F] for the fully connected stages)}.
        """
        unknown = [l for l in layers if l not in self.stages]
        if unknown:
            raise ValueError(f"layer should be one of {list(self.stages)}, got {unknown[0]!r}")
        wanted, out = set(layers), {}
        if self.sobel is not None:
            x = self.sobel(x)
        for name, stage in self.stages.items():
            if len(out) == len(wanted):
                break
            x = stage(x)
            if name in wanted:
                out[name] = x
        return out

    def trunk(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """The output of stage ``layer`` (the Sobel front end and the stages up to it; with gradients),
        e.g. Tensor[B, 64, 7, 7] for ``convnet``'s ``conv4`` on 28x28 inputs."""
        return self.stage_outputs(x, [layer])[layer]

    @torch.no_grad()
    def features(self, x: torch.Tensor, layer: str, grid: int = 2) -> torch.Tensor:
        """Frozen features for probing.

        Args:
            x: Tensor[B, C, H, W] images.
            layer: name of the stage whose output is read (e.g. ``conv4``), or
                ``pixels`` for the input itself.
            grid: feature maps are average-pooled to ``grid x grid`` cells (not the pixels).

        Returns:
            Tensor[B, F] float32 features.
        """
        if layer == "pixels":
            return x.flatten(1).float()
        if layer not in self.stages:
            raise ValueError(f"layer should be 'pixels' or one of {list(self.stages)}, got {layer!r}")
        x = self.stage_outputs(x, [layer])[layer]
        if x.dim() == 4:
            x = F.adaptive_avg_pool2d(x, grid)
        return x.flatten(1).float()


def build_model(arch: str, dim: int, in_channels: int = 1, sobel: bool = False,
                small_input: bool = True, normalize: bool = True) -> Encoder:
    """Build an encoder.

    Args:
        arch: one of :data:`ARCHS`.
        dim: output dimension.
        in_channels: image channels (1 grayscale, 3 RGB); ignored with ``sobel``.
        sobel: fixed Sobel front end (2 channels into the backbone).
        small_input: CIFAR-style ResNet stem for small images (28-64 px).
        normalize: L2-normalise outputs.

    Returns:
        An :class:`Encoder`.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch should be one of {ARCHS}, got {arch!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim should be a positive int, got {dim!r}")
    cin = 2 if sobel else in_channels
    if arch == "convnet":
        stages, width = _convnet(cin)
    elif arch == "alexnet":
        stages, width = _alexnet(cin)
    else:
        stages, width = _resnet(arch, cin, small_input)
    return Encoder(stages, width, dim, sobel=sobel, normalize=normalize)
