"""nat::linear_sum_assignment and the scipy drop-in, against scipy and dual certificates."""

import itertools
import zlib

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

import nat_ext
from conftest import cpu_and_cuda

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def total(cost: np.ndarray, rows, cols) -> float:
    return float(np.asarray(cost, dtype=np.float64)[rows, cols].sum())


def assert_same_optimum(cost: np.ndarray, rows, cols, maximize=False, seed=None):
    """Our assignment is valid and its total equals scipy's optimum (indices may differ on ties)."""
    c64 = np.asarray(cost, dtype=np.float64)
    ref_rows, ref_cols = scipy_lsa(c64, maximize=maximize)
    rows, cols = np.asarray(rows), np.asarray(cols)
    assert len(rows) == len(ref_rows) == min(c64.shape), f"seed {seed}"
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols), f"seed {seed}"
    assert np.all(np.diff(rows) > 0), f"row_ind must be sorted (seed {seed})"
    expected = total(c64, ref_rows, ref_cols)
    got = total(c64, rows, cols)
    assert abs(got - expected) <= 1e-9 * (1 + abs(expected)), f"seed {seed}: {got} vs {expected}"


def solve_on(device, cost, maximize=False):
    """nat_ext.linear_sum_assignment on `device`: numpy in and out on the CPU (the drop-in's
    path), a tensor on the GPU; returns numpy (rows, cols) either way."""
    if device == "cpu":
        return nat_ext.linear_sum_assignment(cost, maximize=maximize)
    rows, cols = nat_ext.linear_sum_assignment(torch.as_tensor(cost).to(device), maximize=maximize)
    assert rows.device.type == cols.device.type == device
    return rows.cpu().numpy(), cols.cpu().numpy()


def random_cost(rng, n, m, kind):
    if kind == "uniform":
        return rng.random((n, m))
    if kind == "ties":  # integer costs from a tiny range: many optimal assignments
        return rng.integers(0, 4, size=(n, m)).astype(np.float64)
    if kind == "normal":
        return rng.standard_normal((n, m)) * 1e3
    raise AssertionError(kind)


SIZES = [(0, 0), (0, 5), (5, 0), (1, 1), (1, 7), (7, 1), (2, 3), (5, 5), (8, 13), (13, 8), (32, 32),
         (50, 120), (120, 50), (100, 100), (255, 256), (300, 300), (300, 173), (64, 300)]


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("n,m", SIZES)
@pytest.mark.parametrize("kind", ["uniform", "ties", "normal"])
@pytest.mark.parametrize("maximize", [False, True])
def test_matches_scipy_optimum(n, m, kind, maximize, device):
    seed = zlib.crc32(repr((n, m, kind, maximize)).encode())
    rng = np.random.default_rng(seed)
    for _ in range(3):
        cost = random_cost(rng, n, m, kind)
        rows, cols = solve_on(device, cost, maximize)
        assert isinstance(rows, np.ndarray) and rows.dtype == np.int64 and cols.dtype == np.int64
        assert_same_optimum(cost, rows, cols, maximize, seed)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("seed", range(40))
def test_many_random_sizes(seed, device):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(0, 301, size=2)
    cost = random_cost(rng, n, m, ["uniform", "ties", "normal"][seed % 3])
    rows, cols = solve_on(device, cost, bool(seed % 2))
    assert_same_optimum(cost, rows, cols, bool(seed % 2), seed)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(64, 64), (40, 90), (90, 40)])
def test_dtypes(dtype, n, m, device):
    seed = 7
    cost = torch.rand(n, m, generator=torch.Generator().manual_seed(seed)).to(dtype)
    rows, cols = nat_ext.linear_sum_assignment(cost.to(device))
    assert rows.dtype == cols.dtype == torch.int64 and cols.device.type == device
    # The optimum of the values as stored in `dtype`, which the solver widens exactly.
    assert_same_optimum(cost.double().numpy(), rows.cpu().numpy(), cols.cpu().numpy(), seed=seed)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("maximize", [False, True])
def test_forbidden_entries(maximize, device):
    rng = np.random.default_rng(3)
    forbidden = -np.inf if maximize else np.inf
    for trial in range(20):
        n, m = rng.integers(1, 60, size=2)
        cost = rng.random((n, m))
        cost[rng.random((n, m)) < 0.3] = forbidden
        try:
            ref_rows, ref_cols = scipy_lsa(cost, maximize=maximize)
        except ValueError:
            with pytest.raises(ValueError, match="infeasible"):
                solve_on(device, cost, maximize)
            continue
        rows, cols = solve_on(device, cost, maximize)
        assert np.isfinite(cost[rows, cols]).all(), f"trial {trial}"
        assert_same_optimum(cost, rows, cols, maximize, trial)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_batched_matches_per_problem(device):
    g = torch.Generator().manual_seed(11)
    for shape in [(6, 20, 20), (4, 10, 25), (4, 25, 10), (3, 0, 4), (0, 5, 5)]:
        cost = torch.randint(0, 5, shape, generator=g).double()
        rows, cols = solve_on(device, cost, maximize=True)
        assert rows.shape == cols.shape == (shape[0], min(shape[1:]))
        for b in range(shape[0]):
            assert_same_optimum(cost[b].numpy(), rows[b], cols[b], True, b)


def brute_force(cost: np.ndarray) -> float:
    n, m = cost.shape
    return min(cost[np.arange(n), list(p)].sum() for p in itertools.permutations(range(m), n))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("seed", range(30))
def test_brute_force_and_certificate_tiny(seed, device):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    m = int(rng.integers(n, 7))
    cost = torch.from_numpy(rng.integers(-3, 4, size=(n, m)).astype(np.float64))
    col4row, u, v = (x.cpu() for x in nat_ext.solve_with_duals(cost.to(device)))
    got = cost[torch.arange(n), col4row].sum().item()
    assert got == brute_force(cost.numpy()), f"seed {seed}"
    assert nat_ext.check_optimality(cost, col4row, u, v), f"seed {seed}"


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("shape", [(200, 200), (120, 257), (5, 60, 60), (3, 30, 70)])
def test_duals_certify(shape, maximize, device):
    g = torch.Generator().manual_seed(5)
    for cost in [torch.rand(shape, generator=g), torch.randint(0, 3, shape, generator=g).float()]:
        col4row, u, v = nat_ext.solve_with_duals(cost.to(device), maximize=maximize)
        assert u.dtype == v.dtype == torch.float64 and u.device.type == v.device.type == device
        assert u.shape == shape[:-1] and v.shape == shape[:-2] + shape[-1:]
        assert torch.equal(col4row, torch.ops.nat.linear_sum_assignment(cost.to(device), maximize))
        col4row, u, v = col4row.cpu(), u.cpu(), v.cpu()
        assert nat_ext.check_optimality(cost, col4row, u, v, maximize=maximize)


def test_check_optimality_rejects_bad_certificates():
    g = torch.Generator().manual_seed(2)
    cost = torch.rand(30, 40, generator=g, dtype=torch.float64)
    col4row, u, v = nat_ext.solve_with_duals(cost)
    assert nat_ext.check_optimality(cost, col4row, u, v)
    swapped = col4row.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert not nat_ext.check_optimality(cost, swapped, u, v)  # equality on assigned pairs fails
    dup = col4row.clone()
    dup[1] = dup[0]
    assert not nat_ext.check_optimality(cost, dup, u, v)
    assert not nat_ext.check_optimality(cost, col4row, u + 1e-3, v)  # infeasible duals
    free = torch.ones(40, dtype=torch.bool)
    free[col4row] = False
    v_bad = v.clone()
    v_bad[free] -= 1.0  # an unassigned column priced below the assigned ones
    u_bad = u.clone()
    assert not nat_ext.check_optimality(cost, col4row, u_bad, v_bad)
    u_nan = u.clone()
    u_nan[3] = float("nan")
    assert not nat_ext.check_optimality(cost, col4row, u_nan, v)
    with pytest.raises(ValueError, match=r"v should have shape \(40,\)"):
        nat_ext.check_optimality(cost, col4row, u, v[:-1])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("value", [0.0, 1.0, 1e300, -1e300, 5e-324, 1e-310])
@pytest.mark.parametrize("n,m", [(50, 50), (30, 70)])
def test_degenerate_constant_matrices(value, n, m, device):
    cost = np.full((n, m), value)
    rows, cols = solve_on(device, cost)
    assert_same_optimum(cost, rows, cols)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("scale", [1e300, 1e-300, 1e-320])
def test_extreme_magnitudes(scale, device):
    rng = np.random.default_rng(9)
    cost = rng.random((80, 80)) * scale
    x, u, v = (t.cpu() for t in nat_ext.solve_with_duals(torch.from_numpy(cost).to(device)))
    assert_same_optimum(cost, np.arange(80), x.numpy())
    assert nat_ext.check_optimality(torch.from_numpy(cost), x, u, v)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_non_contiguous_inputs(device):
    g = torch.Generator().manual_seed(4)
    base = torch.rand(2, 90, 70, generator=g, dtype=torch.float64).to(device)
    views = [base.transpose(1, 2), base[:, ::2, :], base[0].t(), base[1, :, 5:65].t()]
    for view in views:
        assert not view.is_contiguous()
        rows, cols = nat_ext.linear_sum_assignment(view)
        ref = nat_ext.linear_sum_assignment(view.contiguous())
        for b in range(view.shape[0]) if view.dim() == 3 else [None]:
            sl = (slice(None),) if b is None else (b,)
            assert_same_optimum(view[sl].cpu().numpy(), rows[sl].cpu().numpy(),
                                cols[sl].cpu().numpy())
            assert torch.equal(cols[sl], ref[1][sl])
    arr = np.random.default_rng(1).random((40, 30))[::-1, ::2]  # negative strides
    assert_same_optimum(arr, *nat_ext.linear_sum_assignment(arr))


def test_numpy_like_inputs_follow_scipy():
    cost = [[4, 1, 3], [2, 0, 5], [3, 2, 2]]
    rows, cols = nat_ext.linear_sum_assignment(cost)
    np.testing.assert_array_equal(rows, [0, 1, 2])
    assert total(np.array(cost), rows, cols) == 5
    rows, cols = nat_ext.linear_sum_assignment(np.array([[True, False], [False, True]]))
    assert total(np.array([[1, 0], [0, 1]]), rows, cols) == 0
    rows, cols = nat_ext.linear_sum_assignment(np.array([[3, 1]], dtype=np.int32), maximize=True)
    np.testing.assert_array_equal(cols, [0])


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_tensor_in_tensor_out(device):
    cost = torch.tensor([[4, 1, 3], [2, 0, 5], [3, 2, 2]], device=device)  # int64 is cast like scipy casts
    rows, cols = nat_ext.linear_sum_assignment(cost)
    assert isinstance(rows, torch.Tensor) and rows.device == cost.device
    assert cost[rows, cols].sum().item() == 5


# --- errors: scipy's exception types, and messages that say what arrived --------------------------

def scipy_and_ours_raise(cost, exc, match, maximize=False):
    with pytest.raises(exc):
        scipy_lsa(cost, maximize=maximize)
    with pytest.raises(exc, match=match):
        nat_ext.linear_sum_assignment(cost, maximize=maximize)


def test_errors_like_scipy():
    scipy_and_ours_raise(np.zeros(3), ValueError, "2-D")
    scipy_and_ours_raise(np.zeros((2, 2, 2, 2)), ValueError, "4-D")
    scipy_and_ours_raise(np.array([[1 + 1j]]), TypeError, "complex")
    scipy_and_ours_raise(np.array([["a"]]), TypeError, "Cannot cast")
    scipy_and_ours_raise(np.array([[np.nan, 1.0], [1.0, 1.0]]), ValueError,
                         r"invalid numeric entries: cost\[0\]\[0\] is nan")
    scipy_and_ours_raise(np.array([[1.0, -np.inf], [1.0, 1.0]]), ValueError,
                         r"invalid numeric entries: cost\[0\]\[1\]")
    scipy_and_ours_raise(np.array([[1.0, np.inf], [1.0, 1.0]]), ValueError, "invalid numeric",
                         maximize=True)
    scipy_and_ours_raise(np.array([[np.inf, 1.0], [np.inf, 2.0]]), ValueError, "infeasible")
    scipy_and_ours_raise(np.array([[np.inf, np.inf, np.inf], [1.0, 2.0, 3.0]]), ValueError,
                         "infeasible")


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_infeasible_batch_item_is_named(device):
    cost = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)).to(device)
    cost[2, :, 1:] = torch.inf  # every row of item 2 can only use column 0
    with pytest.raises(ValueError, match="infeasible: batch item 2"):
        torch.ops.nat.linear_sum_assignment(cost)
    cost[2] = 0.5
    cost[1, 3, 2] = torch.nan
    with pytest.raises(ValueError, match=r"cost\[1\]\[3\]\[2\] is nan"):
        torch.ops.nat.linear_sum_assignment(cost)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_op_argument_errors(device):
    op = torch.ops.nat.linear_sum_assignment

    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(*shape, dtype=dtype, device=device)

    with pytest.raises(ValueError, match=r"2-D \[n, m\] or 3-D \[B, n, m\] tensor, got 1-D"):
        op(zeros(4))
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16, got Long"):
        op(zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="ComplexFloat"):
        op(zeros(2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="n <= m.*got n=3, m=2"):
        op(zeros(3, 2))
    with pytest.raises(TypeError, match="real-valued"):
        nat_ext.linear_sum_assignment(zeros(2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="got a 1-D array"):
        nat_ext.linear_sum_assignment(zeros(3))
    with pytest.raises(ValueError, match="solver should be 'auto', 'jv' or 'auction', got 'hungarian'"):
        op(zeros(2, 2), False, "hungarian")
    with pytest.raises(ValueError, match="solver='auction' needs square problems.*n=2, m=3"):
        op(zeros(2, 3), False, "auction")
    with pytest.raises(ValueError, match="solver='auction' needs square"):
        nat_ext.assign(zeros(2, 4), zeros(3, 4), solver="auction")
    with pytest.raises(ValueError, match="solver should be .auto., .jv. or .auction., got .hungarian."):
        op(torch.empty(2, 2, device="meta"), False, "hungarian")


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("solver", ["auto", "jv", "auction"])
def test_every_solver_is_exact(solver, device):
    """The solver argument changes the algorithm, never the optimum (against scipy)."""
    g = torch.Generator().manual_seed(9)
    for maximize in (False, True):
        cost = torch.rand(3, 90, 90, generator=g, dtype=torch.float64)
        x, u, v = (t.cpu() for t in nat_ext.solve_with_duals(cost.to(device), maximize=maximize,
                                                              solver=solver))
        assert nat_ext.check_optimality(cost, x, u, v, maximize=maximize)
        for b in range(3):
            rows, cols = scipy_lsa(cost[b].numpy(), maximize=maximize)
            assert abs(cost[b][torch.arange(90), x[b]].sum().item()
                       - cost[b].numpy()[rows, cols].sum()) < 1e-9
        if device == "cpu":
            rows, cols = nat_ext.linear_sum_assignment(cost[0].numpy(), maximize, solver=solver)
            assert isinstance(cols, np.ndarray) and sorted(cols.tolist()) == list(range(90))
    feats, targets = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    idx = nat_ext.assign(feats.to(device), targets.to(device), solver=solver).cpu()
    scores = (feats.double() @ targets.double().T).numpy()
    rows, cols = scipy_lsa(scores, maximize=True)
    assert abs(scores[np.arange(40), idx.numpy()].sum() - scores[rows, cols].sum()) < 1e-6


# --- torch integration -----------------------------------------------------------------------

@pytest.mark.parametrize("device", cpu_and_cuda())
def test_opcheck(device):
    g = torch.Generator().manual_seed(0)
    for cost in [torch.rand(6, 9, generator=g).to(device),
                 torch.rand(3, 5, 5, generator=g, dtype=torch.float64).to(device)]:
        for maximize in (False, True):
            torch.library.opcheck(torch.ops.nat.linear_sum_assignment.default, (cost, maximize))
            torch.library.opcheck(torch.ops.nat.linear_sum_assignment_with_duals.default,
                                  (cost, maximize))
    torch.library.opcheck(torch.ops.nat.linear_sum_assignment.default, (cost, True, "auction"))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_torch_compile_fullgraph(device):
    @torch.compile(fullgraph=True)
    def solve(cost):
        cols = torch.ops.nat.linear_sum_assignment(cost * 2.0, True)
        return torch.gather(cost, -1, cols.unsqueeze(-1)).sum()

    cost = torch.rand(4, 12, 16, generator=torch.Generator().manual_seed(1))
    expected = sum(
        cost[b].numpy()[scipy_lsa(cost[b].numpy(), maximize=True)].sum() for b in range(4))
    assert abs(solve(cost.to(device)).item() - expected) < 1e-4


def test_meta_tensors_give_shapes():
    cols = torch.ops.nat.linear_sum_assignment(torch.empty(7, 5, 9, device="meta"))
    assert cols.shape == (7, 5) and cols.dtype == torch.int64 and cols.device.type == "meta"
    x, u, v = torch.ops.nat.linear_sum_assignment_with_duals(torch.empty(5, 9, device="meta"))
    assert x.shape == (5,) and u.shape == (5,) and v.shape == (9,)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("solver", ["jv", "auction"])
def test_ex_ops_report_failures_instead_of_raising(device, solver):
    """The _ex ops: no raise for bad values, per-problem info, -1 rows where a problem failed;
    the solved problems' answers are optimal (scipy)."""
    g = torch.Generator().manual_seed(13)
    cost = torch.rand(4, 30, 30, generator=g, dtype=torch.float64)
    cost[1, 3, 4] = float("nan")          # invalid entry
    cost[2, :3, 2:] = float("inf")         # infeasible: 3 rows share 2 columns
    cols, info = nat_ext.linear_sum_assignment_ex(cost.to(device), solver=solver)
    assert cols.device.type == device and info.device.type == device
    assert info.tolist() == [0, 2, 1, 0]
    assert (cols[1:3] == -1).all()
    for b in (0, 3):
        rows, expected = scipy_lsa(cost[b].numpy())
        assert abs(cost[b][torch.arange(30), cols[b].cpu()].sum().item()
                   - cost[b].numpy()[rows, expected].sum()) < 1e-9
    cols1, info1 = nat_ext.linear_sum_assignment_ex(cost[1].to(device), solver=solver)
    assert info1.shape == () and info1.item() == 2 and (cols1 == -1).all()
    with pytest.raises(ValueError, match=r"cost\[1\]\[3\]\[4\] is nan"):
        nat_ext.linear_sum_assignment_ex(cost.to(device), solver=solver, check_errors=True)
    cols, info = nat_ext.linear_sum_assignment_ex(cost[[0, 3]].to(device), True, solver, True)
    assert info.tolist() == [0, 0] and sorted(cols[0].tolist()) == list(range(30))
    feats, targets = torch.randn(2, 30, 8, generator=g), torch.randn(2, 30, 8, generator=g)
    feats[0, 5, 1] = float("nan")
    idx, info = nat_ext.assign_ex(feats.to(device), targets.to(device), solver)
    assert info.tolist() == [2, 0] and (idx[0] == -1).all()
    scores = (feats[1].double() @ targets[1].double().T).numpy()
    rows, best = scipy_lsa(scores, maximize=True)
    assert abs(scores[np.arange(30), idx[1].cpu().numpy()].sum() - scores[rows, best].sum()) < 1e-5
    with pytest.raises(ValueError, match="feats contains NaN"):
        nat_ext.assign_ex(feats.to(device), targets.to(device), solver, check_errors=True)
    # A score that overflows to -inf is an invalid input (not a forbidden pair) on every device.
    big_f = torch.tensor([[1e20, 0.0], [1.0, 0.0]], device=device)
    big_t = torch.tensor([[-1e20, 0.0], [1.0, 0.0]], device=device)
    idx, info = nat_ext.assign_ex(big_f, big_t)
    assert info.item() == 2 and (idx == -1).all()
    with pytest.raises(ValueError, match="overflowed|not finite"):
        nat_ext.assign(big_f, big_t)
    if device == "cuda":  # the sync-free promise, checked by torch itself
        # The inputs go to the GPU first: a blocking host-to-device copy is itself a sync.
        cost_d, feats_d, targets_d = cost.to(device), feats.to(device), targets.to(device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            nat_ext.linear_sum_assignment_ex(cost_d, solver=solver)
            nat_ext.assign_ex(feats_d, targets_d, solver)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.library.opcheck(torch.ops.nat.linear_sum_assignment_ex.default,
                          (cost[[0, 3]].to(device), False, solver, False))
    torch.library.opcheck(torch.ops.nat.assign_ex.default,
                          (feats[1:].to(device), targets[1:].to(device), solver, False))


def test_ex_ops_meta_and_compile():
    cols, info = torch.ops.nat.linear_sum_assignment_ex(torch.empty(7, 5, 9, device="meta"))
    assert cols.shape == (7, 5) and info.shape == (7,) and info.dtype == torch.int64
    cols, info = torch.ops.nat.assign_ex(torch.empty(5, 3, device="meta"), torch.empty(5, 3, device="meta"))
    assert cols.shape == (5,) and info.shape == ()

    @torch.compile(fullgraph=True)
    def step(f, t):
        idx, info = torch.ops.nat.assign_ex(f, t)
        return idx, info

    f, t = torch.randn(3, 16, 4), torch.randn(3, 16, 4)
    idx, info = step(f, t)
    assert info.tolist() == [0, 0, 0] and torch.equal(idx, nat_ext.assign(f, t))


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_devices_agree(device):
    cost = torch.rand(8, 64, 80, generator=torch.Generator().manual_seed(6))
    cols = torch.ops.nat.linear_sum_assignment(cost.to(device), False)
    assert cols.device.type == device
    cpu_cols = torch.ops.nat.linear_sum_assignment(cost, False)
    got = torch.gather(cost, -1, cols.cpu().unsqueeze(-1)).sum(dim=(1, 2))
    ref = torch.gather(cost, -1, cpu_cols.unsqueeze(-1)).sum(dim=(1, 2))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)

