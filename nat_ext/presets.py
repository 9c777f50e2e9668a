"""The input pipeline that feeds GPUs: workers decode and crop, the training device does the rest.

Split as in FFCV's and DALI's ImageNet examples (see docs/input_pipeline.md for the measurements):

* **worker side** (:func:`load_crop`, :class:`FolderCrop`): read the JPEG header, draw the crop box
  (``RandomResizedCrop``'s algorithm, or the evaluation centre crop), decode at the smallest
  libjpeg-turbo DCT scale (1, 1/2, 1/4, 1/8) at which the box is still at least ``image_size`` on
  its shorter side (``PIL.Image.draft``), and cut the box out. The item is the crop as uint8
  Tensor[h, w, 3] (HWC, variable size): no resampling, no float conversion on the CPU. (When
  the decode was reduced, the small region is resized to S x S here, where it is cheap and keeps
  the box's fractional edges; ``resize=True`` does it always, for runs on the CPU.)
* **collation** (:class:`CropBatch`): a batch's crops packed into one flat uint8 buffer plus their
  sizes, so one shared-memory tensor crosses from a worker and one copy goes to the device.
* **device side** (:class:`DeviceTransform`): each crop resized to ``image_size`` (bilinear with
  antialias, as PIL's resize does), a horizontal flip drawn per image from a generator on the
  device, conversion to float and ImageNet normalisation, on the batch's device.

Randomness: the crop box of image ``index`` for view ``view`` in epoch ``epoch`` is a pure function of
``(seed, epoch, index, view)`` (:func:`nat_ext.data.mix64`), so it is the same whatever the number
of workers, the batch composition, or an interruption and resume; the flips come from the
generator passed to :class:`DeviceTransform` (train.py's ``aug_gen``, whose state the checkpoint
holds), so a resumed run is bit-identical.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "mix64", "rrc_box", "center_box", "draft_scale", "load_crop",
           "FolderCrop", "CropBatch", "DeviceTransform"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_SALT = 0x5EEDC20B  # keeps the crop stream apart from the other users of --seed
_MASK64 = (1 << 64) - 1


def mix64(*parts: int) -> int:
    """A 63-bit hash of integers (splitmix64 rounds): the counter-based seed of one item's randomness.

    The same parts give the same value in every process, whatever else ran before, so anything
    drawn from it is a pure function of the parts (worker count and resume do not matter).
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        z = ((h ^ (int(p) & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        h = z ^ (z >> 31)
    return h >> 1


def rrc_box(width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.08, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``torchvision.transforms.RandomResizedCrop.get_params``'s algorithm, drawing from ``rng``.

    Same steps (ten tries of area x uniform(scale), log-uniform ratio, rounded sides, uniform
    corner; then the centre crop at the clamped ratio), so the same distribution of boxes; only
    the random stream differs (a seeded ``random.Random`` instead of torch's global generator).

    Args:
        width, height: the image's size in pixels.
        rng: the item's generator.
        scale, ratio: as in ``RandomResizedCrop``.

    Returns:
        (top, left, h, w) in pixels of the full-size image.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.randint(0, height - h)
            j = rng.randint(0, width - w)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_box(width: int, height: int, image_size: int) -> tuple[int, int, int, int]:
    """The region that ``Resize(image_size * 8 // 7)`` then ``CenterCrop(image_size)`` keeps, in
    pixels of the full-size image, rounded to whole pixels.

    Returns:
        (top, left, h, w).
    """
    short = image_size * 8 // 7
    # torchvision's Resize: the shorter side becomes `short`, the longer int(short * long / short_side)
    if width <= height:
        rw, rh = short, int(short * height / width)
    else:
        rw, rh = int(short * width / height), short
    top = int(round((rh - image_size) / 2.0))
    left = int(round((rw - image_size) / 2.0))
    sx, sy = width / rw, height / rh
    i, j = int(round(top * sy)), int(round(left * sx))
    h = max(1, min(height - i, int(round(image_size * sy))))
    w = max(1, min(width - j, int(round(image_size * sx))))
    return i, j, h, w


def draft_scale(box_h: int, box_w: int, image_size: int) -> int:
    """The largest DCT scale divisor s in (1, 2, 4, 8) with ``min(box_h, box_w) / s >= image_size``:
    decoded at 1/s the box still has at least ``image_size`` pixels on its shorter side, so the
    device only ever downsamples it (or keeps it) where the full-size decode would have too."""
    short = min(box_h, box_w)
    for s in (8, 4, 2):
        if short >= image_size * s:
            return s
    return 1


def load_crop(path: str, image_size: int, box: Callable[[int, int], tuple[int, int, int, int]],
              draft: bool = True, resize: bool = False) -> torch.Tensor:
    """Decode the region ``box`` of a JPEG (or any PIL image) as uint8 Tensor[h, w, 3].

    Args:
        path: the image file.
        image_size: S, the size the crop is resized to (on the device, or here).
        box: ``(width, height) -> (top, left, h, w)``, called with the full size read from the header.
        draft: decode JPEGs at the reduced scale of :func:`draft_scale` (PIL's ``draft``: libjpeg-turbo's
            DCT scaling, which also skips most of the inverse DCT work). The box is then resized to
            S x S here, by PIL on the reduced image (cheap: its shorter side is between S and 2S), with
            its exact fractional edges. False: always the full decode.
        resize: resize the box to S x S here in every case (PIL, bilinear with antialias, as
            torchvision's pipeline does): for a run whose "device" is the CPU, where PIL's uint8 resize
            is faster than ``F.interpolate``'s float one.

    Returns:
        uint8 Tensor[S, S, 3] when resized here, else the box cut out at full size, Tensor[h, w, 3].
    """
    with Image.open(path) as im:
        width, height = im.size
        i, j, h, w = box(width, height)
        s = draft_scale(h, w, image_size) if draft and im.format == "JPEG" else 1
        if s > 1:
            im.draft("RGB", (width // s, height // s))
        if im.mode != "RGB":
            im = im.convert("RGB")
        if s > 1 or resize:
            sx, sy = width / im.size[0], height / im.size[1]  # what libjpeg gave: ceil(width / s) pixels
            out = im.resize((image_size, image_size), Image.BILINEAR,
                            box=(j / sx, i / sy, (j + w) / sx, (i + h) / sy))
        else:
            out = im.crop((j, i, j + w, i + h))
        return torch.from_numpy(np.array(out))  # np.array copies: np.asarray of PIL is read-only


class FolderCrop:
    """The worker-side transform of image-folder items (picklable for workers).

    Args:
        image_size: S, the output size of the device step.
        augment: True: ``RandomResizedCrop`` boxes keyed by (seed, epoch, index, view); False: the
            evaluation centre crop (:func:`center_box`).
        seed: the run's ``--seed``.
        views: crops per item when augmenting.
        scale, ratio: ``RandomResizedCrop``'s ranges.
        draft, resize: see :func:`load_crop`.
    """

    def __init__(self, image_size: int, augment: bool, seed: int = 0, views: int = 1,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 draft: bool = True, resize: bool = False) -> None:
        self.image_size, self.augment, self.seed, self.views = image_size, augment, seed, views
        self.scale, self.ratio, self.draft, self.resize = scale, ratio, draft, resize

    def __call__(self, path: str, index: int, epoch: int) -> tuple[torch.Tensor, ...]:
        """The crops of image ``index`` in ``epoch``: a tuple of ``views`` uint8 Tensor[h, w, 3] (one
        without augmentation); the tuple tells :func:`nat_ext.data.collate` to make a :class:`CropBatch`."""
        if not self.augment:
            return (load_crop(path, self.image_size, lambda w, h: center_box(w, h, self.image_size),
                              self.draft, self.resize),)
        out = []
        for v in range(self.views):
            rng = random.Random(mix64(self.seed, _SALT, epoch, index, v))
            out.append(load_crop(path, self.image_size,
                                 lambda w, h: rrc_box(w, h, rng, self.scale, self.ratio), self.draft, self.resize))
        return tuple(out)


class CropBatch:
    """A batch of variable-size uint8 HWC crops packed in one buffer (what :func:`nat_ext.data.collate`
    makes of :class:`FolderCrop` items).

    Attributes:
        data: uint8 Tensor[total] every crop's pixels, HWC, one after the other.
        sizes: int64 Tensor[N, 2] (h, w) of each crop; N = views x images, view-major (all first
            views, then all second views), the order train.py uses for views.
        views: crops per image.
    """

    def __init__(self, data: torch.Tensor, sizes: torch.Tensor, views: int = 1) -> None:
        self.data, self.sizes, self.views = data, sizes, views

    @classmethod
    def pack(cls, crops: Sequence[torch.Tensor], views: int = 1) -> "CropBatch":
        """Pack uint8 Tensor[h, w, 3] crops (already view-major) into one buffer."""
        sizes = torch.tensor([c.shape[:2] for c in crops], dtype=torch.int64).view(-1, 2)
        data = torch.cat([c.reshape(-1) for c in crops]) if crops else torch.empty(0, dtype=torch.uint8)
        return cls(data, sizes, views)

    def __len__(self) -> int:
        return self.sizes.shape[0]

    def pin_memory(self) -> "CropBatch":  # called by DataLoader(pin_memory=True)
        return CropBatch(self.data.pin_memory(), self.sizes, self.views)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "CropBatch":
        """The batch with its pixels on ``device`` (sizes stay on the host: they are read to slice)."""
        return CropBatch(self.data.to(device, non_blocking=non_blocking), self.sizes, self.views)

    def crops(self) -> list[torch.Tensor]:
        """Views of the buffer as uint8 Tensor[h, w, 3], one per crop."""
        out, off = [], 0
        for h, w in self.sizes.tolist():
            out.append(self.data[off:off + h * w * 3].view(h, w, 3))
            off += h * w * 3
        return out


class DeviceTransform:
    """The device half of the pipeline: uint8 in, the model's float input out, in one call.

    ``x = DeviceTransform(image_size)(x.to(device), generator=aug_gen)`` where ``x`` is what the
    loader gave (after ``.to(device)``):

    * :class:`CropBatch`: each crop resized to S x S (``F.interpolate``, bilinear, antialias:
      the filter PIL's resize applies; skipped for crops already S x S);
    * uint8 Tensor[B, 3, S, S], or Tensor[B, V, 3, S, S] (views, returned view-major as Tensor[V * B, ...]);
    * a float tensor: returned as it is (data that the workers already normalised).

    then, with ``generator``, a horizontal flip of each image with probability 1/2 (one
    ``torch.rand(N)`` draw from ``generator`` per call: no host sync, state in the checkpoint), then
    ``(x / 255 - mean) / std`` in float32.

    Args:
        image_size: S.
        mean, std: per-channel normalisation (ImageNet's by default).
    """

    def __init__(self, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, x: "CropBatch | torch.Tensor", generator: torch.Generator | None = None) -> torch.Tensor:
        """Args:
            x: the loader's images, on the training device (see the class docstring).
            generator: draws the flips (on ``x``'s device); None: no flip (evaluation).

        Returns:
            float32 Tensor[N, 3, S, S] normalised, N = views x images (view-major).
        """
        if isinstance(x, CropBatch):
            x = self._resize(x)
        elif x.dtype != torch.uint8:
            return x
        else:
            if x.dim() == 5:
                x = x.transpose(0, 1).flatten(0, 1)
            x = x.float()
        if x.dim() != 4 or x.shape[1] != len(self.mean):
            raise ValueError(f"x should be Tensor[N, {len(self.mean)}, H, W], got {tuple(x.shape)}")
        if generator is not None:
            flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1) * 255.0
        inv = 1.0 / (torch.tensor(self.std, device=x.device).view(1, -1, 1, 1) * 255.0)
        return (x - mean) * inv

    def _resize(self, batch: CropBatch) -> torch.Tensor:
        s = self.image_size
        out = torch.empty(len(batch), 3, s, s, device=batch.data.device)
        for k, crop in enumerate(batch.crops()):
            c = crop.permute(2, 0, 1).unsqueeze(0).float()
            if crop.shape[0] == s and crop.shape[1] == s:
                out[k] = c[0]
            else:
                out[k] = F.interpolate(c, size=(s, s), mode="bilinear", align_corners=False, antialias=True)[0]
        # bilinear interpolation stays within the inputs' range, but rounding of antialias weights can
        # overshoot by a hair; keep the PIL pipeline's [0, 255]
        return out.clamp_(0, 255)
