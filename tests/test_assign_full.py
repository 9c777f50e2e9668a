"""nat_ext.assign_full and the sparse solver op under it, against oracles that share nothing with
them: brute-force enumeration, scipy on the dense scores, and a chunked dense pass over the dual
certificate (written here, in float64)."""

import itertools

import numpy as np
import pytest
import scipy.optimize
import torch

import nat_ext
from nat_ext.full_assign import sparse_linear_sum_assignment
from conftest import cpu_and_cuda


def certificate_holds(feats, targets, x, u, v, rtol=1e-9, chunk=64):
    """u_i + v_j >= f_i . t_j on every pair, equality on the assigned ones, every unassigned
    target's v at most every assigned one's; scores recomputed in float64, chunk by chunk."""
    f, t = feats.double().cpu(), targets.double().cpu()
    x, u, v = x.cpu(), u.double().cpu(), v.double().cpu()
    n, m = f.shape[0], t.shape[0]
    if x.shape != (n,) or u.shape != (n,) or v.shape != (m,):
        return False
    if n and (x.min() < 0 or x.max() >= m or x.unique().numel() != n):
        return False
    tol = rtol * (1.0 + float(f.norm(dim=1).max()) * float(t.norm(dim=1).max()) if n else 1.0)
    for r0 in range(0, n, chunk):
        s = f[r0:r0 + chunk] @ t.T
        if (s - u[r0:r0 + chunk, None] - v[None, :] > tol).any():
            return False
        assigned = s.gather(1, x[r0:r0 + chunk, None]).squeeze(1)
        if ((assigned - u[r0:r0 + chunk] - v[x[r0:r0 + chunk]]).abs() > tol).any():
            return False
    used = torch.zeros(m, dtype=torch.bool)
    used[x] = True
    if n and (~used).any() and v[~used].max() > v[used].min() + tol:
        return False
    return True


def total(feats, targets, x):
    return float((feats.double().cpu() * targets.double().cpu()[x.cpu()]).sum())


def dense_optimum(feats, targets):
    s = (feats.double().cpu() @ targets.double().cpu().T).numpy()
    r, c = scipy.optimize.linear_sum_assignment(s, maximize=True)
    return float(s[r, c].sum())


def random_problem(seed, n, m, d, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=dtype)
    t = torch.randn(m, d, generator=g, dtype=dtype)
    return f.to(device), t.to(device)


@pytest.mark.parametrize("seed", range(40))
def test_brute_force_tiny(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 6))
    m = int(rng.integers(n, 7))
    f, t = random_problem(seed, n, m, 3)
    x, u, v = nat_ext.assign_full(f, t, return_duals=True, k=1, col_k=0)
    s = (f @ t.T).numpy()
    best = max(sum(s[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    assert total(f, t, x) == pytest.approx(best, abs=1e-9), f"seed {seed}"
    assert certificate_holds(f, t, x, u, v), f"seed {seed}"


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("m_extra", [0, 57])
@pytest.mark.parametrize("with_init", [False, True])
def test_matches_scipy(device, m_extra, with_init):
    restricted = 0
    for seed in range(3):
        n = 300
        m = n + m_extra
        f, t = random_problem(seed, n, m, 16, device=device)
        init = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:n].to(device) \
            if with_init else None
        stats = {}
        x, u, v = nat_ext.assign_full(f, t, init=init, return_duals=True, k=4, stats=stats)
        assert x.device == f.device and u.device == f.device and v.device == f.device
        assert x.dtype == torch.int64 and u.dtype == v.dtype == torch.float64
        assert certificate_holds(f, t, x, u, v), f"seed {seed}"
        assert total(f, t, x) == pytest.approx(dense_optimum(f, t), rel=1e-12), f"seed {seed}"
        assert stats["rounds"] == len(stats["time_solve"]) == len(stats["candidates_per_row"])
        restricted += sum(stats["restricted_rows"])
    # rows rescanned against only the columns whose price rose least: the answers above
    # certify that path too
    assert restricted > 0


def test_held_pairs_of_a_column_subset():
    # a rescan against a subset of the columns skips the held pairs there, by their positions in
    # the subset (counted as violations, a held pair's rounding could end a row's rescan early)
    from nat_ext.full_assign import _Candidates, _held_csr
    g = torch.Generator().manual_seed(3)
    n, m = 50, 80
    cand = _Candidates(n, m)
    rows, cols = torch.randint(0, n, (400,), generator=g), torch.randint(0, m, (400,), generator=g)
    cand.add(rows, cols, torch.zeros(400, dtype=torch.float64))
    held = set(zip(rows.tolist(), cols.tolist()))
    sel = torch.randperm(n, generator=g)[:20].sort().values
    for col_ids in (torch.randperm(m, generator=g)[:30].sort().values, torch.arange(m)):
        crow, col = _held_csr(cand, sel, col_ids)
        for a, i in enumerate(sel.tolist()):
            got = col_ids[col[crow[a]:crow[a + 1]]].tolist()
            assert got == sorted(c for c in col_ids.tolist() if (i, c) in held), i
    crow, col = _held_csr(cand, sel, torch.arange(0))
    assert crow.tolist() == [0] * 21 and col.numel() == 0


def plan_of(deficit, rise, regen=0.0):
    """_plan_rescan's runs as {row: c}, checking that they cover every row once."""
    from nat_ext.full_assign import _plan_rescan
    plan = {}
    for pos, c in _plan_rescan(deficit, rise, regen):
        for i in pos.tolist():
            assert i not in plan
            plan[i] = c
    assert sorted(plan) == list(range(deficit.numel()))
    return plan


def test_plan_rescan():
    m = 1000
    rise = torch.cat([torch.tensor([0.0, 0.001]), torch.full((m - 2,), 0.5)]).double()
    # every row short by 0.01: only the two columns that rose by less can hold a violation
    assert set(plan_of(torch.full((300,), 0.01, dtype=torch.float64), rise).values()) == {2}
    # short by more than any rise: every column (c = m, a full rescan)
    assert set(plan_of(torch.full((300,), 1.0, dtype=torch.float64), rise).values()) == {m}
    # mixed: the few rows short by a lot in full, the rest against the two columns (runs end on
    # 32 quantiles of the deficits, so a run may take a few more rows in full)
    deficit = torch.cat([torch.full((290,), 0.01), torch.full((10,), 0.7)]).double()
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    plan = plan_of(deficit[perm], rise)
    assert all(plan[i] == m for i in (perm >= 290).nonzero().squeeze(1).tolist())
    assert list(plan.values()).count(2) >= 280
    # random: every row gets at least the columns that rose by less than its deficit (what
    # exactness needs); with nothing to regenerate, the runs score within 5% of that least
    g = torch.Generator().manual_seed(1)
    for regen in (0.0, 5e4):
        rise = (torch.randn(m, generator=g, dtype=torch.float64) * 0.03 + 0.05).sort().values
        deficit = torch.rand(700, generator=g, dtype=torch.float64) * 0.12
        plan = plan_of(deficit, rise, regen)
        least = [int((rise < deficit[i]).sum()) for i in range(700)]
        for i, c in plan.items():
            assert c == m or float(deficit[i]) <= float(rise[c])
            assert c >= least[i]
        if not regen:
            assert sum(plan.values()) <= 1.05 * sum(least)


@pytest.mark.parametrize("m_extra", [0, 41])
@pytest.mark.parametrize("step", [0.1, 3.0])
def test_warm_resolve_after_a_move_is_exact(m_extra, step):
    # the previous solve's (x, u, v) after the features moved: one pass under the old prices,
    # then rows rescanned against the columns whose price rose least (or fell: a rectangular
    # problem frees columns); moved so far that most sampled rows prefer another target, the
    # cold route. The dense certificate and scipy's optimum check every pair.
    for seed in range(3):
        f, t = random_problem(seed, 1200, 1200 + m_extra, 16)
        x, u, v = nat_ext.assign_full(f, t, return_duals=True, k=4)
        g = torch.Generator().manual_seed(100 + seed)
        f2 = f + step * torch.randn(f.shape, generator=g, dtype=f.dtype)
        st = {}
        xw, uw, vw = nat_ext.assign_sharded(f2, 0, 1200, t, x, warm=(x, u, v), k=4, stats=st)
        assert certificate_holds(f2, t, xw, uw, vw), f"seed {seed}"
        assert total(f2, t, xw) == pytest.approx(dense_optimum(f2, t), rel=1e-12), f"seed {seed}"
        assert sum(st["restricted_rows"]) > 0, st
        assert st["warm"] == (step < 1), st["warm_moved"]


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_float32(device):
    for seed in range(3):
        f, t = random_problem(seed, 500, 520, 32, torch.float32, device)
        x = nat_ext.assign_full(f, t)
        # optimal for the float32 scores, to within their rounding: the float64 optimum may
        # differ by that much, no more
        assert total(f, t, x) == pytest.approx(dense_optimum(f, t), rel=1e-5), f"seed {seed}"
        assert x.unique().numel() == 500


def test_ties():
    # 0/1 features and targets: scores are small integers, with ties everywhere
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        f = torch.randint(0, 2, (60, 5), generator=g).double()
        t = torch.randint(0, 2, (75, 5), generator=g).double()
        x, u, v = nat_ext.assign_full(f, t, return_duals=True, k=2)
        assert total(f, t, x) == dense_optimum(f, t), f"seed {seed}"
        assert certificate_holds(f, t, x, u, v), f"seed {seed}"


@pytest.mark.parametrize("m", [200, 400])
def test_all_features_alike_forces_pricing(m):
    # every row ranks the targets (almost) the same way, so the top-k lists all name the same
    # few targets and the optimum needs pairs that only pricing finds
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(1, 8, generator=g, dtype=torch.float64)
        f = base + 1e-3 * torch.randn(200, 8, generator=g, dtype=torch.float64)
        t = torch.randn(m, 8, generator=g, dtype=torch.float64)
        stats = {}
        x, u, v = nat_ext.assign_full(f, t, return_duals=True, k=2, col_k=0, stats=stats)
        assert stats["rounds"] > 2, f"seed {seed}: {stats}"
        assert certificate_holds(f, t, x, u, v), f"seed {seed}"
        assert total(f, t, x) == pytest.approx(dense_optimum(f, t), rel=1e-12), f"seed {seed}"


def near_parallel_problem(seed, n, m, d=16, dtype=torch.float64):
    """An untrained network's embedding in miniature: unit rows around one direction (mean
    pairwise cosine about 0.998), centred as NAT's dataset reassignment centres them, with most
    of the spread along a few directions; targets on the sphere."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, d, generator=g, dtype=torch.float64)
    spread = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(
        0, -2, d, dtype=torch.float64)
    f = torch.nn.functional.normalize(base / base.norm() + 0.05 * spread, dim=1)
    f = f - f.mean(0)
    t = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    return f.to(dtype), t.to(dtype)


@pytest.mark.parametrize("m_extra", [0, 41])
@pytest.mark.parametrize("with_init", [False, True])
def test_near_parallel_coarse_duals(m_extra, with_init):
    # the rows crowd onto the same targets, so the coarse duals (a subsample's exact duals,
    # recursively) choose the candidates; the answer must still be the dense optimum, certified
    for seed in range(3):
        n = 400
        m = n + m_extra
        f, t = near_parallel_problem(seed, n, m)
        init = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:n] \
            if with_init else None
        stats = {}
        x, u, v = nat_ext.assign_full(f, t, init=init, return_duals=True, stats=stats,
                                      coarse_min=64)
        assert "coarse" in stats, \
            f"seed {seed}: the coarse path was not taken: {stats.get('crowd')}"
        assert certificate_holds(f, t, x, u, v), f"seed {seed}"
        assert total(f, t, x) == pytest.approx(dense_optimum(f, t), rel=1e-12), f"seed {seed}"


def test_near_parallel_float32_default_settings():
    # the default path at a size where it applies (n >= coarse_min), in float32: optimal for the
    # float32 scores to within their rounding, as the cold path is
    f, t = near_parallel_problem(5, 1500, 1500, d=32, dtype=torch.float32)
    stats = {}
    x = nat_ext.assign_full(f, t, stats=stats)
    assert "coarse" in stats, stats.get("crowd")
    assert x.unique().numel() == 1500
    assert total(f, t, x) == pytest.approx(dense_optimum(f, t), rel=1e-5)
    cold = nat_ext.assign_full(f, t, coarse=1)
    assert total(f, t, x) == pytest.approx(total(f, t, cold), rel=1e-5)


def test_spread_features_skip_coarse_duals():
    # random features do not crowd: the first solve is faster from zero prices, so no coarse step
    f, t = (torch.nn.functional.normalize(a, dim=1) for a in random_problem(3, 1200, 1200, 32))
    stats = {}
    x, u, v = nat_ext.assign_full(f, t, return_duals=True, stats=stats)
    assert "coarse" not in stats and stats["crowd"]["distinct"] * 2 >= stats["crowd"]["sampled"]
    assert certificate_holds(f, t, x, u, v)


def test_coarse_duals_forced_on_spread_features(monkeypatch):
    # exactness does not depend on the gate: force the coarse path where it is not chosen
    import nat_ext.full_assign as fa
    monkeypatch.setattr(fa, "_crowded", lambda *a: (True, 0, 0))
    for seed in range(3):
        f, t = random_problem(seed, 300, 300 + 17 * seed, 8)
        stats = {}
        x, u, v = nat_ext.assign_full(f, t, return_duals=True, stats=stats, coarse_min=40,
                                      coarse=3)
        assert "coarse" in stats, f"seed {seed}"
        assert certificate_holds(f, t, x, u, v), f"seed {seed}"
        assert total(f, t, x) == pytest.approx(dense_optimum(f, t), rel=1e-12), f"seed {seed}"


def test_identical_rows_take_the_best_targets():
    # identical feats: any assignment of the n best targets is optimal, and only those
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 6, generator=g, dtype=torch.float64).expand(50, 6).contiguous()
    t = torch.randn(200, 6, generator=g, dtype=torch.float64)
    x, u, v = nat_ext.assign_full(f, t, return_duals=True, k=1, col_k=0)
    best = (t @ f[0]).topk(50).indices
    assert set(x.tolist()) == set(best.tolist())
    assert certificate_holds(f, t, x, u, v)


def test_init_is_kept_when_optimal():
    f, t = random_problem(7, 100, 100, 8)
    x = nat_ext.assign_full(f, t)
    stats = {}
    again = nat_ext.assign_full(f, t, init=x, stats=stats)
    assert total(f, t, again) == pytest.approx(total(f, t, x), rel=1e-13)
    assert stats["violating_rows"][-1] == 0


def test_empty_and_single():
    f, t = random_problem(0, 0, 5, 3)
    x, u, v = nat_ext.assign_full(f, t, return_duals=True)
    assert x.shape == (0,) and u.shape == (0,) and v.shape == (5,)
    f, t = random_problem(0, 1, 5, 3)
    x = nat_ext.assign_full(f, t)
    assert int(x) == int((t @ f[0]).argmax())


# --- the sparse op on its own ---

def random_sparse(seed, n, m, degree):
    g = torch.Generator().manual_seed(seed)
    cols, costs, crow = [], [], [0]
    perm = torch.randperm(m, generator=g)[:n]  # a perfect matching, so it is feasible
    for i in range(n):
        c = torch.cat([perm[i:i + 1], torch.randint(0, m, (degree,), generator=g)])
        cols.append(c)
        costs.append(torch.randn(c.numel(), generator=g, dtype=torch.float64))
        crow.append(crow[-1] + c.numel())
    return torch.tensor(crow), torch.cat(cols), torch.cat(costs)


def dense_of(crow, col, cost, n, m, maximize):
    # duplicate edges: the better one counts
    fill = -torch.inf if maximize else torch.inf
    dense = torch.full((n, m), fill, dtype=torch.float64)
    for i in range(n):
        for e in range(int(crow[i]), int(crow[i + 1])):
            j = int(col[e])
            dense[i, j] = max(dense[i, j], cost[e]) if maximize else min(dense[i, j], cost[e])
    return dense


@pytest.mark.parametrize("maximize", [False, True])
def test_sparse_op_against_dense_solver(maximize):
    for seed in range(20):
        n, m = 30, 30 + seed % 3 * 7
        crow, col, cost = random_sparse(seed, n, m, 3)
        x, u, v = sparse_linear_sum_assignment(crow, col, cost, m, maximize)
        dense = dense_of(crow, col, cost, n, m, maximize)
        assert nat_ext.check_optimality(dense, x, u, v, maximize=maximize), f"seed {seed}"
        ref = torch.ops.nat.linear_sum_assignment(dense, maximize)
        assert float(dense.gather(1, x[:, None]).sum()) == pytest.approx(
            float(dense.gather(1, ref[:, None]).sum()), abs=1e-9), f"seed {seed}"
        # warm from a random matching and random prices: the same optimum, a valid certificate
        g = torch.Generator().manual_seed(seed)
        x0 = torch.randperm(m, generator=g)[:n]
        x0[::4] = -1
        v0 = torch.randn(m, generator=g, dtype=torch.float64)
        xw, uw, vw = sparse_linear_sum_assignment(crow, col, cost, m, maximize, x0, v0)
        assert nat_ext.check_optimality(dense, xw, uw, vw, maximize=maximize), f"seed {seed}"


def test_sparse_op_auction_on_torch_threads_matches_scipy_and_one_thread():
    # 3,000 rows: the auction runs its phases on at::parallel_for and leaves rows to Dijkstra
    scipy_optimize = pytest.importorskip("scipy.optimize")
    n, m = 3000, 3100
    g = torch.Generator().manual_seed(5)
    crow = torch.arange(0, 9 * n + 1, 9)
    col = torch.randint(0, m, (9 * n,), generator=g)
    col[::9] = torch.randperm(m, generator=g)[:n]  # a perfect matching: feasible
    cost = torch.rand(9 * n, generator=g, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sparse_linear_sum_assignment(crow, col, cost, m, True)
        torch.set_num_threads(2)
        two = sparse_linear_sum_assignment(crow, col, cost, m, True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    x, u, v = two
    rows = torch.repeat_interleave(torch.arange(n), crow.diff())
    # a missing edge is never worth taking; of duplicate edges the better counts
    dense = torch.full((n * m,), -1e9, dtype=torch.float64).scatter_reduce_(0, rows * m + col, cost, "amax")
    dense = dense.view(n, m)
    ri, ci = scipy_optimize.linear_sum_assignment(dense.numpy(), maximize=True)
    assert float(dense[torch.arange(n), x].sum()) == pytest.approx(float(dense.numpy()[ri, ci].sum()), abs=1e-9)
    assert float((cost - u[rows] - v[col]).max()) <= 1e-12  # dual feasible on every edge
    assert torch.allclose(u + v[x], dense[torch.arange(n), x], atol=1e-12, rtol=0)  # tight pairs


def test_sparse_op_opcheck():
    crow, col, cost = random_sparse(0, 10, 12, 2)
    torch.library.opcheck(torch.ops.nat.sparse_linear_sum_assignment.default,
                          (crow, col, cost, 12, True, None, None))
    torch.library.opcheck(torch.ops.nat.sparse_linear_sum_assignment.default,
                          (crow, col, cost, 12, False, torch.arange(10), torch.zeros(12,
                                                                      dtype=torch.float64)))


def test_sparse_op_errors():
    crow, col, cost = random_sparse(0, 4, 5, 1)
    with pytest.raises(ValueError, match="infeasible"):
        # two rows whose only column is 0
        sparse_linear_sum_assignment(torch.tensor([0, 1, 2]), torch.tensor([0, 0]),
                                     torch.tensor([1.0, 2.0], dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="col\\[0\\]"):
        sparse_linear_sum_assignment(crow, col + 5, cost, 5)
    with pytest.raises(ValueError, match="not finite"):
        sparse_linear_sum_assignment(crow, col, cost * torch.nan, 5)
    with pytest.raises(TypeError, match="cost should be Double"):
        sparse_linear_sum_assignment(crow, col, cost.float(), 5)
    with pytest.raises(ValueError, match="n <= m"):
        sparse_linear_sum_assignment(crow, col, cost, 3)
    with pytest.raises(ValueError, match="init_col4row"):
        sparse_linear_sum_assignment(crow, col, cost, 5, False, torch.full((4,), 7))
    # the fake kernel says what eager says
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = [torch.empty(5, dtype=torch.int64), torch.empty(3, dtype=torch.int64),
                torch.empty(3, dtype=torch.float32)]
        with pytest.raises(TypeError, match="cost should be Double"):
            torch.ops.nat.sparse_linear_sum_assignment(*fake, 5)


# --- bad input to assign_full ---

@pytest.mark.parametrize("case, error, match", [
    ("nan feats", ValueError, "feats contains NaN"),
    ("inf targets", ValueError, "targets contains NaN or infinite"),
    ("n > m", ValueError, "n <= m"),
    ("d mismatch", ValueError, "feature size"),
    ("dtype mismatch", TypeError, "targets should have the dtype"),
    ("int feats", TypeError, "feats should be float32 or float64"),
    ("1-D feats", ValueError, "feats should be a 2-D"),
    ("list targets", TypeError, "targets should be a Tensor"),
    ("init shape", ValueError, "init should have shape"),
    ("init dtype", TypeError, "init should be an int64"),
    ("init range", ValueError, "init should hold targets in"),
    ("init negative", ValueError, "init should hold targets in"),
    ("init duplicates", ValueError, "init should be one-to-one"),
    ("k", ValueError, "k should be an int >= 1"),
    ("col_k", ValueError, "col_k should be an int >= 0"),
    ("overflow", ValueError, "not finite"),
    ("overflow float32", ValueError, "not finite"),
])
def test_bad_input(case, error, match):
    f, t = random_problem(0, 6, 8, 3)
    init = torch.arange(6)
    kwargs = {}
    if case == "nan feats":
        f[2, 1] = torch.nan
    elif case == "inf targets":
        t[3, 0] = torch.inf
    elif case == "n > m":
        f, t = t, f
        init = torch.arange(8)
    elif case == "d mismatch":
        t = t[:, :2]
    elif case == "dtype mismatch":
        t = t.float()
    elif case == "int feats":
        f = f.long()
    elif case == "1-D feats":
        f = f[0]
    elif case == "list targets":
        t = t.tolist()
    elif case == "init shape":
        init = torch.arange(5)
    elif case == "init dtype":
        init = init.double()
    elif case == "init range":
        init[0] = 8
    elif case == "init negative":
        init[0] = -1
    elif case == "init duplicates":
        init[0] = init[1]
    elif case == "k":
        kwargs["k"] = 0
    elif case == "col_k":
        kwargs["col_k"] = -1
    elif case == "overflow":
        f, t = f * 1e300, t * 1e300
    elif case == "overflow float32":
        f, t = f.float() * 1e20, t.float() * 1e20
    with pytest.raises(error, match=match):
        nat_ext.assign_full(f, t, init=init, **kwargs)


@pytest.mark.cuda
def test_device_mismatch():
    f, t = random_problem(0, 6, 8, 3)
    with pytest.raises(ValueError, match="targets should be on the device"):
        nat_ext.assign_full(f.cuda(), t)
    with pytest.raises(ValueError, match="init should be on the device"):
        nat_ext.assign_full(f.cuda(), t.cuda(), init=torch.arange(6))


def scan_problem(dtype, nr=2600, m=5000, d=8, seed=0):
    """Integer features and targets, offsets on a 1/4 grid: every score and ranking value is
    exact in bfloat16, float32 and float64 alike, so the lists have one right answer (ties:
    lower column, lower row first)."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randint(-3, 4, (nr, d), generator=g).to(dtype)
    t = torch.randint(-3, 4, (m, d), generator=g).to(dtype)
    ro = torch.randint(-8, 9, (nr,), generator=g).float() / 4
    co = torch.randint(-8, 9, (m,), generator=g).float() / 4
    thr = torch.randint(-40, 20, (nr,), generator=g).float() / 4
    held = [torch.randperm(m, generator=g)[:int(torch.randint(0, 30, (1,), generator=g))].sort()
            .values for _ in range(nr)]
    crow = torch.tensor([0] + [len(h) for h in held]).cumsum(0)
    return f, t, ro, co, thr, (crow, torch.cat(held))


def scan_reference(f, t, ro, co, thr, held, k, kc, row0):
    r = f.double() @ t.double().T - ro.double()[:, None] - co.double()[None, :]
    crow, col = held
    rows = torch.repeat_interleave(torch.arange(f.shape[0]), crow.diff())
    r[rows, col] = -torch.inf
    above = r > thr.double()[:, None]
    vals, idx = torch.sort(torch.where(above, r, -torch.inf), dim=1, descending=True, stable=True)
    vals, idx = vals[:, :k], idx[:, :k]
    idx = torch.where(vals > -torch.inf, idx, -1)
    exact = (f.double() @ t.double().T).gather(1, idx.clamp(min=0))
    cvals, crows = torch.sort(r, dim=0, descending=True, stable=True)
    cvals, crows = cvals[:kc], crows[:kc] + row0
    crows = torch.where(cvals > -torch.inf, crows, -1)
    return vals.float(), idx, exact, above.sum(1), r.amax(1).float(), cvals.float(), crows


def run_scan(fn, f, t, ro, co, thr, held, k, kc, row0, tiles):
    """The scan state after passing the tiles of t, as assign_full's passes do."""
    from nat_ext.full_assign import _Lists
    out = _Lists(f.shape[0], k, t.shape[0], kc, f.device)
    fe = f.double() if f.dtype == torch.bfloat16 else f
    for c0, c1 in tiles:
        cv, cr = out.col_vals[:, c0:c1].contiguous(), out.col_rows[:, c0:c1].contiguous()
        fn(f, t[c0:c1], fe, (t.double() if t.dtype == torch.bfloat16 else t)[c0:c1], ro,
           co[c0:c1].contiguous(), thr, held[0], held[1], row0, c0, out.vals, out.idx, out.exact,
           out.count, out.max, cv, cr)
        out.col_vals[:, c0:c1], out.col_rows[:, c0:c1] = cv, cr
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_scan_kernel_against_dense_reference(dtype):
    # the fused CPU pass (blocks of 2048 rows x 2048 targets, two tiles, state carried between
    # them) against a dense float64 computation written here: lists, counts, maxima, exact
    # scores and column lists, ties included
    f, t, ro, co, thr, held = scan_problem(dtype)
    ref = scan_reference(f, t, ro, co, thr, held, 6, 3, 40)
    got = run_scan(torch.ops.nat._full_scan, f, t, ro, co, thr, held, 6, 3, 40,
                   [(0, 2600), (2600, 5000)])
    names = ["vals", "idx", "exact", "count", "max", "col_vals", "col_rows"]
    for name, want in zip(names, ref):
        have = getattr(got, name)
        assert torch.equal(torch.where(want.isnan(), 0, want) if want.is_floating_point() else want,
                           torch.where(have.isnan(), 0, have) if have.is_floating_point() else have), name


@pytest.mark.parametrize("block", [1 << 28, 1000, 50000])
def test_scan_torch_path_against_dense_reference(block, monkeypatch):
    # the GPU's pass (torch ops), on the CPU, in blocks of rows (one row, ~70, all): the same
    # values; its columns may differ on ties
    monkeypatch.setattr(nat_ext.full_assign, "_TORCH_BLOCK", block)
    f, t, ro, co, thr, held = scan_problem(torch.float32, nr=300, m=1500)
    from nat_ext.full_assign import _scan_torch
    ref = scan_reference(f, t, ro, co, thr, held, 6, 3, 0)
    got = run_scan(_scan_torch, f, t, ro, co, thr, held, 6, 3, 0, [(0, 700), (700, 1500)])
    assert torch.equal(got.vals, ref[0]) and torch.equal(got.count, ref[3])
    assert torch.equal(got.max, ref[4]) and torch.equal(got.col_vals, ref[5])
    kept = got.idx >= 0
    assert torch.equal(kept, ref[1] >= 0)
    scores = (f.double() @ t.double().T).gather(1, got.idx.clamp(min=0))
    assert torch.equal(got.exact[kept], scores[kept])


def test_scan_kernel_nan_row_max():
    # an overflowed product (inf - inf) marks the row's maximum NaN: the caller raises on it
    f = torch.tensor([[1e30, 1e30], [1.0, 0.0]])
    t = torch.tensor([[1e30, -1e30], [1.0, 1.0]])
    got = run_scan(torch.ops.nat._full_scan, f, t, torch.zeros(2), torch.zeros(2),
                   torch.full((2,), -torch.inf), (torch.zeros(3, dtype=torch.int64),
                                                  torch.zeros(0, dtype=torch.int64)),
                   1, 0, 0, [(0, 2)])
    assert got.max[0].isnan() and got.max[1] == torch.tensor(1e30)


def test_torch_scan_path(monkeypatch):
    # the whole solve through the GPU's pass (torch ops), run on the CPU: the cold route with its
    # rescans against subsets of the columns, then a warm re-solve (a cut on the pass's lists)
    monkeypatch.setattr(nat_ext.full_assign, "_TORCH_SCAN", True)
    restricted = 0
    for seed in range(3):
        f, t = random_problem(seed, 200, 230, 8)
        st = {}
        x, u, v = nat_ext.assign_full(f, t, return_duals=True, k=3, col_k=2, stats=st)
        assert certificate_holds(f, t, x, u, v), f"seed {seed}"
        assert total(f, t, x) == pytest.approx(dense_optimum(f, t), rel=1e-12), f"seed {seed}"
        restricted += sum(st["restricted_rows"])
        f2 = f + 0.05 * torch.randn(f.shape, generator=torch.Generator().manual_seed(seed),
                                    dtype=f.dtype)
        st = {}
        xw, uw, vw = nat_ext.assign_sharded(f2, 0, 200, t, x, warm=(x, u, v), k=3, stats=st)
        assert st["warm"] and certificate_holds(f2, t, xw, uw, vw), f"seed {seed}"
        assert total(f2, t, xw) == pytest.approx(dense_optimum(f2, t), rel=1e-12), f"seed {seed}"
    assert restricted > 0


@pytest.mark.parametrize("m_extra", [0, 40])
def test_candidates_in_input_dtype(m_extra):
    # no bfloat16 ranking and no bfloat16 pricing filter (the path of CPUs without native
    # bfloat16 and of the GPU)
    for seed in range(3):
        f, t = random_problem(seed, 250, 250 + m_extra, 12)
        x, u, v = nat_ext.assign_full(f, t, return_duals=True, k=3,
                                      candidate_dtype=torch.float64)
        assert certificate_holds(f, t, x, u, v), f"seed {seed}"
        assert total(f, t, x) == pytest.approx(dense_optimum(f, t), rel=1e-12), f"seed {seed}"
