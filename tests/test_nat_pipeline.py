"""The input pipeline that feeds GPUs (nat_ext.presets and the loader helpers of nat_ext.data):
uint8 from the workers, the device step against torchvision's transforms, determinism, one
folder walk per process, the worker-count rule."""
import os
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from nat_ext import data as nat_data
from nat_ext import presets
from nat_ext.data import EpochBatches, collate, default_workers, get_dataset, make_loader
from nat_ext.presets import CropBatch, DeviceTransform, center_box, draft_scale, load_crop, rrc_box

NORM = T.Normalize(presets.IMAGENET_MEAN, presets.IMAGENET_STD)


def _jpeg_tree(root, n=8, size=(160, 120), seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for k in range(n):
            d = root / split / f"c{k % 2}"
            os.makedirs(d, exist_ok=True)
            low = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(size, Image.BICUBIC)
            px = (np.asarray(low, np.float32) + rng.normal(0, 12, (size[1], size[0], 3))).clip(0, 255)
            Image.fromarray(px.astype(np.uint8)).save(d / f"{k}.jpg", "JPEG", quality=90)
    return str(root)


def test_worker_items_are_uint8_crops_and_device_step_gives_normalised_floats(tmp_path):
    root = _jpeg_tree(tmp_path)
    ds, info = get_dataset(root, "train", augment=True, image_size=24, uint8=True, views=2)
    assert info.uint8 and info.in_channels == 3 and info.num_classes == 2
    item, label, idx = ds[(0, 3)]
    assert isinstance(item, tuple) and len(item) == 2 and idx == 3
    assert all(c.dtype == torch.uint8 and c.dim() == 3 and c.shape[2] == 3 for c in item)
    x, y, i, skipped = collate([ds[(0, k)] for k in range(4)])
    assert isinstance(x, CropBatch) and len(x) == 8 and x.views == 2 and skipped == 0
    assert x.data.dtype == torch.uint8 and x.data.numel() == int((x.sizes.prod(1) * 3).sum())
    # view-major: crop k is image k % 4's view k // 4
    assert torch.equal(x.crops()[5], ds[(0, 1)][0][1])
    out = DeviceTransform(24)(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (8, 3, 24, 24)
    assert -2.2 < float(out.min()) and float(out.max()) < 2.7  # ImageNet-normalised range
    syn, sinfo = get_dataset("synthetic:100", "train", augment=True, image_size=16, uint8=True, views=2)
    xs, _, _, _ = collate([syn[k] for k in range(3)])
    assert xs.dtype == torch.uint8 and xs.shape == (3, 2, 3, 16, 16)
    o = DeviceTransform(16)(xs)
    assert o.shape == (6, 3, 16, 16) and torch.allclose(o[4], NORM(xs[1, 1].float() / 255), atol=1e-5)
    f = torch.randn(2, 3, 4, 4)
    assert DeviceTransform(4)(f) is f  # already normalised: left alone


def test_device_flip_and_normalise_equal_torchvision():
    seed = 11
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (16, 3, 10, 10), generator=g, dtype=torch.uint8)
    out = DeviceTransform(10)(x, torch.Generator().manual_seed(seed))
    flips = torch.rand(16, generator=torch.Generator().manual_seed(seed)) < 0.5
    assert 0 < int(flips.sum()) < 16
    for k in range(16):
        img = TF.hflip(TF.to_pil_image(x[k])) if flips[k] else TF.to_pil_image(x[k])
        ref = NORM(TF.to_tensor(img))
        assert torch.allclose(out[k], ref, atol=1e-5), f"seed {seed}: image {k}"
    same = DeviceTransform(10)(x, torch.Generator().manual_seed(seed))
    assert torch.equal(out, same)


def test_device_resize_matches_pil_resized_crop(tmp_path):
    """Full decode, same box: our crop + device resize is PIL's crop + resize up to rounding."""
    root = _jpeg_tree(tmp_path, n=2)
    path = os.path.join(root, "train", "c0", "0.jpg")
    im = Image.open(path).convert("RGB")
    dt = DeviceTransform(32, mean=(0, 0, 0), std=(1 / 255,) * 3)  # output in 0-255 levels
    rng = random.Random(5)
    for _ in range(6):
        box = rrc_box(*im.size, rng)
        ref = torch.from_numpy(np.array(TF.resized_crop(im, *box, [32, 32]))).permute(2, 0, 1).float()
        ours = dt(CropBatch.pack([load_crop(path, 32, lambda w, h: box, draft=False)]))[0]
        diff = (ours - ref).abs()
        assert diff.mean() < 1.0 and diff.max() <= 3.0, f"box {box}: mean {diff.mean():.2f} max {diff.max():.1f}"
    # evaluation: Resize(36) + CenterCrop(32) of the 160 x 120 image resizes it to 48 x 36 and keeps
    # x 8..40, y 2..34 of that: x 26.67..133.33, y 6.67..113.33 of the source; ours rounds to whole pixels
    i, j, h, w = center_box(160, 120, 32)
    assert abs(j - 26.67) <= 0.5 and abs(j + w - 133.33) <= 1 and abs(i - 6.67) <= 0.5 and abs(i + h - 113.33) <= 1
    box = (i, j, h, w)
    ref = torch.from_numpy(np.array(TF.resized_crop(im, *box, [32, 32]))).permute(2, 0, 1).float()
    ours = dt(CropBatch.pack([load_crop(path, 32, lambda w, h: center_box(w, h, 32), draft=False)]))[0]
    assert (ours - ref).abs().mean() < 1.0


def test_dct_scaled_decode_is_close_and_large_enough(tmp_path):
    root = _jpeg_tree(tmp_path, n=2, size=(320, 240))
    path = os.path.join(root, "train", "c0", "0.jpg")
    assert draft_scale(240, 320, 32) == 4 and draft_scale(63, 200, 32) == 1 and draft_scale(64, 64, 32) == 2
    box = (0, 0, 240, 320)
    small = load_crop(path, 32, lambda w, h: box, draft=True)
    full = load_crop(path, 32, lambda w, h: box, draft=False)
    assert small.shape == (32, 32, 3) and full.shape == (240, 320, 3)  # reduced: resized in the worker
    dt = DeviceTransform(32, mean=(0, 0, 0), std=(1 / 255,) * 3)
    a, b = dt(CropBatch.pack([small]))[0], dt(CropBatch.pack([full]))[0]
    assert (a - b).abs().mean() < 3.0


def test_rrc_box_distribution_matches_torchvision():
    seed = 4
    rng = random.Random(seed)
    torch.manual_seed(seed)
    img = Image.new("RGB", (500, 375))
    ours = [rrc_box(500, 375, rng) for _ in range(3000)]
    theirs = [T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)]
    for i, j, h, w in ours:
        assert 0 <= i and 0 <= j and i + h <= 375 and j + w <= 500 and h > 0 and w > 0
    for k, name in ((2, "h"), (3, "w")):
        m_ours = np.mean([b[k] for b in ours])
        m_theirs = np.mean([b[k] for b in theirs])
        assert abs(m_ours - m_theirs) < 0.04 * m_theirs, f"seed {seed}: mean {name} {m_ours:.1f} vs {m_theirs:.1f}"
    area = lambda bs: np.mean([b[2] * b[3] for b in bs]) / (500 * 375)
    assert abs(area(ours) - area(theirs)) < 0.03


def test_crops_keyed_by_seed_epoch_index_and_same_in_workers(tmp_path):
    root = _jpeg_tree(tmp_path)
    ds, _ = get_dataset(root, "train", augment=True, image_size=16, uint8=True, seed=3)
    again, _ = get_dataset(root, "train", augment=True, image_size=16, uint8=True, seed=3)
    other, _ = get_dataset(root, "train", augment=True, image_size=16, uint8=True, seed=4)
    assert torch.equal(ds[(2, 5)][0][0], again[(2, 5)][0][0])
    assert not torch.equal(ds[(2, 5)][0][0], ds[(3, 5)][0][0])  # a new crop each epoch
    assert not torch.equal(ds[(2, 5)][0][0], other[(2, 5)][0][0])
    ds.set_epoch(2)
    assert torch.equal(ds[5][0][0], ds[(2, 5)][0][0])  # plain index: the dataset's epoch
    sampler = EpochBatches(lambda e: [[0, 1, 2, 3], [4, 5, 6, 7]][::1 if e % 2 == 0 else -1])
    loader = make_loader(ds, sampler, "cpu", workers=2, prefetch_factor=2)
    assert loader.persistent_workers
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        for x, _, idx, _ in loader:
            for k, i in enumerate(idx.tolist()):
                assert torch.equal(x.crops()[k], ds[(epoch, i)][0][0]), f"epoch {epoch} image {i}"
    sampler.set_epoch(1, start_step=1)
    assert len(sampler) == 1 and [list(b) for b in sampler] == [[(1, 0), (1, 1), (1, 2), (1, 3)]]
    assert list(EpochBatches(lambda e: [[e, 1]], keys=False)) == [[0, 1]]


def test_folder_walked_once_per_process(tmp_path, monkeypatch):
    root = _jpeg_tree(tmp_path)
    monkeypatch.setattr(nat_data, "_SCANS", {})
    before = nat_data.SCAN_COUNT
    a, _ = get_dataset(root, "train", augment=True, image_size=16, uint8=True)
    b, _ = get_dataset(root, "train", augment=False, image_size=16)
    c, _ = get_dataset(root, "train", augment=False, image_size=16, limit=3)
    assert nat_data.SCAN_COUNT == before + 1
    assert a.samples == b.samples and len(c) == 3 and len(a.samples) == 8
    get_dataset(root, "test", augment=False, image_size=16)  # the val folder: its own walk
    assert nat_data.SCAN_COUNT == before + 2
    # items read the frozen flat arrays (no per-item Python objects for workers to touch)
    assert c._paths is not None and [os.fsdecode(p) for p in c._paths] == [p for p, _ in c.samples]
    assert [c[k][1] for k in range(3)] == [lab for _, lab in c.samples]


def test_corrupt_image_skipped_in_the_uint8_path(tmp_path):
    root = _jpeg_tree(tmp_path, n=4)
    (tmp_path / "train" / "c1" / "bad.jpg").write_bytes(b"not a jpeg")
    ds, _ = get_dataset(root, "train", augment=True, image_size=16, uint8=True, skip_corrupt=True)
    x, _, idx, skipped = collate([ds[(0, i)] for i in range(len(ds))])
    assert skipped == 1 and len(x) == len(ds) - 1
    ds, _ = get_dataset(root, "train", augment=True, image_size=16, uint8=True)
    bad = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("bad.jpg"))
    with pytest.raises(RuntimeError, match="bad.jpg"):
        ds[(0, bad)]


@pytest.mark.parametrize("cpus, local, expected", [(16, 1, 15), (128, 8, 15), (64, 1, 16), (2, 1, 1),
                                                    (1, 1, 0), (4, 4, 0), (16, 8, 1)])
def test_default_workers_rule(cpus, local, expected):
    assert default_workers(local, cpu_count=cpus) == expected


def test_make_loader_without_workers_and_pinning_rule():
    ds, _ = get_dataset("synthetic:40", "train", augment=True, image_size=8, uint8=True)
    sampler = EpochBatches(lambda e: [list(range(0, 8)), list(range(8, 16))])
    loader = make_loader(ds, sampler, "cpu", workers=0)
    assert loader.num_workers == 0 and not loader.pin_memory
    batches = list(loader)
    assert len(batches) == 2 and batches[1][0].shape == (8, 3, 8, 8) and batches[1][2].tolist() == list(range(8, 16))


@pytest.mark.cuda
def test_device_step_on_cuda_equals_cpu(tmp_path):
    root = _jpeg_tree(tmp_path)
    ds, _ = get_dataset(root, "train", augment=True, image_size=24, uint8=True)
    x, _, _, _ = collate([ds[(0, k)] for k in range(4)])
    cpu = DeviceTransform(24)(x)
    gpu = DeviceTransform(24)(x.pin_memory().to("cuda", non_blocking=True))
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-3)


def test_interrupted_and_resumed_epoch_gives_the_same_batches(tmp_path):
    """The loop's contract: crops keyed by (seed, epoch, index, view), flips from a generator whose
    state is checkpointed; resuming at step k reproduces steps k.. bit for bit."""
    root = _jpeg_tree(tmp_path)
    ds, _ = get_dataset(root, "train", augment=True, image_size=16, uint8=True, seed=7, views=2)
    batches_of = lambda e: [[(k + e) % 8 for k in range(4 * s, 4 * s + 4)] for s in range(2)]
    finish = DeviceTransform(16)

    def run(start_step, gen, stop_after=None, workers=0):
        sampler = EpochBatches(batches_of)
        loader = make_loader(ds, sampler, "cpu", workers=workers, prefetch_factor=2)
        out = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch, start_step if epoch == 0 else 0)
            for x, _, idx, _ in loader:
                out.append(finish(x, gen))
                if len(out) == stop_after:
                    return out
        return out

    gen = torch.Generator().manual_seed(7919)
    whole = run(0, gen, workers=1)  # the worker count does not matter either
    gen = torch.Generator().manual_seed(7919)
    first = run(0, gen, stop_after=1)  # interrupted after step 1: its generator state is checkpointed
    state = gen.get_state()
    gen2 = torch.Generator()
    gen2.set_state(state)
    resumed = run(1, gen2)
    assert len(whole) == 4 and len(resumed) == 3
    for a, b in zip(whole, first + resumed):
        assert torch.equal(a, b)
    assert not torch.equal(whole[0], whole[2])  # epoch 1 differs from epoch 0
