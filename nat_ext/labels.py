"""Semi-supervised NAT (issue 26): which training images are labelled, and the labelled batches
drawn into every step.

The labelled set is a seeded, class-balanced share of the training set as the run sees it (after
``--limit``), or the images a ``--label-file`` names (one file name per line, as the published
ImageNet 1% and 10% lists). It is kept as dataset indices: O(labelled) per rank (12,811 int64 =
100 KB for ImageNet's 1%); choosing it reads the n labels once (10 MB at n = 1,281,167).
"""
from __future__ import annotations

import os

import torch

from .config import SettingError
from .data import IndexedImageFolder, SyntheticImages, TensorImages

__all__ = ["dataset_labels", "balanced_subset", "labelled_from_file", "labelled_set", "labelled_batches",
           "class_counts"]


def dataset_labels(dataset) -> torch.Tensor:
    """Tensor[n] int64: the label of every image of a :func:`nat_ext.data.get_dataset` training set."""
    if isinstance(dataset, TensorImages):
        return dataset.labels.to(torch.int64).clone()
    if isinstance(dataset, SyntheticImages):
        return torch.tensor([dataset.label(i) for i in range(len(dataset))], dtype=torch.int64)
    if isinstance(dataset, IndexedImageFolder):
        return torch.tensor(dataset.targets, dtype=torch.int64)
    raise TypeError(f"dataset should come from nat_ext.data.get_dataset, got {type(dataset).__name__}")


def balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A seeded, class-balanced subset: of each class's images, ``round(fraction x count)`` (at least 1)
    chosen by a seeded shuffle.

    Args:
        labels: Tensor[n] int64.
        fraction: in (0, 1].
        seed: the run's seed.

    Returns:
        Tensor[k] int64 dataset indices, sorted.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction should be in (0, 1], got {fraction!r}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 7 + 26))
    picked = []
    for c in torch.unique(labels).tolist():
        members = order[labels[order] == c]
        picked.append(members[:max(1, round(fraction * len(members)))])
    return torch.cat(picked).sort().values


def labelled_from_file(dataset, path: str) -> torch.Tensor:
    """The dataset indices of the images a label file names (one file name per line, blank lines
    ignored), e.g. the published ImageNet 1% / 10% lists.

    Raises:
        SettingError: for data without file names, a missing file, or a name not in the training set.
    """
    if not isinstance(dataset, IndexedImageFolder):
        raise SettingError(f"--label-file names images of an image folder; {type(dataset).__name__} data has no "
                           "file names: give --label-fraction instead")
    if not os.path.isfile(path):
        raise SettingError(f"--label-file {path}: no such file")
    where = {os.path.basename(p): i for i, (p, _) in enumerate(dataset.samples)}
    picked = []
    with open(path) as f:
        for k, line in enumerate(f, 1):
            name = line.strip()
            if not name:
                continue
            if os.path.basename(name) not in where:
                raise SettingError(f"--label-file {path} line {k}: no image {name!r} in the training set "
                                   "(after --limit)")
            picked.append(where[os.path.basename(name)])
    if not picked:
        raise SettingError(f"--label-file {path} names no image")
    return torch.tensor(sorted(set(picked)), dtype=torch.int64)


def labelled_set(dataset, fraction: float, label_file: str, seed: int) -> torch.Tensor | None:
    """The run's labelled images as dataset indices (None without labels): ``--label-file`` or
    ``--label-fraction``."""
    if label_file:
        return labelled_from_file(dataset, label_file)
    if fraction > 0:
        return balanced_subset(dataset_labels(dataset), fraction, seed)
    return None


def labelled_batches(labelled: torch.Tensor, per_step: int, seed: int, epoch: int, steps: int,
                     rank: int = 0) -> list[list[int]]:
    """This rank's labelled images for each step of an epoch: ``per_step`` drawn with replacement,
    a pure function of (seed, epoch, rank), so a resume mid-epoch draws the same ones.

    Returns:
        ``steps`` lists of ``per_step`` dataset indices.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_009 + rank + 7)
    draws = torch.randint(len(labelled), (steps, per_step), generator=g)
    return labelled[draws].tolist()


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    """Images per class among ``labels`` (Tensor[k])."""
    return torch.bincount(labels, minlength=num_classes).tolist()
