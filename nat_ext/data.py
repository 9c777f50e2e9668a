"""Datasets that return ``(image, label, index)``.

* ``fashion-mnist``: read straight from the gzip IDX files installed by the
  Debian package ``dataset-fashion-mnist`` (no download is ever attempted).
  Images are kept in memory as uint8; augmentation (random resized crop and
  flip) runs batched on the training device, see :func:`batch_augment`.
* any other ``--data`` value: a folder in ImageNet layout
  (``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``, or just
  ``DIR/<class>/*.jpg``), read with torchvision's ImageFolder.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader

__all__ = ["FASHION_MNIST_DIR", "DataInfo", "TensorImages", "IndexedImageFolder",
           "get_dataset", "collate", "batch_augment", "read_idx"]

FASHION_MNIST_DIR = os.environ.get("NAT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataInfo:
    """What a model needs to know about a dataset."""
    in_channels: int
    num_classes: int
    image_size: int
    small_input: bool
    batch_augment: bool  # augment with batch_augment on the device (the dataset does not)


def read_idx(path: str) -> torch.Tensor:
    """Read a (gzip) IDX file.

    Args:
        path: file path (``.gz`` or plain).

    Returns:
        uint8 Tensor with the shape stored in the file (e.g. Tensor[N, 28, 28]).
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RuntimeError(f"cannot read IDX file {path}: {e}") from e
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise RuntimeError(f"{path} is not a uint8 IDX file (magic {data[:4]!r})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != math.prod(shape):
        raise RuntimeError(f"{path} is truncated: {len(body)} bytes for shape {shape}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def _fashion_mnist(split: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    prefix = "train" if split == "train" else "t10k"
    files = [os.path.join(root, f"{prefix}-{kind}-idx{n}-ubyte.gz") for kind, n in (("images", 3), ("labels", 1))]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {missing}. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four "
            "*-ubyte.gz files in a folder and set NAT_FASHION_MNIST_DIR to it.")
    return read_idx(files[0]), read_idx(files[1]).long()


class TensorImages(Dataset):
    """In-memory uint8 images, returned normalised as Tensor[1, H, W] float32.

    Args:
        images: uint8 Tensor[N, H, W].
        labels: int64 Tensor[N].
        mean, std: normalisation constants.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 mean: float = _FMNIST_MEAN, std: float = _FMNIST_STD) -> None:
        if images.dim() != 3 or labels.shape != images.shape[:1]:
            raise ValueError(f"images should be Tensor[N, H, W] and labels Tensor[N], got "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        self.images, self.labels, self.mean, self.std = images, labels, mean, std

    def __len__(self) -> int:
        return self.images.shape[0]

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std

    def __getitem__(self, i: int):
        return self._norm(self.images[i]).unsqueeze(0), int(self.labels[i]), i

    def __getitems__(self, idx: list[int]):
        # Batched fetch (used by DataLoader): one gather instead of b calls.
        t = torch.as_tensor(idx)
        return self._norm(self.images[t]).unsqueeze(1), self.labels[t], t


class IndexedImageFolder(ImageFolder):
    """ImageFolder returning ``(image, label, index)``.

    Args:
        root: class-per-folder tree.
        transform: torchvision transform of the PIL image.
        skip_corrupt: return ``None`` for unreadable images (dropped and
            counted by :func:`collate`) instead of raising.
    """

    def __init__(self, root: str, transform: Callable, skip_corrupt: bool = False) -> None:
        super().__init__(root, transform=transform)
        self.skip_corrupt = skip_corrupt

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            img = default_loader(path)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad files
            if self.skip_corrupt:
                return None
            raise RuntimeError(f"cannot read image {path}: {e} "
                               "(pass --skip-corrupt to skip unreadable images)") from e
        return self.transform(img), label, i


class _Views:
    """A transform applied ``views`` times to one image, the results stacked (picklable for workers)."""

    def __init__(self, transform: Callable, views: int) -> None:
        self.transform, self.views = transform, views

    def __call__(self, img) -> torch.Tensor:
        return torch.stack([self.transform(img) for _ in range(self.views)])


def collate(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Collate ``(image, label, index)`` items, dropping ``None`` (skipped) items.

    Returns:
        images Tensor[b, C, H, W], labels Tensor[b], indices Tensor[b], number skipped.
    """
    if isinstance(batch, tuple):  # already batched by TensorImages.__getitems__
        return batch[0], batch[1], batch[2], 0
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped
    x = torch.stack([b[0] for b in kept])
    y = torch.as_tensor([b[1] for b in kept])
    idx = torch.as_tensor([b[2] for b in kept])
    return x, y, idx, skipped


def get_dataset(data: str, split: str, augment: bool, limit: int | None = None,
                image_size: int = 224, skip_corrupt: bool = False,
                seed: int = 0, views: int = 1) -> tuple[Dataset, DataInfo]:
    """Dataset for a ``--data`` value and split.

    Args:
        data: ``fashion-mnist`` or a path to an image folder.
        split: ``train`` or ``test`` (``val`` folder for image folders).
        augment: for image folders, random resized crop + flip (Fashion-MNIST is
            augmented batched on the device by :func:`batch_augment` instead).
        limit: keep only the first ``limit`` images after a seeded shuffle (tiny runs).
        image_size: crop size for image folders.
        skip_corrupt: see :class:`IndexedImageFolder`.
        seed: seed of the ``limit`` subset.
        views: for augmented image folders, independent augmentations of each image, stacked
            as Tensor[views, C, H, W] when more than 1 (Fashion-MNIST: augment each view on the device).

    Returns:
        (dataset yielding (image, label, index), DataInfo).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split should be 'train' or 'test', got {split!r}")
    if data == "fashion-mnist":
        images, labels = _fashion_mnist(split, FASHION_MNIST_DIR)
        if limit is not None:
            keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:limit]
            images, labels = images[keep], labels[keep]
        return TensorImages(images, labels), DataInfo(1, 10, 28, True, True)
    if not os.path.isdir(data):
        raise ValueError(f"data should be 'fashion-mnist' or an existing image folder, got {data!r}")
    sub = os.path.join(data, "train" if split == "train" else "val")
    root = sub if os.path.isdir(sub) else data
    norm = T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)
    if augment:
        tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        if views > 1:
            tf = _Views(tf, views)
    else:
        tf = T.Compose([T.Resize(image_size * 8 // 7), T.CenterCrop(image_size), T.ToTensor(), norm])
    ds = IndexedImageFolder(root, tf, skip_corrupt=skip_corrupt)
    if limit is not None:
        keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit]
        ds.samples = [ds.samples[i] for i in keep.sort().values.tolist()]
        ds.targets = [s[1] for s in ds.samples]
        ds.imgs = ds.samples
    return ds, DataInfo(3, len(ds.classes), image_size, image_size <= 64, False)


def batch_augment(x: torch.Tensor, generator: torch.Generator | None = None,
                  scale: tuple[float, float] = (0.5, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Per-sample random resized crop and horizontal flip of a batch, in one
    ``grid_sample`` call (no per-image Python work; runs on the batch's device).

    Args:
        x: Tensor[B, C, H, W].
        generator: random generator on ``x.device`` (for reproducible runs).
        scale: range of the crop area as a fraction of the image.
        ratio: range of the crop aspect ratio.

    Returns:
        Tensor[B, C, H, W] augmented images.
    """
    b = x.shape[0]
    u = torch.rand(b, 5, device=x.device, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)
    cy = (1 - h) * (2 * u[:, 3] - 1)
    flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = (w * flip).to(x.dtype)
    theta[:, 0, 2] = cx.to(x.dtype)
    theta[:, 1, 1] = h.to(x.dtype)
    theta[:, 1, 2] = cy.to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Crops lie inside the image; 'border' only guards sub-pixel overshoot at the edges.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
