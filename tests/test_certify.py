"""The certificate that follows every CUDA solve (torch.ops.nat.certify, csrc/lap/certify.h) and
what the plain ops do when a solver faults (csrc/solver_faults.h), on every device.

Oracles: scipy's optimum (any optimal assignment is tight against any optimal dual, so scipy's
assignment with our duals must pass), and nat_ext.check_optimality, the Python certificate written
independently of certify. Each injected fault must give 4.
"""

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

import nat_ext
from conftest import cpu_and_cuda
from nat_ext import faults as nat_faults

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def family(kind: str, B: int, n: int, m: int, g: torch.Generator) -> torch.Tensor:
    """Cost families with known hard spots: uniform, heavy ties, forbidden entries, NAT scores."""
    if kind == "uniform":
        return torch.rand(B, n, m, generator=g, dtype=torch.float64)
    if kind == "ties":
        return torch.randint(0, 3, (B, n, m), generator=g).double()
    if kind == "forbidden":  # +inf forbids a pair when minimising; every row keeps a way out
        c = torch.rand(B, n, m, generator=g, dtype=torch.float64)
        c[torch.rand(B, n, m, generator=g) < 0.3] = float("inf")
        c[:, torch.arange(n), torch.arange(n)] = torch.rand(B, n, generator=g, dtype=torch.float64)
        return c
    feats = torch.nn.functional.normalize(torch.randn(B, n, 16, generator=g, dtype=torch.float64), dim=-1)
    targets = torch.nn.functional.normalize(torch.randn(B, m, 16, generator=g, dtype=torch.float64), dim=-1)
    return feats @ targets.transpose(1, 2)


def solved(kind, B, n, m, maximize, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    cost = family(kind, B, n, m, g)
    if maximize:
        cost = torch.where(torch.isinf(cost), -cost, cost)  # forbidden is -inf when maximising
    cost = cost.to(dtype).to(device)
    col4row, u, v = nat_ext.solve_with_duals(cost, maximize)
    return cost, col4row, u, v


SHAPES = [(3, 6, 6), (2, 5, 9), (1, 40, 40), (2, 17, 30), (1, 1, 4)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("kind", ["uniform", "ties", "forbidden", "nat"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_certify_passes_every_optimum(device, maximize, kind, dtype):
    for seed, (B, n, m) in enumerate(SHAPES):
        cost, col4row, u, v = solved(kind, B, n, m, maximize, dtype, device, seed)
        verdict = nat_ext.certify(cost, col4row, v, maximize)
        assert verdict.device == cost.device and verdict.dtype == torch.int64
        assert verdict.tolist() == [0] * B, f"seed {seed}, shape {(B, n, m)}"
        # scipy's assignment (another optimum where there are ties) with our duals
        c = cost.double().cpu().numpy()
        scipy_cols = torch.stack([torch.from_numpy(scipy_lsa(c[b], maximize=maximize)[1]) for b in range(B)])
        assert nat_ext.certify(cost, scipy_cols.to(device), v, maximize).tolist() == [0] * B, f"seed {seed}"


def worse_swap(cost: torch.Tensor, col4row: torch.Tensor, maximize: bool) -> torch.Tensor:
    """col4row with, in every problem, the first two rows swapped whose swap loses at least 0.05
    (so the fault is clear of ties in every dtype)."""
    swapped = col4row.clone()
    c = cost.double().cpu() * (-1 if maximize else 1)
    x = col4row.cpu()
    for b in range(c.shape[0]):
        n = x.shape[1]
        pairs = [(i, k) for i in range(n) for k in range(i + 1, n)
                 if c[b, i, x[b, k]] + c[b, k, x[b, i]] > c[b, i, x[b, i]] + c[b, k, x[b, k]] + 0.05]
        i, k = pairs[0]
        swapped[b, [i, k]] = swapped[b, [k, i]]
    return swapped


def faults(cost: torch.Tensor, col4row: torch.Tensor, v: torch.Tensor, maximize: bool):
    """(name, col4row, v, cost) with one fault each, every one a wrong certificate."""
    n, m = cost.shape[-2:]
    out = []
    shared = col4row.clone()
    shared[:, 1] = shared[:, 0]
    out.append(("two rows share a column", shared, v, cost))
    for bad in (m, -1):
        far = col4row.clone()
        far[:, 0] = bad
        out.append((f"column {bad} out of range", far, v, cost))
    out.append(("two assignments swapped", worse_swap(cost, col4row, maximize), v, cost))
    inf_cost = cost.clone()
    inf_cost[torch.arange(cost.shape[0]), 0, col4row[:, 0]] = float("-inf") if maximize else float("inf")
    out.append(("an infinite assigned entry", col4row, v, inf_cost))
    nan_cost = cost.clone()
    nan_cost[:, -1, 0] = float("nan")
    out.append(("a NaN entry", col4row, v, nan_cost))
    # Moving the dual of row 0's column by 3 (more than the cost range) leaves row 0 a better
    # column (minimising) or makes that column every other row's best (maximising).
    shift = 1.0 if maximize else -1.0
    tilted = v.clone()
    tilted[torch.arange(cost.shape[0]), col4row[:, 0]] -= 3 * shift
    out.append(("a v that breaks feasibility", col4row, tilted, cost))
    nan_v = v.clone()
    nan_v[:, 0] = float("nan")
    out.append(("a NaN v", col4row, nan_v, cost))
    if m > n:  # an unassigned column priced below the assigned ones (above, when maximising)
        free = torch.ones_like(v, dtype=torch.bool)
        free.scatter_(1, col4row, False)
        cheap = torch.where(free, v + 5 * shift, v)
        out.append(("a free column's v below an assigned one's", col4row, cheap, cost))
    return out


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 6, 11)])
def test_certify_catches_every_injected_fault(device, maximize, dtype, shape):
    B, n, m = shape
    cost, col4row, u, v = solved("uniform", B, n, m, maximize, dtype, device, seed=7)
    assert nat_ext.certify(cost, col4row, v, maximize).tolist() == [0] * B
    for name, x, vv, c in faults(cost, col4row, v, maximize):
        got = nat_ext.certify(c, x, vv, maximize)
        assert got.tolist() == [4] * B, f"{name}: {got.tolist()}"
        if name != "a NaN entry":  # check_optimality skips non-finite entries it is not given
            # the Python certificate, written independently, agrees
            assert not nat_ext.check_optimality(c.cpu(), x.cpu(), u.cpu(), vv.cpu(), maximize), name
    # a fault in one problem of the batch marks that problem only
    one = col4row.clone()
    one[1] = worse_swap(cost, col4row, maximize)[1]
    assert nat_ext.certify(cost, one, v, maximize).tolist() == [0, 4] + [0] * (B - 2)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_certify_agrees_with_check_optimality(device):
    """Random perturbations of optimal answers: the C++ and the Python certificate agree on
    each (both pass, or both fail), 200 trials over shapes, senses and perturbations."""
    g = torch.Generator().manual_seed(3)
    disagreements = []
    for trial in range(200):
        n = int(torch.randint(1, 12, (1,), generator=g))
        m = n + int(torch.randint(0, 4, (1,), generator=g))
        maximize = bool(trial % 2)
        cost = torch.randint(0, 4, (n, m), generator=g).double()  # ties: many optima
        x, u, v = nat_ext.solve_with_duals(cost, maximize)
        if trial % 3 == 1:  # another assignment, often optimal too given the ties
            x = torch.randperm(m, generator=g)[:n]
        elif trial % 3 == 2:
            v = v + torch.randint(-1, 2, (m,), generator=g).double() * 0.5
        # u from v, the certificate's own choice: each row's best reduced cost
        reduced = (cost - v) * (-1 if maximize else 1)
        u = reduced.min(dim=1).values * (-1 if maximize else 1)
        ours = nat_ext.certify(cost.to(device), x.to(device), v.to(device), maximize).item() == 0
        python = nat_ext.check_optimality(cost, x, u, v, maximize)
        if ours != python:
            disagreements.append((trial, ours, python))
    assert not disagreements


def test_certify_tolerance_scales_with_dtype():
    """A gain of 1e-7 is an error in float64 (no v can certify it: the proof is good to n * tol,
    about 5e-9 here) and within float32's resolution; a gain of 1e-5 is an error in both."""
    cost = torch.tensor([[0.0, 0.5], [-0.5 + 1e-6, 0.0]], dtype=torch.float64)
    x, u, v = nat_ext.solve_with_duals(cost)  # the identity, better by 1e-6 than the swap
    assert x.tolist() == [0, 1]
    worse = cost.clone()
    worse[1, 0] = -0.5 - 1e-7  # now the swap is better by 1e-7
    assert nat_ext.certify(worse, x, v).item() == 4
    assert nat_ext.certify(worse.float(), x, v).item() == 0
    worse[1, 0] = -0.5 - 1e-5
    assert nat_ext.certify(worse.float(), x, v).item() == 4


def test_certify_unbatched_and_empty():
    cost = torch.rand(4, 6, dtype=torch.float64)
    x, _, v = nat_ext.solve_with_duals(cost)
    assert nat_ext.certify(cost, x, v).shape == ()
    empty = torch.zeros(0, 5, 5)
    assert nat_ext.certify(empty, torch.zeros(0, 5, dtype=torch.int64), torch.zeros(0, 5)).shape == (0,)
    no_rows = torch.zeros(0, 3)
    assert nat_ext.certify(no_rows, torch.zeros(0, dtype=torch.int64), torch.zeros(3)).item() == 0


# --- what a plain op does with a solver fault: nat::_certify_or_fall_back on a wrong answer -----

fall_back = torch.ops.nat._certify_or_fall_back


@pytest.fixture
def fresh_warning(monkeypatch, tmp_path):
    """The next fault warns again; the saved problem goes to tmp_path."""
    nat_ext._C._reset_fallback_warning()
    monkeypatch.setenv("NAT_FAULT_DIR", str(tmp_path))
    return tmp_path


def wrong_answer(device):
    g = torch.Generator().manual_seed(11)
    cost = torch.rand(3, 7, 7, generator=g, dtype=torch.float64).to(device)
    x, _, v = nat_ext.solve_with_duals(cost)
    wrong = x.clone()
    wrong[1, [2, 5]] = wrong[1, [5, 2]]
    return cost, x, wrong, v


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_fallback_cpu_resolves_warns_once_and_counts(device, monkeypatch, fresh_warning):
    monkeypatch.delenv("NAT_CUDA_FALLBACK", raising=False)  # the default is cpu
    cost, right, wrong, v = wrong_answer(device)
    before = nat_ext.cuda_fallback_count()
    with pytest.warns(UserWarning, match=r"failed on batch item 1 \(status 4, certificate failed\)"
                                         r".*re-solved on the CPU.*saved to ") as record:
        fixed = fall_back(cost, wrong, v, False)
    assert torch.equal(fixed, right) and fixed.device == cost.device
    assert nat_ext.cuda_fallback_count() == before + 1
    saved = list(fresh_warning.glob("nat_ext_fault_*.pt"))
    assert len(saved) == 1 and str(saved[0]) in str(record[0].message)
    op, problem, maximize, status = torch.load(saved[0], weights_only=True)
    assert op == "_certify_or_fall_back" and torch.equal(problem, cost[1].cpu())
    assert maximize is False and status == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second fault is counted, not warned about
        again = fall_back(cost, wrong, v, False)
    assert torch.equal(again, right) and nat_ext.cuda_fallback_count() == before + 2
    # a right answer passes through untouched and uncounted
    assert torch.equal(fall_back(cost, right, v, False), right)
    assert nat_ext.cuda_fallback_count() == before + 2


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_fallback_raise_names_item_status_and_the_way_out(device, monkeypatch, fresh_warning):
    monkeypatch.setenv("NAT_CUDA_FALLBACK", "raise")
    cost, right, wrong, v = wrong_answer(device)
    with pytest.raises(RuntimeError, match=r"failed on batch item 1 \(status 4, certificate failed\)"
                                           r".*Set NAT_CUDA_FALLBACK=cpu"):
        fall_back(cost, wrong, v, False)
    with pytest.raises(RuntimeError, match=r"failed on the problem \(status 4"):
        fall_back(cost[1], wrong[1], v[1], False)
    monkeypatch.setenv("NAT_CUDA_FALLBACK", "gpu")
    with pytest.raises(ValueError, match=r"NAT_CUDA_FALLBACK should be 'cpu' or 'raise', got 'gpu'"):
        fall_back(cost, wrong, v, False)


def test_python_reads_the_statuses_and_settings_of_the_library(monkeypatch):
    # one definition, in C++ (lap/status.h, solver_faults.h): Python's names are the library's
    assert nat_faults.STATUS_NAMES == {0: "solved", 1: "infeasible", 2: "invalid entry", 3: "iteration limit",
                                       4: "certificate failed"}
    assert nat_faults.SOLVER_FAULTS == (3, 4)
    monkeypatch.delenv("NAT_CUDA_FALLBACK", raising=False)
    monkeypatch.delenv("NAT_CUDA_TIMEOUT_S", raising=False)
    assert nat_faults.fallback_mode() == "cpu" and nat_faults._timeout_seconds() == 300.0
    for value, seconds in [("30", 30.0), ("0.5", 0.5), ("0", 0.0), ("-1", -1.0), ("inf", float("inf"))]:
        monkeypatch.setenv("NAT_CUDA_TIMEOUT_S", value)
        assert nat_faults._timeout_seconds() == seconds
    monkeypatch.setenv("NAT_CUDA_FALLBACK", "raise")
    assert nat_faults.fallback_mode() == "raise"


@pytest.mark.parametrize("value", ["gpu", "", "CPU"])
def test_bad_fallback_setting_same_error_from_python_and_the_op(value, monkeypatch):
    monkeypatch.setenv("NAT_CUDA_FALLBACK", value)
    cost, _, wrong, v = wrong_answer("cpu")
    with pytest.raises(ValueError, match=f"^NAT_CUDA_FALLBACK should be 'cpu' or 'raise', got '{value}'$") as py:
        nat_faults.fallback_mode()
    with pytest.raises(ValueError) as op:  # the C++ op, on a problem that needs the setting
        fall_back(cost, wrong, v, False)
    assert str(op.value) == str(py.value)


@pytest.mark.parametrize("value", ["soon", "", "30 s", "nan"])
def test_bad_timeout_setting_same_error_from_python_and_the_op(value, monkeypatch):
    monkeypatch.setenv("NAT_CUDA_TIMEOUT_S", value)
    with pytest.raises(ValueError, match=f"^NAT_CUDA_TIMEOUT_S should be a number of seconds, got '{value}'$") as py:
        nat_faults._timeout_seconds()
    with pytest.raises(ValueError) as op:
        torch.ops.nat._solver_settings()
    assert str(op.value) == str(py.value)


# --- the CUDA solvers: certified on the device, bounded waits -------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("solver", ["jv", "auction"])
@pytest.mark.parametrize("n", [64, 300, 1100])
def test_cuda_solves_pass_their_own_certificate(solver, n):
    """Every CUDA solve is certified on the device; its answer passes the CPU certificate too and
    equals the host run of the same source bit for bit."""
    g = torch.Generator().manual_seed(n)
    cost = torch.rand(2 if n < 1000 else 1, n, n, generator=g, dtype=torch.float64)
    col4row, info = nat_ext.linear_sum_assignment_ex(cost.cuda(), solver=solver)
    assert info.tolist() == [0] * cost.shape[0]
    x, u, v = nat_ext.solve_with_duals(cost.cuda(), solver=solver)
    assert nat_ext.certify(cost, x.cpu(), v.cpu()).tolist() == [0] * cost.shape[0]
    hx, hu, hv = torch.ops.nat._linear_sum_assignment_team(cost, False, 1, solver)
    assert torch.equal(x.cpu(), hx) and torch.equal(u.cpu(), hu) and torch.equal(v.cpu(), hv)


@pytest.mark.cuda
def test_cuda_timeout_setting_is_checked(monkeypatch):
    # the CUDA op's wait (C++) and Python's (nat_ext.faults) refuse a bad value with the same message
    monkeypatch.setenv("NAT_CUDA_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="NAT_CUDA_TIMEOUT_S should be a number of seconds, got 'soon'") as op:
        nat_ext.linear_sum_assignment(torch.rand(4, 4, device="cuda"))
    with pytest.raises(ValueError) as py:
        nat_faults.wait_for_device("cuda", "the test's work")
    assert str(py.value) == str(op.value)
    monkeypatch.setenv("NAT_CUDA_TIMEOUT_S", "30")
    rows, cols = nat_ext.linear_sum_assignment(torch.rand(4, 4, device="cuda"))
    assert sorted(cols.tolist()) == [0, 1, 2, 3]
