"""The objectives of a training step, one term each: its weight, its head, its inputs, its loss and
its statistics. The loop forwards the batch once (the global views, NAT's local crops, then each
head's images) and sums the weighted terms, as DINOv2's ``SSLMetaArch`` does: a new objective adds
a term here, not a branch in the loop.

Terms, in the order their losses are added (the order of the sum is part of a run's bits):

* :class:`NatTerm` (weight 1): on reassigning steps the batch's images share out their targets
  anew (:func:`nat_ext.reassign.align_batch`), then the mean squared distance of each view (and
  local crop) to its targets.
* :class:`SupervisedTerm` (``--objective supervised``): cross-entropy on the labels.
* :class:`RotationTerm` (``--rotation-loss W``): a rotated copy of the first view through the trunk
  and a 4-way head.
* :class:`KoleoTerm` (``--koleo W``): the KoLeo regulariser on each view's outputs.
* :class:`LabelTerm` (``--label-fraction`` or ``--label-file``, weight ``--label-loss``): cross-entropy
  of a linear classifier head on the labelled images drawn into the step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .auxiliary import PooledLinear, RotationHead, koleo_loss, local_crops, rotate_batch
from .config import Config
from .reassign import align_batch
from .run import EpochStats
from .state import Assignment
from .targets import Targets

__all__ = ["Batch", "Term", "NatTerm", "SupervisedTerm", "RotationTerm", "KoleoTerm", "LabelTerm", "build_terms", "total_loss", "nat_loss"]


@dataclass
class Batch:
    """One step's images and what the forward made of them.

    Attributes:
        raw: Tensor[b, ...] the batch as loaded, on the device.
        x: Tensor[V b, C, S, S] the global views, view-major, ready for the encoder.
        y: Tensor[b] labels. idx: Tensor[b] image indices.
        views: V.
        outputs: Tensor[V b, dim] the encoder's outputs of ``x`` (after the forward).
        local: Tensor[L b, dim] the outputs of NAT's local crops, or None.
        head_inputs: each head term's (images, labels) for the forward.
        logits: each head term's logits (after the forward).
        labelled: (Tensor[l, C, S, S] labelled images, Tensor[l] their labels) drawn into the step, or None.
    """
    raw: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    views: int
    outputs: torch.Tensor | None = None
    local: torch.Tensor | None = None
    head_inputs: dict = field(default_factory=dict)
    logits: dict = field(default_factory=dict)
    labelled: tuple | None = None

    @property
    def size(self) -> int:
        return self.idx.numel()

    def view_outputs(self) -> list[torch.Tensor]:
        """One Tensor[b, dim] of outputs per global view."""
        return list(self.outputs.chunk(self.views))


class Term:
    """One weighted objective. ``head`` (or None) is a module that reads the pooled last conv stage of
    the images :meth:`inputs` gives; the loop runs it inside the (DDP) forward."""
    name = ""
    weight = 1.0
    head: nn.Module | None = None

    def start_epoch(self, epoch: int, reassigning: bool, scope: str | None = None) -> None:
        """Called before each epoch's first step; ``scope`` is what the epoch reassigns in when it does
        (``--reassign-scope``, or batch where the dataset-wide solve fell back); None: the setting's."""

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(images for the head, their labels), or None for a term without a head."""
        return None

    def loss(self, batch: Batch, stats: EpochStats) -> torch.Tensor:
        """The term's unweighted loss, Tensor[] float32; records its statistics in ``stats``."""
        raise NotImplementedError


def nat_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """NAT's loss: the batch mean of ``||f_i - t_i||^2``, averaged over the pairs.

    Args:
        pairs: (Tensor[b, d] outputs, Tensor[b, d] their targets), one pair per global view and local crop.

    Returns:
        Tensor[] float32.
    """
    loss = sum((v.float() - t).pow(2).sum(dim=1).mean() for v, t in pairs)
    return loss / len(pairs)


class NatTerm(Term):
    """NAT: align the batch with the targets it holds (on reassigning epochs of batch scope), then
    regress every view to its targets and every local crop to the targets its image holds after the
    step.

    Args:
        cfg: the run's settings (``align``, ``views``, ``reassign_scope``...).
        assignment, targets: the run's permutation and targets.
        world: number of processes.
        n_local: local crops per image (``--crops G,L``), cropped with ``generator``.
        crops_from_raw: crop the local crops from the batch as loaded (in-memory data, augmented on
            the device) instead of from the first global view.
    """
    name = "nat"

    def __init__(self, cfg: Config, assignment: Assignment, targets: Targets, world: int, n_local: int = 0,
                 generator: torch.Generator | None = None, crops_from_raw: bool = False) -> None:
        self.cfg, self.assignment, self.targets, self.world = cfg, assignment, targets, world
        self.n_local, self.generator, self.per_batch = n_local, generator, False
        self.crops_from_raw = crops_from_raw  # in-memory data: crop the raw batch, else the first view

    def start_epoch(self, epoch: int, reassigning: bool, scope: str | None = None) -> None:
        self.per_batch = reassigning and (scope or self.cfg.reassign_scope) == "batch"

    def local_crops(self, batch: Batch) -> torch.Tensor | None:
        """Tensor[L b, C, s, s] the batch's local crops for the encoder, or None without ``--crops``."""
        if not self.n_local:
            return None
        return local_crops(batch.raw if self.crops_from_raw else batch.x[:batch.size], self.n_local,
                           self.generator)

    def loss(self, batch: Batch, stats: EpochStats) -> torch.Tensor:
        views, idx = batch.view_outputs(), batch.idx
        if self.per_batch:  # reassign: the batch's images share out their targets anew
            t0 = time.perf_counter()
            loss_rows, changed = align_batch(self.cfg, self.assignment, self.targets, idx, views, self.world)
            stats.changed += changed
            stats.assign_seconds += time.perf_counter() - t0
        else:
            loss_rows = [self.targets.rows(self.assignment.targets_of(idx))] * len(views)
        pairs = list(zip(views, loss_rows))
        if batch.local is not None:
            held = self.targets.rows(self.assignment.targets_of(idx))
            pairs += [(v, held) for v in batch.local.chunk(self.n_local)]
        return nat_loss(pairs)


class SupervisedTerm(Term):
    """The supervised baseline: cross-entropy of the encoder's class logits on the labels."""
    name = "supervised"

    def loss(self, batch: Batch, stats: EpochStats) -> torch.Tensor:
        return F.cross_entropy(batch.outputs.float(), batch.y)


class RotationTerm(Term):
    """Rotation prediction (MMDC): image i of the first view rotated by (i mod 4) x 90 degrees, a
    linear 4-way head on the pooled last conv stage.

    Args:
        weight: ``--rotation-loss``. fraction: ``--rotation-fraction``. width: the stage's channels.
    """
    name = "rotation"

    def __init__(self, weight: float, fraction: float, width: int) -> None:
        self.weight, self.fraction, self.head = weight, fraction, RotationHead(width)

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return rotate_batch(batch.x[:batch.size], self.fraction)

    def loss(self, batch: Batch, stats: EpochStats) -> torch.Tensor:
        logits, labels = batch.logits[self.name], batch.head_inputs[self.name][1]
        loss = F.cross_entropy(logits.float(), labels)
        stats.add_aux("rotation_loss", loss, batch.size)
        stats.add_aux("rotation_acc", (logits.argmax(1) == labels).double().mean(), batch.size)
        return loss


class KoleoTerm(Term):
    """KoLeo (DINOv2) on each view's outputs, averaged over the views. Args: weight: ``--koleo``."""
    name = "koleo"

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def loss(self, batch: Batch, stats: EpochStats) -> torch.Tensor:
        views = batch.view_outputs()
        koleo = sum(koleo_loss(v) for v in views) / len(views)
        stats.add_aux("koleo", koleo, batch.size)
        return koleo


class LabelTerm(Term):
    """Semi-supervised NAT: a linear classifier head on the pooled last conv stage of the labelled
    images drawn into the step (:mod:`nat_ext.labels`), cross-entropy on their labels.

    Args:
        weight: ``--label-loss``. width: the stage's channels. classes: the data set's classes.
    """
    name = "labels"

    def __init__(self, weight: float, width: int, classes: int) -> None:
        self.weight, self.head = weight, PooledLinear(width, classes)

    def inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return batch.labelled

    def loss(self, batch: Batch, stats: EpochStats) -> torch.Tensor:
        logits, labels = batch.logits[self.name], batch.labelled[1]
        loss = F.cross_entropy(logits.float(), labels)
        stats.add_aux("label_loss", loss, batch.size)
        stats.add_aux("label_acc", (logits.argmax(1) == labels).double().mean(), batch.size)
        return loss


def build_terms(cfg: Config, assignment: Assignment | None, targets: Targets | None, world: int, n_local: int,
                generator: torch.Generator, stage_width: int, crops_from_raw: bool, classes: int = 0) -> list[Term]:
    """The run's terms, in the order of the sum; a term of weight 0 is not built (nothing computed).

    Args:
        cfg: the run's settings.
        assignment, targets: NAT's state (None for ``--objective supervised``).
        world: number of processes.
        n_local: NAT's local crops per image.
        generator: the augmentation generator (local crops).
        stage_width: channels of the last conv stage (the heads' input).
        crops_from_raw: see :class:`NatTerm`.
        classes: the data set's classes, for the label head (0: no labels).
    """
    if cfg.objective != "nat":
        return [SupervisedTerm()]
    terms: list[Term] = []
    if cfg.nat_weight > 0:
        terms.append(NatTerm(cfg, assignment, targets, world, n_local, generator, crops_from_raw))
        terms[-1].weight = cfg.nat_weight
    if cfg.rotation_loss > 0:
        terms.append(RotationTerm(cfg.rotation_loss, cfg.rotation_fraction, stage_width))
    if cfg.koleo > 0:
        terms.append(KoleoTerm(cfg.koleo))
    if classes:
        terms.append(LabelTerm(cfg.label_loss, stage_width, classes))
    return terms


def total_loss(terms: list[Term], batch: Batch, stats: EpochStats) -> torch.Tensor:
    """The weighted sum of the terms' losses, added in the terms' order (a weight of 1 multiplies nothing,
    so a run with one term computes exactly its loss)."""
    loss = None
    for term in terms:
        value = term.loss(batch, stats)
        value = value if term.weight == 1 else term.weight * value
        loss = value if loss is None else loss + value
    return loss
