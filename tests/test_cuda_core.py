"""The CUDA solvers' algorithms (csrc/lap/block_lsap.h, csrc/lap/auction_lsap.h), tested on
the host.

nat::_linear_sum_assignment_team runs the very source the CUDA kernels run, on host threads with
a barrier instead of a thread block or a cooperative grid, so what is checked here is the
algorithms, their data ownership, atomics and barriers; only the warp shuffles and the grid
barrier of cuda/team.cuh are not. The GPU itself is tested at the bottom, whenever one is
present.
"""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

import nat_ext

team_solve = torch.ops.nat._linear_sum_assignment_team


def scipy_optimum(cost: torch.Tensor, maximize: bool) -> float:
    c = cost.double().numpy()
    rows, cols = scipy_lsa(c, maximize=maximize)
    return c[rows, cols].sum()


def check(cost, col4row, u, v, maximize, seed):
    n = cost.shape[0]
    got = cost.double()[torch.arange(n), col4row].sum().item()
    expected = scipy_optimum(cost, maximize)
    assert abs(got - expected) <= 1e-9 * (1 + abs(expected)), f"seed {seed}: {got} vs {expected}"
    assert nat_ext.check_optimality(cost, col4row, u, v, maximize=maximize), f"seed {seed}"


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("kind", ["uniform", "ties"])
def test_team_algorithm_matches_scipy(threads, maximize, kind):
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(0, 40, (1,), generator=g))
        m = n + int(torch.randint(0, 3, (1,), generator=g)) * int(torch.randint(0, 15, (1,), generator=g))
        cost = torch.rand(n, m, generator=g, dtype=torch.float64)
        if kind == "ties":
            cost = (cost * 3).floor()
        col4row, u, v = team_solve(cost, maximize, threads)
        check(cost, col4row, u, v, maximize, seed)


@pytest.mark.parametrize("threads", [1, 4])
def test_team_algorithm_larger_and_float32(threads):
    g = torch.Generator().manual_seed(1)
    for shape in [(150, 150), (100, 230)]:
        cost = torch.rand(shape, generator=g)
        col4row, u, v = team_solve(cost, False, threads)
        check(cost, col4row, u, v, False, shape)


def check_or_infeasible(cost: np.ndarray, threads: int, solver: str, trial) -> None:
    """Solves cost on the team; scipy says whether it must instead be reported infeasible."""
    t = torch.from_numpy(cost)
    try:
        scipy_lsa(cost)
    except ValueError:
        with pytest.raises(ValueError, match="infeasible"):
            team_solve(t, False, threads, solver)
        return
    col4row, u, v = team_solve(t, False, threads, solver)
    check(t, col4row, u, v, False, trial)


def test_team_algorithm_forbidden_and_infeasible():
    rng = np.random.default_rng(2)
    for trial in range(15):
        n, m = rng.integers(1, 25, size=2)
        n, m = min(n, m), max(n, m)
        cost = rng.random((n, m))
        cost[rng.random((n, m)) < 0.4] = np.inf
        check_or_infeasible(cost, 4, "jv", trial)


def test_team_algorithm_invalid_entries_and_degenerate():
    cost = torch.rand(6, 9, dtype=torch.float64)
    cost[4, 7] = float("nan")
    cost[5, 1] = float("nan")
    with pytest.raises(ValueError, match=r"cost\[4\]\[7\] is nan"):  # the first one is named
        team_solve(cost, False, 4)
    for value in [0.0, 1e300, 5e-324]:
        cost = torch.full((20, 33), value, dtype=torch.float64)
        col4row, u, v = team_solve(cost, False, 4)
        check(cost, col4row, u, v, False, value)


def test_team_algorithm_batched_and_shapes():
    g = torch.Generator().manual_seed(3)
    cost = torch.randint(0, 4, (5, 12, 17), generator=g).float()
    col4row, u, v = team_solve(cost, True, 2)
    assert col4row.shape == (5, 12) and u.shape == (5, 12) and v.shape == (5, 17)
    for b in range(5):
        check(cost[b], col4row[b], u[b], v[b], True, b)
    torch.library.opcheck(team_solve.default, (cost, True, 2))
    with pytest.raises(ValueError, match="threads should be in"):
        team_solve(cost, True, 0)


# --- the large-problem algorithm: auction prepass + exact repair (square only) -------------

@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("kind", ["uniform", "ties", "offset", "normal"])
def test_auction_algorithm_matches_scipy(threads, maximize, kind):
    for seed in range(10):
        g = torch.Generator().manual_seed(100 + seed)
        n = int(torch.randint(0, 60, (1,), generator=g))
        cost = torch.rand(n, n, generator=g, dtype=torch.float64)
        if kind == "ties":
            cost = (cost * 3).floor()
        elif kind == "offset":  # prices far below the costs' magnitude: the rounding floor
            cost = 1e6 + cost
        elif kind == "normal":
            cost = torch.randn(n, n, generator=g, dtype=torch.float64) * 1e3
        col4row, u, v = team_solve(cost, maximize, threads, "auction")
        check(cost, col4row, u, v, maximize, seed)


@pytest.mark.parametrize("threads", [1, 4])
def test_auction_algorithm_larger_and_float32(threads):
    g = torch.Generator().manual_seed(5)
    for n in (200, 700):
        cost = torch.rand(n, n, generator=g)
        col4row, u, v = team_solve(cost, False, threads, "auction")
        check(cost, col4row, u, v, False, n)
    # The public op runs the same algorithm serially for solver="auction" on CPU tensors.
    x, u, v = nat_ext.solve_with_duals(cost, solver="auction")
    check(cost, x, u, v, False, "public op")


def test_auction_algorithm_forbidden_and_infeasible():
    rng = np.random.default_rng(6)
    for trial in range(20):
        n = int(rng.integers(1, 30))
        cost = rng.random((n, n))
        cost[rng.random((n, n)) < 0.5] = np.inf
        check_or_infeasible(cost, 3, "auction", trial)
    # Every row has finite entries, yet rows 0-2 share two columns: the auction's price war
    # ends on its round budget and the exact repair reports it.
    cost = torch.rand(30, 30, dtype=torch.float64)
    cost[:3, 2:] = float("inf")
    with pytest.raises(ValueError, match="infeasible"):
        team_solve(cost, False, 2, "auction")
    cost[5] = float("inf")  # a row with no finite entry is caught before the auction
    with pytest.raises(ValueError, match="infeasible"):
        nat_ext.solve_with_duals(cost, solver="auction")


def test_auction_algorithm_invalid_entries_and_degenerate():
    cost = torch.rand(9, 9, dtype=torch.float64)
    cost[4, 7] = float("nan")
    cost[6, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"cost\[4\]\[7\] is nan"):
        team_solve(cost, False, 4, "auction")
    cost[4, 7] = 0.0
    with pytest.raises(ValueError, match=r"cost\[6\]\[1\] is -inf"):
        team_solve(cost, False, 4, "auction")
    for value in [0.0, 1e300, -1e300, 5e-324]:
        cost = torch.full((20, 20), value, dtype=torch.float64)
        col4row, u, v = team_solve(cost, False, 4, "auction")
        check(cost, col4row, u, v, False, value)
    for scale in (1e300, 1e-300):
        cost = torch.rand(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        col4row, u, v = team_solve(cost * scale, True, 3, "auction")
        check(cost * scale, col4row, u, v, True, scale)


@pytest.mark.parametrize("log2_scale", [1020, 1023, -1000, -1070])
def test_auction_algorithm_near_the_limits_of_double(log2_scale):
    """Costs whose prices would overflow or underflow: the auction steps aside, the exact repair
    answers alone. Brute force over all 5! assignments is the oracle, on the costs divided by the
    (power of two) scale so that its sums do not overflow."""
    import itertools
    rng = np.random.default_rng(10)
    perms = np.array(list(itertools.permutations(range(5))))
    scale = 2.0 ** log2_scale
    for trial in range(200):
        cost = rng.random((5, 5)) * scale * (1 if trial % 2 else -1)
        col4row, u, v = team_solve(torch.from_numpy(cost), False, 2 + trial % 3, "auction")
        unit = cost / scale
        best = unit[np.arange(5), perms].sum(axis=1).min()
        got = unit[np.arange(5), col4row.numpy()].sum()
        assert got <= best + 1e-9, f"trial {trial}: {got} vs {best}"


def test_auction_algorithm_heavy_ties_use_the_round_budget():
    # Integer costs 0..3 make the Jacobi auction a long price war: it stops on its round budget
    # and hands its matching to the repair, which must still be exact.
    cost = torch.randint(0, 4, (600, 600), generator=torch.Generator().manual_seed(11)).double()
    col4row, u, v = team_solve(cost, False, 4, "auction")
    check(cost, col4row, u, v, False, "ties 600")


def test_auction_batched_and_arguments():
    g = torch.Generator().manual_seed(8)
    cost = torch.randint(0, 4, (5, 12, 12), generator=g).float()
    col4row, u, v = team_solve(cost, True, 2, "auction")
    for b in range(5):
        check(cost[b], col4row[b], u[b], v[b], True, b)
    torch.library.opcheck(team_solve.default, (cost, True, 2, "auction"))
    torch.library.opcheck(torch.ops.nat.linear_sum_assignment_with_duals.default,
                          (cost, False, "auction"))
    with pytest.raises(ValueError, match="needs square problems"):
        team_solve(torch.rand(3, 4), False, 2, "auction")
    with pytest.raises(ValueError, match="solver should be 'jv' or 'auction'"):
        team_solve(cost, False, 2, "auto")


# --- the CUDA kernels themselves (skipped without a GPU) -----------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("solver", ["auto", "jv", "auction"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (33, 70), (256, 256), (4, 100, 100),
                                   (64, 64, 200), (2, 1024, 1024)])
def test_cuda_matches_cpu(solver, dtype, shape):
    if solver == "auction" and shape[-1] != shape[-2]:
        pytest.skip("the auction solver takes square problems only")
    g = torch.Generator().manual_seed(4)
    cost = torch.rand(shape, generator=g).to(dtype)
    for maximize in (False, True):
        x, u, v = nat_ext.solve_with_duals(cost.cuda(), maximize=maximize, solver=solver)
        assert x.is_cuda and u.is_cuda and v.is_cuda
        assert nat_ext.check_optimality(cost, x.cpu(), u.cpu(), v.cpu(), maximize=maximize)
        x_cpu = torch.ops.nat.linear_sum_assignment(cost, maximize)
        c = cost.double()
        total = torch.gather(c, -1, x.cpu().unsqueeze(-1)).sum()
        total_cpu = torch.gather(c, -1, x_cpu.unsqueeze(-1)).sum()
        assert abs(total - total_cpu) <= 1e-9 * (1 + abs(total_cpu))


@pytest.mark.cuda
def test_cuda_errors_and_ties():
    cost = torch.zeros(300, 300, device="cuda")
    x, u, v = nat_ext.solve_with_duals(cost)
    assert nat_ext.check_optimality(cost.cpu(), x.cpu(), u.cpu(), v.cpu())
    cost[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"cost\[3\]\[5\] is nan"):
        torch.ops.nat.linear_sum_assignment(cost)
    cost = torch.rand(3, 4, 4, device="cuda")
    cost[1, :, 1:] = float("inf")
    with pytest.raises(ValueError, match="infeasible: batch item 1"):
        torch.ops.nat.linear_sum_assignment(cost)
    feats = torch.randn(8, 4, device="cuda")
    feats[2, 1] = float("nan")
    with pytest.raises(ValueError, match="feats contains NaN"):
        nat_ext.assign(feats, torch.randn(8, 4, device="cuda"))


@pytest.mark.cuda
def test_cuda_compile_and_opcheck():
    cost = torch.rand(3, 20, 30, device="cuda")
    torch.library.opcheck(torch.ops.nat.linear_sum_assignment.default, (cost, False))
    torch.library.opcheck(torch.ops.nat.linear_sum_assignment_with_duals.default, (cost, True))
    feats, targets = torch.randn(2, 16, 8, device="cuda"), torch.randn(2, 16, 8, device="cuda")
    torch.library.opcheck(torch.ops.nat.assign.default, (feats, targets))
    compiled = torch.compile(lambda f, t: torch.ops.nat.assign(f, t), fullgraph=True)
    scores = feats.double() @ targets.double().transpose(1, 2)
    for idx in (compiled(feats, targets), nat_ext.assign(feats.cpu(), targets.cpu()).cuda()):
        got = torch.gather(scores, -1, idx.unsqueeze(-1)).sum(dim=(1, 2))
        best = torch.tensor([scipy_optimum(s.cpu(), True) for s in scores], dtype=torch.float64)
        torch.testing.assert_close(got.cpu(), best, rtol=0, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [2048, 4096])
def test_cuda_auction_large_certified(n):
    # The sizes where "auto" picks the whole-GPU auction. The dual certificate proves optimality
    # on its own (a CPU reference would cost ~20 s of a short GPU lease at 4096 with ties).
    g = torch.Generator().manual_seed(n)
    for cost in (torch.rand(n, n, generator=g), (torch.rand(n, n, generator=g) * 8).floor()):
        x, u, v = nat_ext.solve_with_duals(cost.cuda())
        assert nat_ext.check_optimality(cost, x.cpu(), u.cpu(), v.cpu())


@pytest.mark.cuda
def test_cuda_auction_errors():
    cost = torch.rand(300, 300, device="cuda")
    cost[7, 9] = float("nan")
    with pytest.raises(ValueError, match=r"cost\[7\]\[9\] is nan"):
        torch.ops.nat.linear_sum_assignment(cost, False, "auction")
    cost = torch.rand(2, 40, 40, device="cuda")
    cost[1, :3, 2:] = float("inf")
    with pytest.raises(ValueError, match="infeasible: batch item 1"):
        torch.ops.nat.linear_sum_assignment(cost, False, "auction")
    with pytest.raises(ValueError, match="needs square problems"):
        torch.ops.nat.linear_sum_assignment(torch.rand(3, 5, device="cuda"), False, "auction")


@pytest.mark.cuda
@pytest.mark.parametrize("solver", ["jv", "auction"])
def test_cuda_side_stream_other_device_and_strides(solver):
    # Kernels go on the caller's current stream and device; inputs of any strides.
    devices = [torch.device("cuda", i) for i in range(min(torch.cuda.device_count(), 2))]
    g = torch.Generator().manual_seed(12)
    for device in devices:
        cost = torch.rand(3, 300, 300, generator=g).transpose(1, 2)  # non-contiguous
        stream = torch.cuda.Stream(device=device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            x, u, v = nat_ext.solve_with_duals(cost.to(device), solver=solver)
        stream.synchronize()
        assert x.device == device
        assert nat_ext.check_optimality(cost, x.cpu(), u.cpu(), v.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 1755, 1755), (2, 2500, 2500), (5000, 16, 16)])
def test_cuda_jv_state_in_shared_and_global_memory(shape):
    # 1755: the largest square state that fits the shared-memory cap; 2500: global workspace;
    # 5000 small problems: more than one wave (about 19 blocks an SM at ~98 registers a thread),
    # so global workspace too.
    cost = torch.rand(shape, generator=torch.Generator().manual_seed(14))
    x, u, v = nat_ext.solve_with_duals(cost.cuda(), solver="jv")
    assert nat_ext.check_optimality(cost, x.cpu(), u.cpu(), v.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("solver", ["jv", "auction"])
def test_cuda_graph_capture_and_replay_ex_ops(solver):
    """The _ex ops never sync, so they can be captured in a CUDA graph; each replay on new
    inputs (copied into the captured buffers) gives what the eager ops give, failures included."""
    g = torch.Generator().manual_seed(16)
    cost = torch.rand(3, 64, 64, generator=g).cuda()
    feats, targets = torch.randn(2, 48, 16, generator=g).cuda(), torch.randn(2, 48, 16, generator=g).cuda()

    def step():
        return (nat_ext.linear_sum_assignment_ex(cost, solver=solver),
                nat_ext.assign_ex(feats, targets, solver))

    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (cols, info), (idx, idx_info) = step()
    for trial in range(3):
        cost.copy_(torch.rand(3, 64, 64, generator=g))
        feats.copy_(torch.randn(2, 48, 16, generator=g))
        if trial == 2:
            cost[1, 5, 7] = float("nan")  # a failure must show in info on replay too
        graph.replay()
        (cols_e, info_e), (idx_e, idx_info_e) = step()
        assert torch.equal(info, info_e) and torch.equal(idx_info, idx_info_e), f"trial {trial}"
        assert torch.equal(cols, cols_e) and torch.equal(idx, idx_e), f"trial {trial}"
        assert info.tolist() == ([0, 2, 0] if trial == 2 else [0, 0, 0]), f"trial {trial}"
        for b in (0, 2):
            c = cost[b].double().cpu()
            assert abs(c[torch.arange(64), cols[b].cpu()].sum() - scipy_optimum(c, False)) < 1e-4
