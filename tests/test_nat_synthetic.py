"""The ``synthetic:N`` data source: ImageNet-shaped, deterministic, nothing stored per image."""
import pytest
import torch
from torch.utils.data import DataLoader

from nat_ext.data import SyntheticImages, collate, get_dataset, synthetic_size


def test_info_sizes_and_val_rule():
    ds, info = get_dataset("synthetic:1000", "train", augment=True, image_size=32)
    assert len(ds) == 1000
    assert (info.in_channels, info.num_classes, info.image_size, info.small_input) == (3, 1000, 32, True)
    val, vinfo = get_dataset("synthetic:1000", "test", augment=False, image_size=96)
    assert len(val) == 40 and not vinfo.small_input
    assert synthetic_size(1_281_167, "test") == 50_000 and synthetic_size(1_281_167, "train") == 1_281_167
    assert synthetic_size(10, "test") == 1  # at least one image
    big, _ = get_dataset("synthetic:1,281,167", "train", augment=True, image_size=8)
    assert len(big) == 1_281_167 and big[1_281_166][0].shape == (3, 8, 8)  # no O(N) work anywhere
    lim, _ = get_dataset("synthetic:1000", "train", augment=True, limit=100)
    assert len(lim) == 100
    for bad in ("synthetic:", "synthetic:x", "synthetic:0"):
        with pytest.raises(ValueError, match="synthetic:N"):
            get_dataset(bad, "train", augment=True)


@pytest.mark.parametrize("size", [1, 17, 64, 224])
def test_shapes_dtypes_labels(size):
    ds = SyntheticImages(50, "train", image_size=size, seed=3, uint8=True)
    for i in (0, 7, 49):
        x, y, idx = ds[i]
        assert x.dtype == torch.uint8 and x.shape == (3, size, size) and idx == i
        assert 0 <= y < 1000
    f, _, _ = SyntheticImages(50, "train", image_size=size, seed=3)[7]
    assert f.dtype == torch.float32 and f.shape == (3, size, size)
    v, _, _ = SyntheticImages(50, "train", image_size=size, seed=3, uint8=True, views=2)[7]
    assert v.shape == (2, 3, size, size) and torch.equal(v[0], ds[7][0])
    with pytest.raises(IndexError):
        ds[50]


def test_labels_cover_the_classes():
    ds = SyntheticImages(20_000, "train", image_size=4)
    labels = torch.tensor([ds.label(i) for i in range(20_000)])
    assert labels.min() >= 0 and labels.max() < 1000 and labels.unique().numel() > 990


def test_deterministic_and_seeds_differ():
    a = SyntheticImages(100, "train", image_size=32, seed=5, uint8=True)
    b = SyntheticImages(100, "train", image_size=32, seed=5, uint8=True)
    assert torch.equal(a[11][0], a[11][0]) and torch.equal(a[11][0], b[11][0]) and a[11][1] == b[11][1]
    c = SyntheticImages(100, "train", image_size=32, seed=6, uint8=True)
    assert not torch.equal(a[11][0], c[11][0])
    assert [a.label(i) for i in range(100)] != [c.label(i) for i in range(100)]
    assert not torch.equal(a[11][0], a[12][0])
    t = SyntheticImages(100, "test", image_size=32, seed=5, uint8=True)
    assert not torch.equal(a[11][0], t[11][0])  # the split is part of the key
    x = a[11][0].float()
    assert x.std() > 10  # not a constant image


def test_same_items_across_worker_processes():
    ds = SyntheticImages(64, "train", image_size=16, seed=2, uint8=True)
    batches = [list(range(i, i + 8)) for i in range(0, 64, 8)][::-1]
    loader = DataLoader(ds, batch_sampler=batches, num_workers=2, collate_fn=collate)
    got = {}
    for x, y, idx, _ in loader:
        for k in range(len(idx)):
            got[int(idx[k])] = (x[k], int(y[k]))
    for i in range(64):
        assert torch.equal(got[i][0], ds[i][0]) and got[i][1] == ds[i][1], f"image {i}"
