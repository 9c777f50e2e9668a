"""The exact NAT assignment over a whole dataset without the n x m score matrix:
`assign_full`, and the sparse solver op it rests on, `sparse_linear_sum_assignment`.

Route (column generation with a dual certificate as the stopping rule):
1. candidates: each row's top-k targets by score (chunked matmul + topk, on feats' device),
   plus the row's target in `init` (the identity when no init is given), so the sparse problem
   always has a perfect matching and starts warm;
2. solve the sparse problem exactly with duals (`nat::sparse_linear_sum_assignment`, shortest
   augmenting paths over the candidate lists on the CPU, warm from the previous round's matching
   and prices);
3. price out: stream the dense scores again in chunks and look for pairs with
   s_ij > u_i + v_j. None: the duals certify the sparse optimum over all n x m pairs, so it is
   the dense optimum. Some: add each violating row's most violating pairs (k of them in the
   first round, twice as many each round after, so adversarial inputs need few rounds) and go
   back to 2.
Unassigned targets keep v = 0 and every assigned one has v >= 0 (the sparse solver's rectangular
certificate), so m > n needs nothing more: a pair with an unassigned target is priced as any
other.

Why this route: the dense scores never exist at once (memory O(n k + chunk x m)), each round
costs one streamed matmul, which is what the dense solve's score computation costs anyway, and
the certificate is checked on the very scores that define the problem. An epsilon-scaled
auction would also give duals, but needs an exact finish anyway; the shortest augmenting paths
are exact from the start and re-solve warm, touching only the rows whose pairs lost tightness.
"""

import logging
import math
import time
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_OP = "sparse_linear_sum_assignment"
_DTYPE_NAMES = {torch.int64: "Long", torch.float64: "Double"}  # as the C++ checks print them


def sparse_linear_sum_assignment(crow: Tensor, col: Tensor, cost: Tensor, m: int,
                                 maximize: bool = False, init_col4row: Tensor | None = None,
                                 init_v: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Solves one sparse assignment problem exactly, with its dual certificate (CPU only).

    Row i may take only the columns col[crow[i]:crow[i+1]], at costs cost[crow[i]:crow[i+1]].

    Args:
        crow: int64 Tensor[n + 1], row offsets (crow[0] == 0, non-decreasing, crow[n] == nnz).
        col: int64 Tensor[nnz], columns in [0, m). Duplicate edges are allowed.
        cost: float64 Tensor[nnz], finite.
        m: number of columns, m >= n.
        maximize: maximise the total instead of minimising it.
        init_col4row: int64 Tensor[n], a previous matching to start from (-1: a free row); its
            pairs that are tight under init_v are kept.
        init_v: float64 Tensor[m], previous column prices of the problem as posed.

    Returns:
        (col4row, u, v): int64 Tensor[n] and float64 Tensor[n], Tensor[m] with u_i + v_j <= cost
        on every edge (>= when maximising), equality on the assigned pairs, unassigned columns
        at v = 0 and every other column at v <= 0 (>= 0 when maximising). Raises ValueError
        when no matching of every row uses the given edges.
    """
    return torch.ops.nat.sparse_linear_sum_assignment.default(crow, col, cost, m, maximize,
                                                              init_col4row, init_v)


def _check_vector_fake(t: Tensor, name: str, dtype: torch.dtype, size=None) -> None:
    torch._check_value(t.dim() == 1, lambda: f"{_OP}: {name} should be a 1-D tensor, got "
                       f"{t.dim()}-D with shape {list(t.shape)}")
    torch._check_type(t.dtype == dtype, lambda: f"{_OP}: {name} should be {_DTYPE_NAMES[dtype]}, "
                      f"got {_DTYPE_NAMES.get(t.dtype, t.dtype)}")
    if size is not None:
        torch._check_value(t.shape[0] == size,
                           lambda: f"{_OP}: {name} should have {size} entries, got {t.shape[0]}")


@torch.library.register_fake("nat::sparse_linear_sum_assignment")
def _sparse_linear_sum_assignment_fake(crow: Tensor, col: Tensor, cost: Tensor, m: int,
                                       maximize: bool = False,
                                       init_col4row: Tensor | None = None,
                                       init_v: Tensor | None = None):
    _check_vector_fake(crow, "crow", torch.int64)
    torch._check_value(crow.shape[0] >= 1,
                       lambda: f"{_OP}: crow should have n + 1 >= 1 entries, got 0")
    n = crow.shape[0] - 1
    torch._check_value(n <= m, lambda: f"{_OP}: the problem should have no more rows than "
                       f"columns (n <= m), got n={n}, m={m}")
    _check_vector_fake(col, "col", torch.int64)
    _check_vector_fake(cost, "cost", torch.float64, col.shape[0])
    if init_col4row is not None:
        _check_vector_fake(init_col4row, "init_col4row", torch.int64, n)
    if init_v is not None:
        _check_vector_fake(init_v, "init_v", torch.float64, m)
    return (cost.new_empty(n, dtype=torch.int64), cost.new_empty(n), cost.new_empty(m))


def _check_inputs(feats: Any, targets: Any, init: Any, k: int) -> None:
    """The argument checks of assign_full: TypeError / ValueError naming the argument."""
    for name, t in (("feats", feats), ("targets", targets)):
        if not isinstance(t, Tensor):
            raise TypeError(f"assign_full: {name} should be a Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"assign_full: {name} should be a 2-D tensor, got {t.dim()}-D with "
                             f"shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"assign_full: {name} should be float32 or float64, got {t.dtype}")
    if targets.dtype != feats.dtype:
        raise TypeError(f"assign_full: targets should have the dtype of feats ({feats.dtype}), "
                        f"got {targets.dtype}")
    if targets.device != feats.device:
        raise ValueError(f"assign_full: targets should be on the device of feats ({feats.device}),"
                         f" got {targets.device}")
    (n, d), m = feats.shape, targets.shape[0]
    if targets.shape[1] != d:
        raise ValueError(f"assign_full: targets should have the feature size d={d} of feats, got "
                         f"{targets.shape[1]}")
    if n > m:
        raise ValueError(f"assign_full: feats should have no more rows than targets (n <= m), "
                         f"got n={n}, m={m}")
    for name, t in (("feats", feats), ("targets", targets)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"assign_full: {name} contains NaN or infinite values")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"assign_full: k should be a positive int, got {k!r}")
    if init is None:
        return
    if not isinstance(init, Tensor):
        raise TypeError(f"assign_full: init should be a Tensor or None, got {type(init).__name__}")
    if init.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"assign_full: init should be an int64 (or int32) tensor, got "
                        f"{init.dtype}")
    if init.device != feats.device:
        raise ValueError(f"assign_full: init should be on the device of feats ({feats.device}), "
                         f"got {init.device}")
    if tuple(init.shape) != (n,):
        raise ValueError(f"assign_full: init should have shape ({n},), one target per feats row, "
                         f"got {tuple(init.shape)}")
    if n and (int(init.min()) < 0 or int(init.max()) >= m):
        raise ValueError(f"assign_full: init should hold targets in [0, {m}), got values in "
                         f"[{int(init.min())}, {int(init.max())}]")
    if n and bool((torch.sort(init).values.diff() == 0).any()):
        raise ValueError("assign_full: init should be one-to-one, but a target appears twice")


def _row_chunks(n: int, m: int, chunk_elems: int):
    rows = max(1, min(n, chunk_elems // max(m, 1)))
    return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]


def _not_finite_error() -> ValueError:
    return ValueError("assign_full: feats @ targets^T is not finite (the product overflowed)")


class _Candidates:
    """The candidate pairs, as sorted keys row * m + col with their scores (on the CPU)."""

    def __init__(self, n: int, m: int):
        self.n, self.m = n, m
        self.keys = torch.empty(0, dtype=torch.int64)
        self.scores = torch.empty(0, dtype=torch.float64)

    def add(self, rows: Tensor, cols: Tensor, scores: Tensor) -> int:
        """Adds the pairs not held yet; returns how many were new."""
        keys = (rows.to("cpu", torch.int64) * self.m + cols.to("cpu", torch.int64))
        keys, first = _unique_first(keys)
        scores = scores.to("cpu", torch.float64)[first]
        fresh = ~torch.isin(keys, self.keys)
        keys, scores = keys[fresh], scores[fresh]
        if keys.numel():
            merged = torch.cat([self.keys, keys])
            order = torch.argsort(merged)
            self.keys, self.scores = merged[order], torch.cat([self.scores, scores])[order]
        return int(keys.numel())

    def csr(self) -> tuple[Tensor, Tensor, Tensor]:
        rows = torch.div(self.keys, self.m, rounding_mode="floor")
        crow = torch.zeros(self.n + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=self.n), 0)
        return crow, self.keys - rows * self.m, self.scores


def _unique_first(keys: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct keys and, for each, the index of one occurrence."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.empty(uniq.numel(), dtype=torch.int64).scatter_(
        0, inverse, torch.arange(keys.numel(), dtype=torch.int64))
    return uniq, first


def assign_full(feats: Tensor, targets: Tensor, init: Tensor | None = None,
                return_duals: bool = False, *, k: int = 8, chunk_elems: int = 1 << 24,
                stats: dict | None = None) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The exact assignment of every feats row to its own target over the whole dataset,
    maximising sum_i feats_i . targets_c(i), without forming the n x m score matrix.

    Column generation (see the module docstring): top-k candidates, an exact sparse solve with
    duals, and pricing passes over the streamed scores until no pair violates the duals. Memory
    O(n k + chunk_elems); time one streamed matmul per round plus the sparse solves.

    Exactness: the answer is the optimum of the scores as this function computes them (feats
    @ targets^T, chunked, in feats' dtype). The stopping rule certifies u_i + v_j >= s_ij - tol
    for every pair, with tol = 4 eps (sqrt(d) max|f_i| max|t_j| + max|u| + max|v|) and eps the
    dtype's machine epsilon (about 1e-14 relative for float64, 1e-5 for float32 at d = 64):
    pairs within rounding of the duals are not chased, so the total is optimal to within n tol.

    Args:
        feats: Tensor[n, d], float32 or float64, finite; CPU or CUDA.
        targets: Tensor[m, d] with m >= n, same dtype and device, finite.
        init: int64 (or int32) Tensor[n], the held assignment (a one-to-one map into range(m)),
            on feats' device. Its pairs join the candidates (so the sparse problem is feasible)
            and warm the first solve. None: the identity, for feasibility only.
        return_duals: also return the certificate.
        k: candidates per row from the top-k pass, and the first round's additions per
            violating row (doubled each round).
        chunk_elems: score entries computed at once (rows per chunk = chunk_elems // m).
        stats: a dict to fill with rounds, candidates per row, violations and phase times (s).

    Returns:
        int64 Tensor[n] on feats' device: for each feats row, its target. With return_duals,
        (col4row, u, v): float64 Tensor[n] and Tensor[m] on feats' device with u_i + v_j >=
        feats_i . targets_j (up to tol above) for every pair, equality on the assigned pairs,
        and every unassigned target's v (0) at most every assigned one's.
    """
    _check_inputs(feats, targets, init, k)
    (n, d), m = feats.shape, targets.shape[0]
    device, dtype = feats.device, feats.dtype
    if n == 0:
        cols = torch.empty(0, dtype=torch.int64, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        return (cols, torch.empty(0, **f64), torch.zeros(m, **f64)) if return_duals else cols
    start = time.perf_counter()
    feats, targets = feats.contiguous(), targets.contiguous()
    x0 = (torch.arange(n, device=device) if init is None else init.to(torch.int64))
    chunks = _row_chunks(n, m, chunk_elems)
    eps = torch.finfo(dtype).eps
    scale = float(feats.norm(dim=1).max()) * float(targets.norm(dim=1).max())
    info: dict = {"rounds": 0, "candidates_per_row": [], "violating_rows": [],
                  "time_candidates": 0.0, "time_solve": [], "time_pricing": []}

    # candidates: top-k of each row, and its pair in x0
    kk = min(k, m)
    cand = _Candidates(n, m)
    rows_all, cols_all, scores_all = [], [], []
    for r0, r1 in chunks:
        s = feats[r0:r1] @ targets.T
        vals, idx = s.topk(kk, dim=1)
        vals = torch.cat([vals, s.gather(1, x0[r0:r1, None])], 1)
        if not bool(torch.isfinite(vals).all()):
            raise _not_finite_error()
        rows_all.append(torch.arange(r0, r1, device=device)[:, None].expand(-1, kk + 1))
        cols_all.append(torch.cat([idx, x0[r0:r1, None]], 1))
        scores_all.append(vals)
    cand.add(torch.cat(rows_all).flatten(), torch.cat(cols_all).flatten(),
             torch.cat(scores_all).flatten())
    del rows_all, cols_all, scores_all
    info["time_candidates"] = time.perf_counter() - start

    x, v = x0.cpu(), None
    add = kk
    while True:
        # sparse solve, warm from the previous round
        t0 = time.perf_counter()
        info["rounds"] += 1
        info["candidates_per_row"].append(cand.keys.numel() / n)
        crow, col, cost = cand.csr()
        x, u, v = sparse_linear_sum_assignment(crow, col, cost, m, True, x, v)
        info["time_solve"].append(time.perf_counter() - t0)

        # pricing: the pairs whose score exceeds u_i + v_j
        t0 = time.perf_counter()
        tol = 4 * eps * (math.sqrt(d) * scale + float(u.abs().max()) + float(v.abs().max()))
        u_dev, v_dev = u.to(device, dtype), v.to(device, dtype)
        found_rows, found_cols, found_scores = [], [], []
        nviol = 0
        for r0, r1 in chunks:
            s = feats[r0:r1] @ targets.T
            reduced = s - v_dev
            bound = u_dev[r0:r1] + tol
            best = reduced.amax(dim=1)
            if bool(best.isnan().any()):
                raise _not_finite_error()
            viol = (best > bound).nonzero().squeeze(1)
            if not viol.numel():
                continue
            nviol += viol.numel()
            vals, idx = reduced[viol].topk(min(add, m), dim=1)
            keep = vals > bound[viol, None]
            found_rows.append((viol + r0)[:, None].expand_as(idx)[keep])
            found_cols.append(idx[keep])
            found_scores.append(s[viol].gather(1, idx)[keep])
        info["violating_rows"].append(nviol)
        new = cand.add(torch.cat(found_rows), torch.cat(found_cols),
                       torch.cat(found_scores)) if nviol else 0
        info["time_pricing"].append(time.perf_counter() - t0)
        log.debug("assign_full round %d: %.1f candidates/row, solve %.3fs, pricing %.3fs, "
                  "%d violating rows, %d pairs added", info["rounds"],
                  info["candidates_per_row"][-1], info["time_solve"][-1],
                  info["time_pricing"][-1], nviol, new)
        if not new:
            break  # no pair violates the duals (or only pairs already held, by rounding)
        add = min(2 * add, m)
    info["time_total"] = time.perf_counter() - start
    if stats is not None:
        stats.update(info)
    x = x.to(device)
    if return_duals:
        return x, u.to(device), v.to(device)
    return x
