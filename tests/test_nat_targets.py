"""Targets: deterministic rows from (seed, index), unit norm, roughly uniform, for both generators;
Philox against Random123's published answers; pcg64 against numpy directly (older runs' targets)."""
import numpy as np
import pytest
import torch

from conftest import cpu_and_cuda
from nat_ext.targets import GENERATORS, Targets, philox4x32, target_rows

# Random123's known-answer vectors for Philox4x32-10 (its tests/kat_vectors): counter, key, output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_philox_known_answers(device):
    counters = [torch.tensor([c[w] for c, _, _ in PHILOX_KAT], device=device) for w in range(4)]
    for k, (_, key, expected) in enumerate(PHILOX_KAT):
        words = philox4x32([c[k:k + 1] for c in counters], key)
        got = tuple(int(w) for w in words)
        assert got == expected, f"vector {k}: {[hex(x) for x in got]} != {[hex(x) for x in expected]}"


@pytest.mark.parametrize("generator", GENERATORS)
def test_rows_depend_only_on_seed_and_index(generator):
    seed = 11
    full = target_rows(seed, torch.arange(50), 16, generator)
    pick = torch.tensor([49, 3, 3, 17])
    again = target_rows(seed, pick, 16, generator)
    assert torch.equal(again, full[pick]), f"seed {seed}: rows differ when regenerated alone"
    other = target_rows(seed + 1, pick, 16, generator)
    assert not torch.allclose(other, again), "a different seed gave the same rows"
    odd = target_rows(seed, pick, 7, generator)  # d not a multiple of 4 (philox makes 4 a block)
    assert odd.shape == (4, 7) and torch.allclose(odd.norm(dim=1), torch.ones(4), atol=1e-6)


def test_philox_uses_the_whole_64_bit_index():
    seed = 2
    rows = target_rows(seed, torch.tensor([5, 5 + 2 ** 32, 2 ** 40 + 5]), 8, "philox")
    assert not torch.allclose(rows[0], rows[1]) and not torch.allclose(rows[1], rows[2]), \
        f"seed {seed}: indices equal mod 2^32 gave the same row"


def test_pcg64_rows_are_numpys_draws():
    # The targets of every run before the philox generator: numpy's PCG64 per row, normalised.
    seed, d = 4, 10
    rows = target_rows(seed, torch.tensor([0, 123]), d, "pcg64")
    for r, i in enumerate((0, 123)):
        z = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, i]))).standard_normal(d)
        assert torch.equal(rows[r], torch.from_numpy((z / np.linalg.norm(z)).astype(np.float32))), \
            f"seed {seed}: row {i} is not numpy's draw"


@pytest.mark.parametrize("generator", GENERATORS)
def test_unit_norm_and_centred(generator):
    seed = 3
    t = target_rows(seed, torch.arange(4000), 8, generator)
    assert torch.allclose(t.norm(dim=1), torch.ones(4000), atol=1e-5)
    # Uniform on the sphere: the mean is ~N(0, 1/(d n)) per coordinate, |mean| ~ 0.016 here.
    assert t.mean(0).norm() < 0.06, f"seed {seed}: mean {t.mean(0)}"
    # Coordinates are uncorrelated with variance 1/d.
    cov = t.t() @ t / 4000
    assert torch.allclose(cov, torch.eye(8) / 8, atol=0.02), f"seed {seed}: cov {cov}"


@pytest.mark.parametrize("generator", GENERATORS)
def test_materialized_and_from_seed_agree(generator):
    a = Targets(100, 12, seed=5, materialize=True, generator=generator)
    b = Targets(100, 12, seed=5, materialize=False, generator=generator)
    idx = torch.tensor([0, 99, 42, 7])
    assert torch.equal(a.rows(idx), b.rows(idx))
    assert b.matrix is None and b.state_dict() == {"n": 100, "d": 12, "seed": 5, "generator": generator,
                                                   "kind": "sphere", "num_prototypes": 0, "spread": 0.0}


@pytest.mark.cuda
def test_philox_rows_agree_across_devices():
    seed, idx = 9, torch.arange(0, 3000, 7)
    cpu = target_rows(seed, idx, 32, "philox")
    gpu = target_rows(seed, idx.cuda(), 32, "philox")
    assert gpu.device.type == "cuda"
    # The integer stream is identical; log/cos/sum may round differently: a few float32 ulps.
    assert torch.allclose(gpu.cpu(), cpu, rtol=0, atol=1e-6), f"seed {seed}: {(gpu.cpu() - cpu).abs().max()}"


def test_bad_arguments():
    with pytest.raises(ValueError, match="index"):
        Targets(10, 4, seed=0).rows(torch.tensor([10]))
    with pytest.raises(TypeError, match="seed"):
        target_rows(-1, [0], 4)
    with pytest.raises(ValueError, match="d should"):
        target_rows(0, [0], 0)
    with pytest.raises(ValueError, match="n should"):
        Targets(0, 4, seed=0)
    with pytest.raises(ValueError, match="generator"):
        Targets(10, 4, seed=0, generator="mt19937")
    with pytest.raises(ValueError, match="index should be non-negative"):
        target_rows(0, [-1], 4, "philox")
