"""Datasets that return ``(image, label, index)``.

* ``fashion-mnist``: read straight from the gzip IDX files installed by the
  Debian package ``dataset-fashion-mnist`` (no download is ever attempted).
  Images are kept in memory as uint8; augmentation (random resized crop and
  flip) runs batched on the training device, see :func:`batch_augment`.
* ``synthetic:N``: ImageNet-shaped images made on the fly, no files (see
  :class:`SyntheticImages`): N training images, ``min(50,000, max(1, N // 25))``
  validation images, 1000 classes, 3 channels, at any ``image_size``.
* any other ``--data`` value: a folder in ImageNet layout
  (``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``, or just
  ``DIR/<class>/*.jpg``), read with torchvision's ImageFolder, its file list walked
  once per process (:func:`scan_folder`). The validation folder may also be flat, as ImageNet's
  is distributed (``DIR/val/*.JPEG`` and a label file, :func:`read_val_labels`).

With ``uint8=True`` (:func:`get_dataset`) items are uint8 and the batch is finished on the
training device by :class:`nat_ext.presets.DeviceTransform` (the pipeline that feeds GPUs, see
docs/input_pipeline.md). The run's one loader: :func:`make_loader` over an :class:`EpochBatches`
(persistent workers, prefetching, pinned memory, :func:`default_workers`). In the training loop::

    dataset, info = get_dataset(cfg.data, "train", augment=True, ..., uint8=True)
    sampler = EpochBatches(lambda e: epoch_batches(n, batch_size, seed, e, rank, world))
    loader = make_loader(dataset, sampler, device, workers=cfg.workers)   # once per run
    finish = DeviceTransform(cfg.image_size)
    for epoch in ...:
        sampler.set_epoch(epoch, start_step)
        for x, y, idx, skipped in loader:
            x = finish(x.to(device, non_blocking=True), aug_gen)   # Tensor[views * b, 3, S, S]
"""
from __future__ import annotations

import gzip
import math
import os
import shutil
import signal
import struct
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes, make_dataset

from .config import SettingError
from .presets import CropBatch, FolderCrop, mix64

__all__ = ["FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "DataInfo", "TensorImages", "IndexedImageFolder",
           "SyntheticImages", "synthetic_size", "mix64", "get_dataset", "collate", "batch_augment", "read_idx",
           "scan_folder", "default_workers", "EpochBatches", "make_loader", "read_val_labels", "FlatFolder",
           "resolve_workers", "ignore_stop_signals", "shm_needed", "check_shm", "shard_rows"]

FASHION_MNIST_DIR = os.environ.get("NAT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530
# Fashion-MNIST's labels 0-9, as its authors name them
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataInfo:
    """What a model needs to know about a dataset."""
    in_channels: int
    num_classes: int
    image_size: int
    small_input: bool
    batch_augment: bool  # augment with batch_augment on the device (the dataset does not)
    uint8: bool = False  # items are uint8 Tensor[(views,) 3, H, W]: finish them on the device (presets.DeviceTransform)


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

    def __getitem__(self, i):
        i = i[1] if isinstance(i, tuple) else i  # an (epoch, index) key of EpochBatches
        return self._norm(self.images[i]).unsqueeze(0), int(self.labels[i]), i

    def __getitems__(self, idx: list):
        # Batched fetch (used by DataLoader): one gather instead of b calls.
        t = torch.as_tensor([k[1] if isinstance(k, tuple) else k for k in idx])
        return self._norm(self.images[t]).unsqueeze(1), self.labels[t], t


_SCANS: dict[str, tuple[list[str], dict[str, int], list[tuple[str, int]]]] = {}
SCAN_COUNT = 0  # folders walked by this process (tests check that a run walks each once)


def scan_folder(root: str) -> tuple[list[str], dict[str, int], list[tuple[str, int]]]:
    """The classes and ``(path, class)`` samples of a class-per-folder tree, walked once per process.

    The first call walks ``root`` as torchvision's ImageFolder does (``find_classes`` and
    ``make_dataset`` with its image extensions); later calls with the same folder (the training set,
    its unaugmented copy for the dataset-wide pass, the probe's) return the same lists copied, so
    1.28M files are listed once per run, not once per dataset built.

    Returns:
        (classes, class_to_idx, samples).
    """
    global SCAN_COUNT
    key = os.path.realpath(root)
    if key not in _SCANS:
        classes, class_to_idx = find_classes(key)
        samples = make_dataset(root, class_to_idx, IMG_EXTENSIONS)
        _SCANS[key] = (classes, class_to_idx, samples)
        SCAN_COUNT += 1
    classes, class_to_idx, samples = _SCANS[key]
    return list(classes), dict(class_to_idx), list(samples)


class IndexedImageFolder(ImageFolder):
    """ImageFolder returning ``(image, label, index)``, its file list from :func:`scan_folder`.

    Args:
        root: class-per-folder tree.
        transform: torchvision transform of the PIL image (the torchvision pipeline).
        skip_corrupt: return ``None`` for unreadable images (dropped and
            counted by :func:`collate`) instead of raising.
        crop: a :class:`nat_ext.presets.FolderCrop`: items are its uint8 crops instead (``transform``
            unused); an item key may then be ``(epoch, index)`` (what :class:`EpochBatches`
            yields) to key the random crop by epoch, a plain index means epoch :attr:`epoch`.
    """

    def __init__(self, root: str, transform: Callable | None, skip_corrupt: bool = False,
                 crop: FolderCrop | None = None) -> None:
        super().__init__(root, transform=transform)
        self.skip_corrupt, self.crop, self.epoch = skip_corrupt, crop, 0
        self._paths = self._labels = None

    def freeze(self) -> None:
        """Copy ``samples`` into two flat numpy arrays that ``__getitem__`` reads from then on.

        At 1.28M images the list of (path, class) tuples takes ~270 MB of Python objects; a worker
        that indexed it would write their reference counts and so copy the pages it touched (the
        list is shared copy-on-write after the fork), up to that much again per worker. The arrays
        (~70 MB of fixed-width bytes at ImageNet's path lengths, one int64 per label) have no
        per-item objects, so the workers share them. Call again after changing ``samples``.
        """
        self._paths = np.array([os.fsencode(p) for p, _ in self.samples])
        self._labels = np.array([c for _, c in self.samples], dtype=np.int64)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, class_to_idx, _ = scan_folder(directory)
        return classes, class_to_idx

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions=None,
                     is_valid_file=None, allow_empty: bool = False) -> list[tuple[str, int]]:
        return scan_folder(directory)[2]

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain-index keys (with ``workers=0`` or loaders rebuilt each epoch)."""
        self.epoch = epoch

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        if self._paths is not None:
            path, label = os.fsdecode(self._paths[i]), int(self._labels[i])
        else:
            path, label = self.samples[i]
        try:
            img = self.crop(path, i, epoch) if self.crop is not None else self.transform(default_loader(path))
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad files
            if self.skip_corrupt:
                return None
            raise RuntimeError(f"cannot read image {path}: {e} "
                               "(pass --skip-corrupt to skip unreadable images)") from e
        return img, label, i


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _devkit_classes(meta_path: str) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID of the 1000 leaf synsets in the devkit's ``data/meta.mat``."""
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise RuntimeError(f"reading {meta_path} needs scipy (pip install scipy)") from e
    synsets = loadmat(meta_path, squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def read_val_labels(path: str, files: list[str], class_to_idx: dict[str, int]) -> list[int]:
    """The labels of a flat validation folder's images, from its label file.

    Two formats:

    * a CSV of ``filename,label`` lines (an optional ``filename,label`` header), the label a class
      folder name of the training set (e.g. ``n01440764``) or a class index ``0..C-1``; every image
      of the folder must be listed once;
    * ImageNet's devkit ground-truth list (``ILSVRC2012_validation_ground_truth.txt``): one
      ILSVRC2012_ID (1..1000) per line, line i for the i-th image in name order; the IDs are mapped to
      the training set's class folders (WNIDs) through the devkit's ``meta.mat``, found next to the
      list (the devkit's ``data/`` folder holds both).

    Args:
        path: the label file.
        files: the folder's image file names (no directories), sorted.
        class_to_idx: the training set's class folder names and indices.

    Returns:
        the class index of each file, in ``files``' order.

    Raises:
        ValueError: naming the file and line, for a malformed line, an unknown file, a file listed
            twice or not at all, a label out of range, or a line count that does not match.
    """
    with open(path) as f:
        lines = [(k + 1, l.strip()) for k, l in enumerate(f)]
    lines = [(k, l) for k, l in lines if l]
    if not lines:
        raise ValueError(f"--val-labels {path} is empty")
    num_classes = len(class_to_idx)
    if "," not in lines[0][1]:
        return _devkit_labels(path, lines, files, class_to_idx)
    if lines[0][1].replace(" ", "").lower() == "filename,label":
        lines = lines[1:]
    position = {name: i for i, name in enumerate(files)}
    labels = [-1] * len(files)
    for k, line in lines:
        name, sep, label = (p.strip() for p in line.rpartition(","))
        if not sep or not name:
            raise ValueError(f"{path} line {k}: expected 'filename,label', got {line!r}")
        if os.path.basename(name) not in position:
            raise ValueError(f"{path} line {k}: no image {name!r} in the validation folder")
        i = position[os.path.basename(name)]
        if labels[i] >= 0:
            raise ValueError(f"{path} line {k}: {name!r} is listed twice")
        if label in class_to_idx:
            labels[i] = class_to_idx[label]
        elif label.lstrip("-").isdigit():
            if not 0 <= int(label) < num_classes:
                raise ValueError(f"{path} line {k}: label {label} is outside 0..{num_classes - 1} "
                                 f"(the training set has {num_classes} classes)")
            labels[i] = int(label)
        else:
            raise ValueError(f"{path} line {k}: label {label!r} is neither a class folder of the training "
                             f"set nor an index 0..{num_classes - 1}")
    missing = [files[i] for i, c in enumerate(labels) if c < 0]
    if missing:
        raise ValueError(f"{path} has no label for {len(missing)} image(s) of the validation folder, "
                         f"e.g. {missing[0]!r}")
    return labels


def _devkit_labels(path: str, lines: list[tuple[int, str]], files: list[str],
                   class_to_idx: dict[str, int]) -> list[int]:
    if len(lines) != len(files):
        raise ValueError(f"{path} has {len(lines)} labels for the {len(files)} images of the validation "
                         "folder (a devkit ground-truth list has one line per image, in name order)")
    meta = os.path.join(os.path.dirname(os.path.abspath(path)), "meta.mat")
    if not os.path.exists(meta):
        raise ValueError(f"{path} is a list of ILSVRC2012_IDs: its meta.mat (the devkit's data/meta.mat, "
                         f"which maps them to class folders) should be next to it, not found: {meta}")
    wnid = _devkit_classes(meta)
    labels = []
    for k, line in lines:
        if not line.isdigit():
            raise ValueError(f"{path} line {k}: expected an ILSVRC2012_ID (an integer), got {line!r}")
        if int(line) not in wnid:
            raise ValueError(f"{path} line {k}: label {line} is outside the {len(wnid)} classes of {meta} "
                             f"(1..{len(wnid)})")
        if wnid[int(line)] not in class_to_idx:
            raise ValueError(f"{path} line {k}: class {wnid[int(line)]} (ILSVRC2012_ID {line}) has no "
                             "folder in the training set")
        labels.append(class_to_idx[wnid[int(line)]])
    return labels


class FlatFolder(IndexedImageFolder):
    """A validation folder of images without class folders, labelled by a label file
    (:func:`read_val_labels`); the classes are the training set's. Items as :class:`IndexedImageFolder`'s.

    Args:
        root: the flat folder.
        labels_path: its label file.
        classes_root: the training set's class-per-folder tree.
        transform, skip_corrupt, crop: as :class:`IndexedImageFolder`.
    """

    def __init__(self, root: str, labels_path: str, classes_root: str, transform: Callable | None,
                 skip_corrupt: bool = False, crop: FolderCrop | None = None) -> None:
        self._classes_root, self._labels_path = classes_root, labels_path
        super().__init__(root, transform, skip_corrupt=skip_corrupt, crop=crop)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, class_to_idx, _ = scan_folder(self._classes_root)
        return classes, class_to_idx

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions=None,
                     is_valid_file=None, allow_empty: bool = False) -> list[tuple[str, int]]:
        files = sorted(f for f in os.listdir(directory) if _is_image(f))
        labels = read_val_labels(self._labels_path, files, class_to_idx)
        return [(os.path.join(directory, f), c) for f, c in zip(files, labels)]


class _Views:
    """A transform applied ``views`` times to one image, the results stacked (picklable for workers)."""

    def __init__(self, transform: Callable, views: int) -> None:
        self.transform, self.views = transform, views

    def __call__(self, img) -> torch.Tensor:
        return torch.stack([self.transform(img) for _ in range(self.views)])


def synthetic_size(n: int, split: str) -> int:
    """Images in a split of ``synthetic:n``: n for ``train``, ``min(50,000, max(1, n // 25))`` for
    ``test`` (ImageNet's 1,281,167 / 50,000 ratio is 25.6; at least one image so evaluation runs)."""
    if split == "train":
        return n
    return min(50_000, max(1, n // 25))


class SyntheticImages(Dataset):
    """ImageNet-shaped images computed on the fly from (seed, split, index); nothing per image is stored.

    Each image is a smooth colour field (its class's 4x4 pattern, shared by the class's images
    in both splits, blended with the image's own 8x8 pattern, bilinearly upsampled) plus
    per-pixel noise, so a probe can tell the classes apart (above chance) and the pixels are not
    constant. Labels are ``mix64(seed, split, index) % num_classes``. ``len`` and an item cost
    O(1) in ``n`` (about 1 ms at 224 px, one thread), and items are the same in every process.

    Items are ``(image, label, index)``:

    * ``uint8=True``: image uint8 Tensor[3, S, S] (Tensor[views, 3, S, S] when ``views > 1``;
      the views are the same pixels: flips are drawn on the device by presets.DeviceTransform).
    * ``uint8=False`` (what torchvision's pipeline gives): float32 normalised with the ImageNet
      mean and std; with ``augment`` a horizontal flip drawn from torch's global generator
      per view, as ``T.RandomHorizontalFlip`` does.

    Args:
        n: images in the split.
        split: ``train`` or ``test``.
        image_size: S.
        seed: the data seed (``--seed``).
        num_classes: label range.
        augment, views, uint8: see above.
    """

    SPLITS = {"train": 0, "test": 1}

    def __init__(self, n: int, split: str, image_size: int = 224, seed: int = 0, num_classes: int = 1000,
                 augment: bool = False, views: int = 1, uint8: bool = False) -> None:
        if n < 1:
            raise ValueError(f"n should be at least 1, got {n}")
        if split not in self.SPLITS:
            raise ValueError(f"split should be 'train' or 'test', got {split!r}")
        if image_size < 1:
            raise ValueError(f"image_size should be at least 1, got {image_size}")
        self.n, self.split, self.image_size, self.seed = n, split, image_size, seed
        self.num_classes, self.augment, self.views, self.uint8 = num_classes, augment, views, uint8
        self._split_id = self.SPLITS[split]
        self.mean = torch.tensor(_IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(_IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.n

    def label(self, i: int) -> int:
        """The label of image ``i`` (no pixels computed)."""
        return mix64(self.seed, self._split_id, i, 0x1ABE1) % self.num_classes

    def pixels(self, i: int) -> torch.Tensor:
        """Image ``i`` as uint8 Tensor[3, S, S]."""
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} is out of range for {self.n} images")
        s = self.image_size
        cls = torch.Generator().manual_seed(mix64(self.seed, self.label(i), 0xC1A55))
        own = torch.Generator().manual_seed(mix64(self.seed, self._split_id, i, 0x1A6E))
        field = 0.6 * F.interpolate(torch.rand(1, 3, 4, 4, generator=cls), size=(8, 8), mode="bilinear",
                                    align_corners=False) + 0.4 * torch.rand(1, 3, 8, 8, generator=own)
        img = F.interpolate(field, size=(s, s), mode="bilinear", align_corners=False)[0] * 224.0
        img += torch.randint(0, 32, (3, s, s), generator=own, dtype=torch.uint8)
        return img.clamp_(0, 255).to(torch.uint8)

    def __getitem__(self, i):
        i = int(i[1] if isinstance(i, tuple) else i)  # an (epoch, index) key of EpochBatches: same pixels
        x = self.pixels(i)
        if self.uint8:
            out = x.unsqueeze(0).expand(self.views, -1, -1, -1).contiguous() if self.views > 1 else x
            return out, self.label(i), i
        x = (x.float() / 255.0 - self.mean) / self.std
        outs = [x.flip(-1) if self.augment and torch.rand(1).item() < 0.5 else x for _ in range(self.views)]
        return (torch.stack(outs) if self.views > 1 else outs[0]), self.label(i), i


def collate(batch) -> tuple[torch.Tensor | CropBatch, torch.Tensor, torch.Tensor, int]:
    """Collate ``(image, label, index)`` items, dropping ``None`` (skipped) items.

    Returns:
        images Tensor[b, C, H, W] (Tensor[b, views, C, H, W] for stacked views), or a
        :class:`nat_ext.presets.CropBatch` when the items are tuples of uint8 HWC crops (one per
        view, :class:`nat_ext.presets.FolderCrop`), labels Tensor[b], indices Tensor[b], number skipped.
    """
    if isinstance(batch, tuple):  # already batched by TensorImages.__getitems__
        return batch[0], batch[1], batch[2], 0
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped
    first = kept[0][0]
    if isinstance(first, tuple):  # FolderCrop's items: a tuple of uint8 HWC crops, one per view
        crops = [b[0][v] for v in range(len(first)) for b in kept]  # view-major
        x = CropBatch.pack(crops, len(first))
    else:
        x = torch.stack([b[0] for b in kept])
    y = torch.as_tensor([b[1] for b in kept])
    idx = torch.as_tensor([b[2] for b in kept])
    return x, y, idx, skipped


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int, int]:
    """A rank's contiguous share of ``n`` rows: every shard ``ceil(n / world)`` rows, the last ones
    shorter (or empty), so rank 0 can gather the shards into equal slots of one buffer.

    Returns:
        (lo, hi, shard): the rank takes rows ``lo..hi``; ``shard`` is the full shard's length.
    """
    shard = -(-n // world)
    return min(rank * shard, n), min((rank + 1) * shard, n), shard


def get_dataset(data: str, split: str, augment: bool, limit: int | None = None,
                image_size: int = 224, skip_corrupt: bool = False,
                seed: int = 0, views: int = 1, uint8: bool = False,
                worker_resize: bool = False, val_labels: str = "") -> tuple[Dataset, DataInfo]:
    """Dataset for a ``--data`` value and split.

    Args:
        data: ``fashion-mnist``, ``synthetic:N`` (N training images, see :class:`SyntheticImages`)
            or a path to an image folder.
        split: ``train`` or ``test`` (``val`` folder for image folders).
        augment: for image folders, random resized crop + flip (Fashion-MNIST is
            augmented batched on the device by :func:`batch_augment` instead).
        limit: keep only the first ``limit`` images after a seeded shuffle (tiny runs).
        image_size: crop size for image folders.
        skip_corrupt: see :class:`IndexedImageFolder`.
        seed: seed of the ``limit`` subset.
        views: for augmented image folders, independent augmentations of each image, stacked
            as Tensor[views, C, H, W] when more than 1 (Fashion-MNIST: augment each view on the device).
        uint8: the pipeline that feeds GPUs (``DataInfo.uint8`` is then set): items are uint8 and
            :class:`nat_ext.presets.DeviceTransform` finishes the batch on the device. Image
            folders: tuples of uint8 HWC crops (:class:`nat_ext.presets.FolderCrop`: random resized
            crops keyed by (seed, epoch, index, view) when ``augment``, else the centre crop),
            collated into a :class:`nat_ext.presets.CropBatch`; synthetic data: uint8 Tensor[3, S, S].
            False: torchvision's pipeline (PIL crop, resize, flip, ToTensor, Normalize in the
            worker; float32 items), kept as the reference.
        worker_resize: image folders with ``uint8``: resize the crops to S x S in the worker (PIL)
            instead of on the device; for training on the CPU, where PIL's uint8 resize is the
            cheaper one (see docs/input_pipeline.md). The pixels are the same up to rounding.
        val_labels: image folders, split ``test``: the label file of a flat ``DIR/val`` (images
            without class folders, as ImageNet's validation set is distributed; see :func:`read_val_labels`).

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
    if data.startswith("synthetic:"):
        try:
            n = int(data.split(":", 1)[1].replace(",", "").replace("_", ""))
        except ValueError:
            raise SettingError(f"--data should be synthetic:N with N a positive integer, got {data!r}") from None
        if n < 1:
            raise SettingError(f"--data should be synthetic:N with N a positive integer, got {data!r}")
        size = synthetic_size(n, split)
        if limit is not None:  # the images are i.i.d.: the first `limit` are as good a subset as any
            size = min(size, limit)
        ds = SyntheticImages(size, split, image_size, seed, 1000, augment=augment, views=views, uint8=uint8)
        return ds, DataInfo(3, 1000, image_size, image_size <= 64, False, uint8)
    if not os.path.isdir(data):
        raise SettingError(f"--data should be 'fashion-mnist', 'synthetic:N' or an existing image folder, got {data!r}")
    sub = os.path.join(data, "train" if split == "train" else "val")
    root = sub if os.path.isdir(sub) else data
    flat = split == "test" and os.path.isdir(sub) and not any(e.is_dir() for e in os.scandir(sub))
    if flat and not val_labels:
        raise SettingError(f"{sub} holds images without class folders: give its label file with --val-labels "
                         "(the devkit's ILSVRC2012_validation_ground_truth.txt, or a filename,label CSV)")
    if val_labels and not flat:
        raise SettingError(f"--val-labels {val_labels} is for a flat validation folder, but "
                         f"{sub if split == 'test' else data} is not one (it has class folders, or is missing)")
    if val_labels and not os.path.isfile(val_labels):
        raise SettingError(f"--val-labels {val_labels}: no such file")
    norm = T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)
    if augment:
        tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        if views > 1:
            tf = _Views(tf, views)
    else:
        tf = T.Compose([T.Resize(image_size * 8 // 7), T.CenterCrop(image_size), T.ToTensor(), norm])
    crop = FolderCrop(image_size, augment, seed=seed, views=views, resize=worker_resize) if uint8 else None
    if flat:
        train_root = os.path.join(data, "train")
        ds = FlatFolder(root, val_labels, train_root, None if uint8 else tf, skip_corrupt=skip_corrupt, crop=crop)
    else:
        ds = IndexedImageFolder(root, None if uint8 else tf, skip_corrupt=skip_corrupt, crop=crop)
    if limit is not None:
        keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit]
        ds.samples = [ds.samples[i] for i in keep.sort().values.tolist()]
        ds.targets = [s[1] for s in ds.samples]
        ds.imgs = ds.samples
    ds.freeze()
    return ds, DataInfo(3, len(ds.classes), image_size, image_size <= 64, False, uint8)


def batch_augment(x: torch.Tensor, generator: torch.Generator | None = None,
                  scale: tuple[float, float] = (0.5, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3), size: int | None = None) -> torch.Tensor:
    """Per-sample random resized crop and horizontal flip of a batch, in one
    ``grid_sample`` call (no per-image Python work; runs on the batch's device).

    Args:
        x: Tensor[B, C, H, W].
        generator: random generator on ``x.device`` (for reproducible runs).
        scale: range of the crop area as a fraction of the image.
        ratio: range of the crop aspect ratio.
        size: side of the output crops (None: the input's H x W).

    Returns:
        Tensor[B, C, H, W] augmented images (Tensor[B, C, size, size] with ``size``).
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
    shape = list(x.shape) if size is None else [b, x.shape[1], size, size]
    grid = F.affine_grid(theta, shape, align_corners=False)
    # Crops lie inside the image; 'border' only guards sub-pixel overshoot at the edges.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------- loading


def usable_cpus() -> int:
    """The cpus this process may run on (its affinity: a cluster's allocation), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_workers(local_world_size: int = 1, cpu_count: int | None = None) -> int:
    """Worker processes per rank by default: ``min(16, cpus // local_world_size - 1)``, 0 below 2 cpus a rank.

    The cpus are those this process may run on (``os.sched_getaffinity``), shared by the
    ``local_world_size`` ranks of the node. One core per rank is left to the training loop itself
    (the device step's launches, the optimizer, the logging); the rest decode, since decoding is
    the pipeline's whole CPU cost. The cap of 16: at ~520 images/s per core (1.9 ms of CPU an
    image at 224, docs/input_pipeline.md) 16 workers give ~8k images/s per rank, beyond what one
    GPU trains at 224 px, while each worker holds ``prefetch_factor`` batches. With a single cpu a
    rank, the loop decodes in the main process (0): a worker would only add the hand-over.

    Args:
        local_world_size: ranks on this node (``LOCAL_WORLD_SIZE`` under torchrun).
        cpu_count: override the cpus found (tests).
    """
    if cpu_count is None:
        cpu_count = usable_cpus()
    per_rank = cpu_count // max(1, local_world_size)
    return 0 if per_rank < 2 else min(16, per_rank - 1)


class EpochBatches:
    """A batch sampler built once per run whose batches follow the epoch set on it.

    Give it to the one DataLoader of the run (``persistent_workers`` keeps the workers across
    epochs); before each epoch's ``for ... in loader`` call ``set_epoch(epoch, start_step)``. It is
    iterated in the main process, so the setting reaches the loader even with persistent workers.
    It yields batches of ``(epoch, index)`` keys, which :class:`IndexedImageFolder` uses to key its
    random crops by epoch (:class:`TensorImages` and :class:`SyntheticImages` take the index from
    the key; ``keys=False`` yields plain indices, e.g. for a ``Subset``).

    Args:
        batches_of: ``epoch -> this rank's batches`` (lists of indices), e.g.
            ``lambda e: epoch_batches(n, batch_size, seed, e, rank, world)`` from train.py.
        keys: yield ``(epoch, index)`` keys (True) or plain indices (False).
    """

    def __init__(self, batches_of: Callable[[int], list[list[int]]], keys: bool = True) -> None:
        self.batches_of, self.keys = batches_of, keys
        self.epoch, self.start_step, self._batches = 0, 0, None

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Yield ``epoch``'s batches from ``start_step`` on (a resumed epoch skips the steps done)."""
        self.epoch, self.start_step, self._batches = epoch, start_step, None

    def batches(self) -> list[list[int]]:
        """The whole epoch's batches (index lists), computed once per epoch."""
        if self._batches is None:
            self._batches = self.batches_of(self.epoch)
        return self._batches

    def __len__(self) -> int:
        return max(0, len(self.batches()) - self.start_step)

    def __iter__(self) -> Iterator[list]:
        for batch in self.batches()[self.start_step:]:
            yield [(self.epoch, i) for i in batch] if self.keys else list(batch)


# seconds a loader worker outlives a SIGTERM: the rank it feeds needs no batch once it has agreed to stop,
# but a worker that died of the signal would fail the rank (torch's SIGCHLD check) before it saved; under
# SLURM's 30 s before SIGKILL
WORKER_STOP_GRACE_S = 25


def _exit_quietly(signum, frame) -> None:
    os._exit(0)  # exit status 0: torch's worker check raises only for a signal or a failure status


def _stop_later(signum, frame) -> None:
    signal.signal(signal.SIGALRM, _exit_quietly)
    signal.alarm(WORKER_STOP_GRACE_S)


def ignore_stop_signals(worker_id: int) -> None:
    """A loader worker's ``worker_init_fn``: SIGINT and SIGUSR1 are the training loop's to handle, and a
    SIGTERM ends the worker only :data:`WORKER_STOP_GRACE_S` later (SLURM and torchrun signal every
    process of the job at once; a worker that died at once would fail the rank before it could
    checkpoint). The parent ends its workers as it exits; when it cannot (a worker still busy), its
    SIGTERM ends them after the grace period instead of never."""
    for s in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_later)


def make_loader(dataset: Dataset, batch_sampler, device: torch.device | str, workers: int | None = None,
                prefetch_factor: int = 4, local_world_size: int | None = None, timeout: float = 0,
                shield_workers: bool = False) -> DataLoader:
    """The run's DataLoader, built once: persistent workers, prefetching, pinned memory on CUDA.

    Args:
        dataset: what :func:`get_dataset` returned.
        batch_sampler: an :class:`EpochBatches` (or any iterable of index batches).
        device: the training device (pinned memory when CUDA).
        workers: worker processes; None or negative: :func:`default_workers` of the node's ranks.
        prefetch_factor: batches each worker prepares ahead.
        local_world_size: ranks on this node; default ``LOCAL_WORLD_SIZE`` from the environment (1).
        timeout: seconds to wait for a batch from the workers before raising (0: forever; no
            effect without workers, where torch refuses a timeout).
        shield_workers: the workers ignore the stop signals (:func:`ignore_stop_signals`).

    Returns:
        A DataLoader yielding ``(images, labels, indices, skipped)`` (see :func:`collate`).
    """
    workers = resolve_workers(workers, local_world_size)
    extra = dict(persistent_workers=True, prefetch_factor=prefetch_factor, timeout=timeout,
                 worker_init_fn=ignore_stop_signals if shield_workers else None) if workers > 0 else {}
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.device(device).type == "cuda", **extra)


def resolve_workers(workers: int | None, local_world_size: int | None = None) -> int:
    """``workers``, or :func:`default_workers` of the node's ranks for None or a negative value."""
    if workers is None or workers < 0:
        if local_world_size is None:
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        workers = default_workers(local_world_size)
    return workers


def shm_needed(workers: int, prefetch_factor: int, batch_bytes: int, local_world_size: int) -> int:
    """Bytes of /dev/shm the node's loaders hold at once: every worker's prefetched batches, per rank."""
    return workers * prefetch_factor * batch_bytes * local_world_size


def check_shm(needed: int, path: str = "/dev/shm") -> None:
    """Raise RuntimeError, with the fix, when ``path`` cannot hold ``needed`` bytes (workers hand their
    batches over in shared memory; a container's default 64 MB fails at the first batch with a bus
    error). No-op where ``path`` does not exist."""
    if not os.path.isdir(path):
        return
    free = shutil.disk_usage(path).free
    if needed > free:
        raise RuntimeError(
            f"{path} has {free / 2**20:.0f} MiB free, but the loader workers of this node hand over about "
            f"{needed / 2**20:.0f} MiB of batches at once (workers x prefetch x batch bytes x ranks): give the "
            "container more shared memory (docker run --shm-size=64g, or a larger /dev/shm), or lower "
            "--workers or --batch-size")
