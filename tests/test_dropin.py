"""The scipy drop-in as a user of another NAT codebase meets it: patch_scipy, the tie rule,
numpy arrays as scipy takes them, nat_ext.assign on numpy and mixed dtypes, and the messages.
Oracles: scipy, brute-force enumeration, dual certificates."""

import importlib.util
import itertools
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

import nat_ext

SCIPY_LSA = scipy.optimize.linear_sum_assignment  # scipy's own, bound before any patch


@pytest.fixture(autouse=True)
def scipy_restored():
    yield
    nat_ext.unpatch_scipy()
    assert scipy.optimize.linear_sum_assignment is SCIPY_LSA


# --- patch_scipy ----------------------------------------------------------------------------------

def test_patch_redirects_full_name_calls_and_later_imports(tmp_path):
    nat_ext.patch_scipy()
    assert nat_ext.scipy_is_patched()
    assert scipy.optimize.linear_sum_assignment is nat_ext.linear_sum_assignment
    assert scipy.optimize._lsap.linear_sum_assignment is nat_ext.linear_sum_assignment
    # A module imported after the patch, using both call patterns of the NAT codebases.
    user = tmp_path / "nat_user_module.py"
    user.write_text("import scipy.optimize\n"
                    "from scipy.optimize import linear_sum_assignment\n"
                    "def by_full_name(c): return scipy.optimize.linear_sum_assignment(c)\n"
                    "def by_import(c): return linear_sum_assignment(c)\n")
    spec = importlib.util.spec_from_file_location("nat_user_module", user)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.linear_sum_assignment is nat_ext.linear_sum_assignment
    # Behaviour, not only identity: a batch is something only ours takes.
    batch = np.random.default_rng(0).random((3, 4, 4))
    rows, cols = module.by_full_name(batch)
    assert cols.shape == (3, 4)
    with pytest.raises(ValueError):
        SCIPY_LSA(batch)
    nat_ext.unpatch_scipy()
    assert not nat_ext.scipy_is_patched()
    assert scipy.optimize.linear_sum_assignment is SCIPY_LSA
    assert scipy.optimize._lsap.linear_sum_assignment is SCIPY_LSA
    with pytest.raises(ValueError, match="expected a matrix"):
        module.by_full_name(batch)  # scipy's again


def test_patch_is_idempotent_and_reversible():
    nat_ext.unpatch_scipy()  # unpatching an unpatched scipy does nothing
    assert scipy.optimize.linear_sum_assignment is SCIPY_LSA
    nat_ext.patch_scipy()
    nat_ext.patch_scipy()  # twice: scipy's original is still the one kept
    assert scipy.optimize.linear_sum_assignment is nat_ext.linear_sum_assignment
    nat_ext.unpatch_scipy()
    assert scipy.optimize.linear_sum_assignment is SCIPY_LSA


def test_context_manager_restores_what_it_found(capsys):
    with nat_ext.scipy_patched(verbose=True):
        assert scipy.optimize.linear_sum_assignment is nat_ext.linear_sum_assignment
    assert "patched" in capsys.readouterr().out
    assert scipy.optimize.linear_sum_assignment is SCIPY_LSA
    nat_ext.patch_scipy()
    with nat_ext.scipy_patched():
        pass
    assert nat_ext.scipy_is_patched()  # patched before the block: still patched after it
    with pytest.raises(RuntimeError):
        with nat_ext.scipy_patched():
            raise RuntimeError("inside")
    assert scipy.optimize.linear_sum_assignment is nat_ext.linear_sum_assignment


# --- the tie rule: lexicographically smallest optimal assignment --------------------------------

def brute_force_lexmin(cost: np.ndarray) -> tuple[int, ...]:
    """Among all injective rows -> columns maps of minimum total, the lexicographically
    smallest column list (integer costs, so totals compare exactly)."""
    n, m = cost.shape
    best, best_cols = None, None
    for cols in itertools.permutations(range(m), n):  # generated in lexicographic order
        t = sum(cost[i, c] for i, c in enumerate(cols))
        if best is None or t < best:
            best, best_cols = t, cols
    return best_cols


@pytest.mark.parametrize("n,m", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (3, 5),
                                 (4, 6), (2, 7), (5, 6)])
@pytest.mark.parametrize("maximize", [False, True])
def test_tie_rule_is_the_lexicographically_smallest_optimum(n, m, maximize):
    for seed in range(30):
        rng = np.random.default_rng(1000 * n + 10 * m + seed)
        cost = rng.integers(0, 3, size=(n, m)).astype(np.float64)
        cost[rng.random((n, m)) < 0.1] = np.inf if not maximize else -np.inf
        try:
            SCIPY_LSA(cost, maximize=maximize)
        except ValueError:
            continue  # infeasible
        expected = brute_force_lexmin(-cost if maximize else cost)
        rows, cols = nat_ext.linear_sum_assignment(cost, maximize=maximize)
        assert tuple(cols) == expected, f"seed {seed}: {cols} vs {expected}\n{cost}"
        op_cols = torch.ops.nat.linear_sum_assignment(torch.from_numpy(cost), maximize)
        assert tuple(op_cols.tolist()) == expected, f"seed {seed} (op)"
        if n == m:
            auction = torch.ops.nat.linear_sum_assignment(torch.from_numpy(cost), maximize,
                                                          "auction")
            assert tuple(auction.tolist()) == expected, f"seed {seed} (auction)"


@pytest.mark.parametrize("n,m", [(9, 9), (10, 10), (8, 11), (11, 11), (6, 12)])
@pytest.mark.parametrize("kind", ["0..2", "mostly 0", "mostly 1"])
def test_tie_rule_against_scipy_on_lexicographic_weights(n, m, kind):
    """Larger than brute force reaches: with integer costs, the lexicographically smallest
    optimum is scipy's unique optimum of cost * big + sum_i col_i * m^(n-1-i) (all exact in
    float64: below 2^53). "mostly 0" makes most pairs tight, past what the tie pass stores, so
    it searches by scanning rows; the others keep the tight pairs stored."""
    weights = np.array([[j * float(m) ** (n - 1 - i) for j in range(m)] for i in range(n)])
    big = float(m) ** n
    for seed in range(20):
        rng = np.random.default_rng(seed)
        if kind == "0..2":
            cost = rng.integers(0, 3, size=(n, m)).astype(np.float64)
        else:
            ones = rng.random((n, m)) < (0.15 if kind == "mostly 0" else 0.85)
            cost = ones.astype(np.float64)
        assert (cost.max() * n + 1) * big < 2 ** 53
        _, expected = SCIPY_LSA(cost * big + weights)
        rows, cols = nat_ext.linear_sum_assignment(cost)
        np.testing.assert_array_equal(cols, expected, err_msg=f"seed {seed}")


def test_tie_rule_for_more_rows_than_columns_applies_to_the_transpose():
    for seed in range(30):
        cost = np.random.default_rng(seed).integers(0, 3, size=(6, 4)).astype(np.float64)
        rows, cols = nat_ext.linear_sum_assignment(cost)
        row_of_col = np.empty(4, dtype=np.int64)
        row_of_col[cols] = rows
        assert tuple(row_of_col) == brute_force_lexmin(cost.T), f"seed {seed}"


@pytest.mark.parametrize("n,m", [(64, 64), (50, 80), (200, 200)])
def test_tie_rule_keeps_certificates_and_optimum(n, m):
    """Many ties (costs 0..3): the canonical answer is still certified optimal, equals scipy's
    total, and does not depend on the batch it is solved in or on the thread count."""
    rng = np.random.default_rng(n + m)
    cost = torch.from_numpy(rng.integers(0, 4, size=(5, n, m)).astype(np.float64))
    cols, u, v = nat_ext.solve_with_duals(cost)
    assert nat_ext.check_optimality(cost, cols, u, v)
    for b in range(5):
        r, c = SCIPY_LSA(cost[b].numpy())
        assert cost[b][torch.arange(n), cols[b]].sum() == cost[b].numpy()[r, c].sum()
        assert torch.equal(torch.ops.nat.linear_sum_assignment(cost[b]), cols[b])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(torch.ops.nat.linear_sum_assignment(cost), cols)
    finally:
        torch.set_num_threads(threads)


def test_constant_matrices_give_the_identity():
    for n, m in [(8, 8), (5, 9), (9, 5), (100, 100)]:
        rows, cols = nat_ext.linear_sum_assignment(np.full((n, m), 3.5))
        k = min(n, m)
        np.testing.assert_array_equal(rows, np.arange(k))
        np.testing.assert_array_equal(cols, np.arange(k))


# --- numpy input as scipy takes it ----------------------------------------------------------------

def numpy_variants(base: np.ndarray):
    ro = base.copy()
    ro.flags.writeable = False
    yield "big-endian", base.astype(base.dtype.newbyteorder(">"))
    yield "read-only", ro
    yield "fortran", np.asfortranarray(base)
    yield "negative strides", base[::-1, ::-1].copy()[::-1, ::-1]
    yield "sliced", np.concatenate([base, base], axis=1)[:, ::2]
    yield "float32", base.astype(np.float32)
    yield "float16", base.astype(np.float16)
    yield "int", (base * 100).astype(np.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # np.matrix itself warns
        matrix = np.asmatrix(base)
    yield "matrix", matrix
    yield "list", base.tolist()
    unaligned = np.frombuffer(b"\0" + base.astype(np.float64).tobytes(), np.float64,
                              count=base.size, offset=1).reshape(base.shape)
    yield "unaligned", unaligned


@pytest.mark.parametrize("shape", [(5, 5), (4, 7), (7, 4)])
@pytest.mark.parametrize("maximize", [False, True])
def test_numpy_variants_match_scipy_without_warnings(shape, maximize):
    base = np.random.default_rng(7).random(shape)
    for name, arr in numpy_variants(base):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rows, cols = nat_ext.linear_sum_assignment(arr, maximize=maximize)
        ref_rows, ref_cols = SCIPY_LSA(arr, maximize=maximize)
        a = np.asarray(arr, dtype=np.float64)
        assert rows.dtype == np.int64 and cols.dtype == np.int64, name
        np.testing.assert_array_equal(rows, ref_rows, err_msg=name)
        assert a[rows, cols].sum() == pytest.approx(a[ref_rows, ref_cols].sum(), rel=1e-12), name


def test_read_only_batch_goes_through_torch_without_warning():
    batch = np.random.default_rng(3).random((3, 5, 6)).astype(">f4")
    batch.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows, cols = nat_ext.linear_sum_assignment(batch)
    for b in range(3):
        r, c = SCIPY_LSA(batch[b])
        assert batch[b][rows[b], cols[b]].sum() == pytest.approx(batch[b][r, c].sum())


def test_messages_name_the_argument_and_read_well():
    with pytest.raises(ValueError, match=r"^linear_sum_assignment: cost matrix is infeasible: "
                                         r"no assignment of every row avoids the forbidden "
                                         r"\(infinite\) entries$"):
        nat_ext.linear_sum_assignment(np.array([[np.inf, 1.0], [np.inf, 2.0]]))
    with pytest.raises(ValueError, match=r"infeasible: batch item 1 has no assignment"):
        nat_ext.linear_sum_assignment(torch.tensor([[[1.0]], [[torch.inf]]]))
    # n > m is solved transposed; the index reported is the caller's, not the transpose's.
    cost = np.ones((4, 2))
    cost[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"cost\[3\]\[1\] is nan"):
        nat_ext.linear_sum_assignment(cost)
    with pytest.raises(ValueError, match=r"cost\[3\]\[1\] is nan"):
        nat_ext.linear_sum_assignment(torch.from_numpy(cost))
    batch = np.ones((2, 5, 3))
    batch[1, 4, 0] = -np.inf
    with pytest.raises(ValueError, match=r"cost\[1\]\[4\]\[0\] is -inf"):
        nat_ext.linear_sum_assignment(batch)
    with pytest.raises(TypeError, match="cost_matrix: Cannot cast array data"):
        nat_ext.linear_sum_assignment(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="cost_matrix: expected a matrix .* got a 1-D"):
        nat_ext.linear_sum_assignment(np.zeros(3))


# --- nat_ext.assign on numpy and mixed dtypes -----------------------------------------------------

def scipy_assign(feats: np.ndarray, targets: np.ndarray) -> np.ndarray:
    rows, cols = SCIPY_LSA(np.asarray(feats, np.float64) @ np.asarray(targets, np.float64).T,
                           maximize=True)
    return cols


def test_assign_numpy_in_numpy_out():
    rng = np.random.default_rng(11)
    feats, targets = rng.standard_normal((6, 4)), rng.standard_normal((9, 4))
    big = targets.astype(">f8")
    big.flags.writeable = False
    for f, t in [(feats, targets), (feats.astype(np.float32), targets), (feats, big),
                 (feats.tolist(), targets)]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cols = nat_ext.assign(f, t)
        assert isinstance(cols, np.ndarray) and cols.dtype == np.int64
        np.testing.assert_array_equal(cols, scipy_assign(np.asarray(f), t))
    batch = nat_ext.assign(np.stack([feats, feats[::-1]]), np.stack([targets, targets]))
    assert batch.shape == (2, 6)


def test_assign_mixed_dtypes_compute_in_the_wider():
    rng = np.random.default_rng(12)
    # float32 feats whose products round differently in float32: only float64 finds scipy's
    # (float64) optimum on these near ties.
    base = rng.standard_normal((40, 16))
    feats32 = torch.from_numpy(base.astype(np.float32))
    targets64 = torch.from_numpy(base + 1e-9 * rng.standard_normal((40, 16)))
    cols = nat_ext.assign(feats32, targets64)
    wide = nat_ext.assign(feats32.double(), targets64)
    assert torch.equal(cols, wide)
    assert isinstance(cols, torch.Tensor)
    half = nat_ext.assign(feats32.half(), targets64.bfloat16())  # -> float32
    assert half.shape == (40,)
    cols = nat_ext.assign(feats32, targets64.numpy())  # tensor and array: a tensor
    assert isinstance(cols, torch.Tensor) and torch.equal(cols, wide)
    with pytest.raises(TypeError, match="assign: feats should be float32"):
        nat_ext.assign(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3))


def test_wrappers_trace_whole_under_torch_compile():
    """The drop-in and assign, on tensors, stay inside one graph (no break on the numpy path)."""
    @torch.compile(fullgraph=True)
    def step(cost, feats, targets):
        rows, cols = nat_ext.linear_sum_assignment(cost)
        return cols, nat_ext.assign(feats, targets)  # float32 with float64: promoted

    g = torch.Generator().manual_seed(4)
    cost, feats = torch.rand(3, 5, 6, generator=g), torch.randn(3, 5, 4, generator=g)
    targets = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    cols, idx = step(cost, feats, targets)
    assert torch.equal(cols, nat_ext.linear_sum_assignment(cost)[1])
    assert torch.equal(idx, torch.ops.nat.assign(feats.double(), targets))
