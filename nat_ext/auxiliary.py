"""Self-supervision added to NAT (issue 19): a rotation-prediction head, the KoLeo regulariser and
multi-crop's small local crops. Each is an option of ``nat-train`` whose default (weight 0, no local
crop) builds nothing and computes nothing, so a run with the defaults is the paper's NAT bit for bit.

* ``--rotation-loss W`` (as MMDC adds rotation prediction to noise-as-targets alignment): a copy of (a
  fraction of) each batch's first view, image ``i`` rotated by ``(i mod 4) x 90`` degrees, is passed
  through the encoder up to its last convolutional stage, globally average-pooled, and a linear
  :class:`RotationHead` predicts the rotation; its cross-entropy, weighted by ``W``, is added to the loss.
* ``--koleo W`` (DINOv2's KoLeo): ``-mean_i log(min_j ||f_i - f_j||)`` over each view's L2-normalised
  outputs, per process (:func:`koleo_loss`), weighted by ``W``.
* ``--crops G,L`` (SwAV's multi-crop): ``G`` global views (``--views``) and ``L`` local crops per image,
  side ``round(0.43 S)`` (SwAV's 96/224), cropped and resized on the device (:func:`local_crops`). The
  local crops regress to the targets the step's alignment left their image holding; they never
  take part in a reassignment.

The encoder and the head run inside one module, :class:`AuxNet`, so a multi-process run wraps both
in one ``DistributedDataParallel`` (one forward per step, every parameter's gradient all-reduced).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config, SettingError, parse_crops
from .data import batch_augment
from .models import Encoder

__all__ = ["LOCAL_SIDE", "LOCAL_SCALE", "parse_crops", "resolve_crops", "local_count", "local_side",
           "local_crops", "rotate_batch", "koleo_loss", "stage_width", "RotationHead", "AuxNet"]

LOCAL_SIDE = 96 / 224  # a local crop's side over a global crop's (SwAV)
LOCAL_SCALE = (0.1, 0.4)  # area of a local crop, as a fraction of its source image


def resolve_crops(cfg: Config) -> Config:
    """The run's settings with ``--crops`` folded in: ``--views`` becomes G (``--crops`` wins over the
    default ``--views 1``; a ``--views`` that names another count is refused).

    Args:
        cfg: settings as parsed; ``crops`` empty means ``--crops VIEWS,0``.

    Returns:
        ``cfg`` itself when ``crops`` is empty, else a copy with ``views = G``.
    """
    if not cfg.crops:
        return cfg
    g, _ = parse_crops(cfg.crops)
    if cfg.views != 1 and cfg.views != g:
        raise SettingError(f"--crops {cfg.crops} sets {g} global view(s) but --views is {cfg.views}: "
                         "give one of them (--views V means --crops V,0)")
    return dataclasses.replace(cfg, views=g)


def local_count(cfg: Config) -> int:
    """L, the local crops per image of ``--crops G,L`` (0 without ``--crops``)."""
    return parse_crops(cfg.crops)[1] if cfg.crops else 0


def local_side(image_size: int) -> int:
    """A local crop's side in pixels for global crops of ``image_size`` (12 for Fashion-MNIST's 28)."""
    return max(1, round(LOCAL_SIDE * image_size))


def local_crops(x: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` random small crops of each image, flipped at random, resized to :func:`local_side`.

    One batched ``grid_sample`` on ``x``'s device (:func:`nat_ext.data.batch_augment` with the
    local scale and output size).

    Args:
        x: Tensor[b, C, S, S] the source images (Fashion-MNIST: the raw batch; image folders and
            synthetic data: the first global view, finished on the device).
        count: L, crops per image.
        generator: on ``x``'s device (the run's augmentation generator).

    Returns:
        Tensor[count * b, C, s, s], crop-major (row ``k b + i`` is a crop of image ``i``),
        ``s = local_side(S)``.
    """
    s = local_side(x.shape[-1])
    return batch_augment(x.repeat(count, 1, 1, 1), generator, scale=LOCAL_SCALE, size=s)


def rotate_batch(x: torch.Tensor, fraction: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A rotated copy of the first ``ceil(fraction b)`` images: image ``i`` by ``(i mod 4) x 90`` degrees.

    The batch is in random order, so the four rotations are balanced and unrelated to the content;
    the copy draws nothing from any generator and needs no host sync.

    Args:
        x: Tensor[b, C, S, S] square images.
        fraction: share of the batch to rotate, in (0, 1].

    Returns:
        (Tensor[m, C, S, S] rotated images grouped by rotation, int64 Tensor[m] rotation labels 0-3).
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"x should hold square images, got {tuple(x.shape)}")
    m = max(1, math.ceil(fraction * x.shape[0]))
    parts = [torch.rot90(x[r:m:4], r, dims=(2, 3)) for r in range(4)]
    labels = torch.cat([torch.full((p.shape[0],), r, dtype=torch.int64, device=x.device)
                        for r, p in enumerate(parts)])
    return torch.cat(parts), labels


def koleo_loss(feats: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The Kozachenko-Leonenko regulariser (DINOv2): ``-mean_i log(||f_i - f_nn(i)|| + eps)``.

    The features are L2-normalised first; ``nn(i)`` is the nearest other row (largest cosine).
    Minimising it spreads the batch's features apart.

    Args:
        feats: Tensor[b, d], b >= 2.
        eps: added to each distance (a duplicate row gives ``-log(eps)``, not infinity).

    Returns:
        Tensor[] float32.
    """
    if feats.dim() != 2 or feats.shape[0] < 2:
        raise ValueError(f"feats should be Tensor[b, d] with b >= 2, got {tuple(feats.shape)}")
    f = F.normalize(feats.float(), dim=1)
    with torch.no_grad():
        cos = f @ f.t()
        cos.fill_diagonal_(-2.0)
        nearest = cos.argmax(dim=1)
    dist = (f - f.index_select(0, nearest)).norm(dim=1)
    return -torch.log(dist + eps).mean()


def stage_width(encoder: Encoder, layer: str) -> int:
    """Channels out of the encoder's stage ``layer`` (its last batch norm or convolution)."""
    width = 0
    for name, stage in encoder.stages.items():
        for m in stage.modules():
            if isinstance(m, nn.BatchNorm2d):
                width = m.num_features
            elif isinstance(m, nn.Conv2d):
                width = m.out_channels
        if name == layer:
            return width
    raise ValueError(f"layer should be one of {list(encoder.stages)}, got {layer!r}")


class PooledLinear(nn.Module):
    """A linear classifier on the globally pooled output of a conv stage (the heads of the terms).

    Args:
        width: channels of that stage (:func:`stage_width`).
        outputs: classes.
    """

    def __init__(self, width: int, outputs: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, outputs)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Args: maps Tensor[m, width, h, w]. Returns: Tensor[m, outputs] logits."""
        return self.fc(F.adaptive_avg_pool2d(maps, 1).flatten(1))


class RotationHead(PooledLinear):
    """The 4-way rotation classifier (:class:`PooledLinear` with 4 outputs)."""

    def __init__(self, width: int) -> None:
        super().__init__(width, 4)


class AuxNet(nn.Module):
    """The encoder and the terms' heads in one module: one (DDP) forward per step, so DDP all-reduces
    the gradients of both.

    Args:
        encoder: the trained :class:`nat_ext.models.Encoder`.
        forward: what computes the encoder's outputs (the encoder, or its ``torch.compile``).
        heads: each head term's head (:mod:`nat_ext.terms`), by name; each reads the pooled output
            of ``layer`` for its own images.
        layer: the stage whose output the heads read (the last conv stage).
    """

    def __init__(self, encoder: Encoder, forward: nn.Module, heads: dict[str, nn.Module], layer: str) -> None:
        super().__init__()
        self.encoder, self.forward_model, self.layer = encoder, forward, layer
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: torch.Tensor, local: torch.Tensor | None = None,
                head_inputs: dict[str, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Args:
            x: Tensor[V b, C, S, S] the global views.
            local: Tensor[L b, C, s, s] local crops, or None.
            head_inputs: images for each head, by name (e.g. the rotated copy, Tensor[m, C, S, S]).

        Returns:
            (Tensor[V b, dim] outputs, Tensor[L b, dim] local outputs or None, each head's logits by name).
        """
        out = self.forward_model(x)
        out_local = self.forward_model(local) if local is not None else None
        logits = {name: self.heads[name](self.encoder.trunk(images, self.layer))
                  for name, images in (head_inputs or {}).items()}
        return out, out_local, logits
