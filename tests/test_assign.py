"""nat::assign (the NAT batch reassignment) against feats @ targets.T solved by scipy."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

import nat_ext
from conftest import cpu_and_cuda


def sphere(g, *shape, dtype=torch.float32):
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype)


def reference_score(feats, targets):
    """Scipy's optimum of the score matrix, computed in float64 from the inputs as stored."""
    scores = (feats.double() @ targets.double().transpose(-1, -2)).numpy()
    rows, cols = scipy_lsa(scores, maximize=True)
    return scores, scores[rows, cols].sum()


def check_assignment(feats, targets, idx, seed):
    n, m = feats.shape[-2], targets.shape[-2]
    assert idx.shape == (n,) and idx.dtype == torch.int64, f"seed {seed}"
    assert len(set(idx.tolist())) == n and all(0 <= j < m for j in idx.tolist()), f"seed {seed}"
    scores, best = reference_score(feats, targets)
    got = scores[np.arange(n), idx.numpy()].sum()
    # float32 scores round each entry by ~1e-7, so near-ties may resolve either way.
    tol = 1e-9 if feats.dtype == torch.float64 else 1e-5 * n
    assert got >= best - tol, f"seed {seed}: {got} < optimum {best}"


def assign_on(device, feats, targets):
    """nat_ext.assign with the inputs on `device`; the answer comes back on the CPU."""
    idx = nat_ext.assign(feats.to(device), targets.to(device))
    assert idx.device.type == device
    return idx.cpu()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (16, 16, 8), (64, 64, 32), (256, 256, 64),
                                   (50, 80, 16), (0, 5, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_assign_matches_scipy(n, m, d, dtype, device):
    seed = n * 1000 + m + d
    g = torch.Generator().manual_seed(seed)
    feats, targets = sphere(g, n, d, dtype=dtype), sphere(g, m, d, dtype=dtype)
    check_assignment(feats, targets, assign_on(device, feats, targets), seed)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_assign_batched(device):
    g = torch.Generator().manual_seed(3)
    feats, targets = sphere(g, 5, 40, 16), sphere(g, 5, 48, 16)
    idx = assign_on(device, feats, targets)
    assert idx.shape == (5, 40)
    for b in range(5):
        check_assignment(feats[b], targets[b], idx[b], b)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_assign_recovers_a_planted_permutation(device):
    g = torch.Generator().manual_seed(4)
    targets = sphere(g, 128, 32)
    perm = torch.randperm(128, generator=g)
    feats = targets[perm] + 0.01 * torch.randn(128, 32, generator=g)
    assert torch.equal(assign_on(device, feats, targets), perm)


def test_assign_minimises_squared_distance():
    """For unit vectors, max sum of dots == min sum of squared distances (the NAT loss)."""
    g = torch.Generator().manual_seed(5)
    feats, targets = sphere(g, 30, 8, dtype=torch.float64), sphere(g, 30, 8, dtype=torch.float64)
    idx = nat_ext.assign(feats, targets)
    dist = torch.cdist(feats, targets).pow(2).numpy()
    rows, cols = scipy_lsa(dist)
    assert abs(dist[np.arange(30), idx.numpy()].sum() - dist[rows, cols].sum()) < 1e-9


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_assign_non_contiguous(device):
    g = torch.Generator().manual_seed(6)
    feats = sphere(g, 40, 2, 16).to(device)[:, 1]
    targets = sphere(g, 16, 40).to(device).t()
    assert not feats.is_contiguous() and not targets.is_contiguous()
    check_assignment(feats.cpu(), targets.cpu(), nat_ext.assign(feats, targets).cpu(), 6)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_assign_errors(device):
    torch.set_default_device(device)  # every tensor made below, on `device`
    try:
        check_assign_errors()
    finally:
        torch.set_default_device("cpu")


def check_assign_errors():
    f, t = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="feats should be a 2-D .* got 1-D"):
        nat_ext.assign(torch.randn(4), t)
    with pytest.raises(ValueError, match="targets should be 2-D like feats"):
        nat_ext.assign(f, t.unsqueeze(0))
    with pytest.raises(ValueError, match="same feature size d, got 3 and 2"):
        nat_ext.assign(f, torch.randn(5, 2))
    with pytest.raises(ValueError, match="same batch size B, got 2 and 3"):
        nat_ext.assign(torch.randn(2, 4, 3), torch.randn(3, 5, 3))
    with pytest.raises(ValueError, match="n <= m.*n=5, m=4"):
        nat_ext.assign(t, f)
    with pytest.raises(TypeError, match="feats should be float32.*got Int"):
        nat_ext.assign(f.int(), t.int())
    with pytest.raises(TypeError, match="targets should have the dtype of feats"):
        torch.ops.nat.assign(f, t.double())  # the op is strict; nat_ext.assign promotes
    for name, bad in [("feats", f.clone().index_fill_(0, torch.tensor([1]), float("nan"))),
                      ("targets", t.clone().index_fill_(0, torch.tensor([2]), float("-inf")))]:
        args = (bad, t) if name == "feats" else (f, bad)
        with pytest.raises(ValueError, match=f"{name} contains NaN or infinite"):
            nat_ext.assign(*args)
    with pytest.raises(ValueError, match="overflowed"):
        nat_ext.assign(torch.full((2, 2), 1e30), torch.full((2, 2), 1e30))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_assign_devices_agree(device):
    g = torch.Generator().manual_seed(8)
    feats, targets = sphere(g, 4, 256, 64), sphere(g, 4, 256, 64)
    idx = nat_ext.assign(feats.to(device), targets.to(device))
    assert idx.device.type == device
    for b in range(4):
        check_assignment(feats[b], targets[b], idx[b].cpu(), b)


@pytest.mark.cuda
def test_assign_different_devices_rejected():
    with pytest.raises(ValueError, match="same device"):
        nat_ext.assign(torch.randn(3, 2), torch.randn(3, 2, device="cuda"))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_assign_opcheck_and_compile(device):
    g = torch.Generator().manual_seed(9)
    feats, targets = sphere(g, 3, 10, 8).to(device), sphere(g, 3, 12, 8).to(device)
    torch.library.opcheck(torch.ops.nat.assign.default, (feats, targets))
    torch.library.opcheck(torch.ops.nat.assign.default, (feats[0], targets[0]))

    @torch.compile(fullgraph=True)
    def nat_step(f, t):
        f = torch.nn.functional.normalize(f, dim=-1)
        idx = torch.ops.nat.assign(f, t)
        return idx, (f - t.gather(1, idx.unsqueeze(-1).expand_as(f))).pow(2).sum()

    idx, loss = nat_step(feats[:, :, :], targets[:, :10])
    assert torch.equal(idx, nat_ext.assign(feats, targets[:, :10]))
