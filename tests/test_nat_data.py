"""Data: IDX reading, missing-file message, corrupt images, batched augmentation, batching."""
import gzip
import os
import struct

import pytest
import torch
from PIL import Image

from nat_ext import data as nat_data
from nat_ext.data import batch_augment, collate, get_dataset, read_idx
from nat_ext.train import epoch_batches


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def test_read_idx_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (7, 5, 3), generator=g, dtype=torch.uint8)
    _write_idx(str(tmp_path / "x.gz"), a)
    assert torch.equal(read_idx(str(tmp_path / "x.gz")), a)


def test_fashion_mnist_from_a_folder_and_missing_files(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte.gz"),
                   torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8))
        _write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte.gz"),
                   torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8))
    monkeypatch.setattr(nat_data, "FASHION_MNIST_DIR", str(tmp_path))
    ds, info = get_dataset("fashion-mnist", "train", augment=True, limit=20)
    assert len(ds) == 20 and info.num_classes == 10
    x, y, idx = ds.__getitems__([3, 5])
    assert x.shape == (2, 1, 28, 28) and torch.equal(idx, torch.tensor([3, 5]))
    monkeypatch.setattr(nat_data, "FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        get_dataset("fashion-mnist", "test", augment=False)


def _image_folder(root, n_per_class=3, corrupt=None):
    g = torch.Generator().manual_seed(2)
    for c in ("a", "b"):
        os.makedirs(root / c, exist_ok=True)
        for i in range(n_per_class):
            arr = torch.randint(0, 256, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")
    if corrupt:
        (root / "b" / corrupt).write_bytes(b"not a png at all")


def test_corrupt_image_is_named_or_skipped(tmp_path):
    _image_folder(tmp_path, corrupt="broken.png")
    ds, info = get_dataset(str(tmp_path), "train", augment=False, image_size=16)
    bad = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png"))
    with pytest.raises(RuntimeError, match="broken.png"):
        ds[bad]
    ds, _ = get_dataset(str(tmp_path), "train", augment=True, image_size=16, skip_corrupt=True)
    x, y, idx, skipped = collate([ds[i] for i in range(len(ds))])
    assert skipped == 1 and x.shape == (len(ds) - 1, 3, 16, 16) and bad not in idx.tolist()


def test_batch_augment_full_crop_is_identity_or_flip():
    seed = 3
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 1, 12, 12, generator=g)
    y = batch_augment(x, torch.Generator().manual_seed(seed), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for i in range(16):
        ok = torch.allclose(y[i], x[i], atol=1e-5) or torch.allclose(y[i], x[i].flip(-1), atol=1e-5)
        assert ok, f"seed {seed}: sample {i} is neither the image nor its mirror"
    z = batch_augment(x, torch.Generator().manual_seed(seed))
    assert z.shape == x.shape and not torch.allclose(z, x)


def test_epoch_batches_split_ranks_disjointly():
    b0 = epoch_batches(103, 8, seed=0, epoch=2, rank=0, world=2)
    b1 = epoch_batches(103, 8, seed=0, epoch=2, rank=1, world=2)
    assert len(b0) == len(b1) == 6
    flat0, flat1 = sum(b0, []), sum(b1, [])
    assert not set(flat0) & set(flat1) and len(set(flat0)) == 48
    assert b0 == epoch_batches(103, 8, seed=0, epoch=2, rank=0, world=2)
    assert b0 != epoch_batches(103, 8, seed=0, epoch=3, rank=0, world=2)
    with pytest.raises(ValueError, match="--batch-size should be at most the 5 images per process, got 8"):
        epoch_batches(10, 8, seed=0, epoch=0, world=2)
