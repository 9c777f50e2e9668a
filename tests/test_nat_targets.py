"""Targets: deterministic rows from (seed, index), unit norm, roughly uniform."""
import pytest
import torch

from nat_ext.targets import Targets, target_rows


def test_rows_depend_only_on_seed_and_index():
    seed = 11
    full = target_rows(seed, torch.arange(50), 16)
    pick = torch.tensor([49, 3, 3, 17])
    again = target_rows(seed, pick, 16)
    assert torch.equal(again, full[pick]), f"seed {seed}: rows differ when regenerated alone"
    other = target_rows(seed + 1, pick, 16)
    assert not torch.allclose(other, again), "a different seed gave the same rows"


def test_unit_norm_and_centred():
    seed = 3
    t = target_rows(seed, torch.arange(4000), 8)
    assert torch.allclose(t.norm(dim=1), torch.ones(4000), atol=1e-5)
    # Uniform on the sphere: the mean is ~N(0, 1/(d n)) per coordinate, |mean| ~ 0.016 here.
    assert t.mean(0).norm() < 0.06, f"seed {seed}: mean {t.mean(0)}"
    # Coordinates are uncorrelated with variance 1/d.
    cov = t.t() @ t / 4000
    assert torch.allclose(cov, torch.eye(8) / 8, atol=0.02), f"seed {seed}: cov {cov}"


def test_materialized_and_from_seed_agree():
    a = Targets(100, 12, seed=5, materialize=True)
    b = Targets(100, 12, seed=5, materialize=False)
    idx = torch.tensor([0, 99, 42, 7])
    assert torch.equal(a.rows(idx), b.rows(idx))
    assert b.matrix is None and b.state_dict() == {"n": 100, "d": 12, "seed": 5}


def test_bad_arguments():
    with pytest.raises(ValueError, match="index"):
        Targets(10, 4, seed=0).rows(torch.tensor([10]))
    with pytest.raises(TypeError, match="seed"):
        target_rows(-1, [0], 4)
    with pytest.raises(ValueError, match="d should"):
        target_rows(0, [0], 0)
    with pytest.raises(ValueError, match="n should"):
        Targets(0, 4, seed=0)
