"""The exact NAT assignment over a whole dataset without the n x m score matrix:
`assign_full`, and the sparse solver op it rests on, `sparse_linear_sum_assignment`.

Route (column generation with a dual certificate as the stopping rule):
1. candidates: one streamed pass of chunked matmuls keeps each row's top-k targets, each
   target's top-col_k rows (so that every target's price is set by the rows that want it most;
   without them nearly every row violated the first duals) and each row's target in `init` (the
   identity when no init is given), so the sparse problem always has a perfect matching and
   starts warm. The pass only ranks: on CPUs with native bfloat16 matmul it runs in bfloat16,
   and the chosen pairs are scored exactly afterwards;
2. solve the sparse problem exactly with duals (`nat::sparse_linear_sum_assignment`, shortest
   augmenting paths over the candidate lists on the CPU, warm from the previous round's matching
   and prices);
3. price out: stream the scores again and look for pairs outside the candidates with
   s_ij > u_i + v_j + tol. None: the duals certify the sparse optimum over all n x m pairs, so it
   is the dense optimum. Some: add each violating row's most violating pairs (k of them in the
   first round, twice as many each round after, so adversarial inputs need few rounds) and go
   back to 2. Between rounds the prices only rise (but on the columns a rectangular warm start
   frees, which are scanned against every row), so a row needs a new scan only when its u fell
   below the bound kept from its last scan; on the CPU a bfloat16 pass with a proven error bound
   (_BF16_ERROR) clears most of those before the exact pass.
Near-parallel features (an untrained network's: every row ranks the targets alike) defeat step
1: every row's top-k names the same few targets, and the rounds must grow the candidates to a
tenth of all targets (n = 8192: 900 per row, 12 rounds; n = 60000 did not fit in 13 GB). There
what a row needs is its top targets by reduced score s_ij - v_j under the optimum's prices (with
those, 16-32 per row certify at once). So, where a sample of rows crowds onto the same
favourite targets, step 1 first solves a random 1/4 of the rows and targets exactly (this
function, so recursively, down to coarse_min), extends its duals to every target (v_j = max over
the sampled rows of s_ij - u_i) and every row (likewise over the sampled targets), each leaving
out a sampled point's own partner, ranks 4k candidates per row and col_k per target by
s_ij - u_i - v_j, and warms the first solve with those prices. The rounds then only correct
the sampling error. The duals enter the bfloat16 ranking pass as extra hi + lo columns, so
they are not rounded to bfloat16. Spread features skip this: their first solve is faster from
zero prices, whose errors are local, than from coarse ones, whose errors are smooth shifts that
the augmenting paths must carry across the whole problem.
Unassigned targets keep v = 0 and every assigned one has v >= 0 (the sparse solver's rectangular
certificate), so m > n needs nothing more: a pair with an unassigned target is priced as any
other.

Why this route: the dense scores never exist at once (memory O(n k + chunk x m)), each round
costs at most one streamed matmul, which is what the dense solve's score computation costs
anyway, and the certificate is checked on the very scores that define the problem. An
epsilon-scaled auction would also give duals, but needs an exact finish anyway; the shortest
augmenting paths are exact from the start and re-solve warm, touching only the rows whose pairs
lost tightness.
"""

import logging
import math
import time
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_OP = "sparse_linear_sum_assignment"
_TORCH_TOPK = False  # tests set it to run the GPU's candidate path (torch.topk) on the CPU
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
        on every edge (>= when maximising), equality on the assigned pairs, and when m > n (or
        without init_v) unassigned columns at v = 0 and every other column at v <= 0 (>= 0
        when maximising); square problems warm from init_v keep its offset. Raises ValueError
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


def _check_inputs(feats: Any, targets: Any, init: Any, k: int, col_k: int,
                  chunk_elems: int, coarse: int = 1, coarse_min: int = 1) -> None:
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
    for name, value, least in (("k", k, 1), ("col_k", col_k, 0), ("chunk_elems", chunk_elems, 1),
                               ("coarse", coarse, 1), ("coarse_min", coarse_min, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"assign_full: {name} should be an int >= {least}, got {value!r}")
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
        # keys is sorted and distinct (torch.unique), as self.keys is: a merge by binary search
        at = torch.searchsorted(self.keys, keys)
        held = self.keys[at.clamp(max=max(self.keys.numel() - 1, 0))] == keys if \
            self.keys.numel() else torch.zeros_like(keys, dtype=torch.bool)
        keys, scores, at = keys[~held], scores[~held], at[~held]
        if keys.numel():
            total = self.keys.numel() + keys.numel()
            new_pos = at + torch.arange(keys.numel())
            old_pos = torch.arange(self.keys.numel()) + torch.searchsorted(keys, self.keys)
            merged_keys = torch.empty(total, dtype=torch.int64)
            merged_scores = torch.empty(total, dtype=torch.float64)
            merged_keys[old_pos], merged_scores[old_pos] = self.keys, self.scores
            merged_keys[new_pos], merged_scores[new_pos] = keys, scores
            self.keys, self.scores = merged_keys, merged_scores
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


class _Found:
    """The violating pairs a pricing pass finds (on feats' device until pairs())."""

    def __init__(self):
        self.rows, self.cols, self.scores = [], [], []

    def violating_rows(self) -> Tensor:
        if not self.rows:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat(self.rows).cpu().unique()

    def pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        return torch.cat(self.rows), torch.cat(self.cols), torch.cat(self.scores)


class _Held:
    """The candidate pairs of one round, to leave out of its pricing (CPU)."""

    def __init__(self, crow: Tensor, col: Tensor):
        self.crow, self.col = crow, col
        self.edge_row = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff())
        self.row_pos = torch.full((crow.numel() - 1,), -1, dtype=torch.int64)

    def pairs(self, ids: Tensor, pos: Tensor | None) -> tuple[Tensor, Tensor]:
        """The pairs of rows `ids` (sorted), as (index into ids, column, or its index in the
        column subset that `pos` maps to)."""
        first, last = int(ids[0]), int(ids[-1])
        span = slice(int(self.crow[first]), int(self.crow[last + 1]))
        self.row_pos[ids] = torch.arange(ids.numel())
        local = self.row_pos[self.edge_row[span]]
        self.row_pos[ids] = -1
        cols = self.col[span] if pos is None else pos[self.col[span]]
        keep = (local >= 0) & (cols >= 0)
        return local[keep], cols[keep]


# |bf16 score - exact score| <= _BF16_ERROR |f_i| |t_j|: bfloat16 keeps 8 significant bits, so
# each input is off by at most 2^-8 relative, a product by 2^-7 + 2^-16, their sum (accumulated
# in float32 by oneDNN, d 2^-24 more) by 0.00782 sum_k |f_ik t_jk| <= 0.00782 |f_i| |t_j|
# (Cauchy-Schwarz), and the bfloat16 result by 2^-8 of that more: 0.0118 in all, rounded up.
_BF16_ERROR = 0.0125

_WARM_K = 4  # candidates per row under coarse prices, in multiples of k


class _LowPrecision:
    """feats and targets in bfloat16, for the pricing filter: a row whose bfloat16 bound clears
    it needs no exact pass."""

    def __init__(self, feats_lo: Tensor, targets_lo: Tensor, feats: Tensor, targets: Tensor):
        self.feats, self.targets = feats_lo, targets_lo
        self.fnorm = feats.double().norm(dim=1)
        self.tnorm = targets.double().norm(dim=1)


def _filter_rows(lo: _LowPrecision, rows: Tensor | None, cols: Tensor | None, u: Tensor,
                 v: Tensor, tol: float, chunk_elems: int, held: _Held,
                 best: Tensor) -> Tensor:
    """The rows of rows x cols (None: all) that the bfloat16 scores cannot clear: max_j s_ij -
    v_j over the pairs not held, plus the error bound, above u_i + tol (or NaN). Cleared rows
    get that bound as best[i] (raised to it when cols is a subset). Returns CPU indices."""
    t = lo.targets if cols is None else lo.targets[cols]
    v64 = (v if cols is None else v[cols]).double()
    tmax = float(lo.tnorm.max() if cols is None else lo.tnorm[cols].max())
    pos = None
    if cols is not None:
        pos = torch.full((lo.targets.shape[0],), -1, dtype=torch.int64)
        pos[cols] = torch.arange(cols.numel())
    nrows = lo.feats.shape[0] if rows is None else rows.numel()
    chunks = _row_chunks(nrows, t.shape[0], chunk_elems)
    if not chunks:
        return torch.empty(0, dtype=torch.int64)
    buf = torch.empty(chunks[0][1] * t.shape[0], dtype=t.dtype)
    left = []
    for r0, r1 in chunks:
        ids = torch.arange(r0, r1) if rows is None else rows[r0:r1]
        s = torch.mm(lo.feats[ids], t.T, out=buf[:(r1 - r0) * t.shape[0]].view(r1 - r0, -1))
        local, local_cols = held.pairs(ids, pos)
        s.view(-1).index_fill_(0, local * s.shape[1] + local_cols, -math.inf)
        upper = torch.ops.nat._assign_full_row_max(s, v64) + _BF16_ERROR * lo.fnorm[ids] * tmax
        cleared = upper <= u[ids].double() + tol  # False for NaN
        upper = upper.to(best.dtype)
        best[ids] = torch.where(cleared, upper if cols is None else
                                torch.maximum(best[ids], upper), best[ids])
        left.append(ids[~cleared])
    return torch.cat(left)


def _price(feats: Tensor, targets: Tensor, rows: Tensor | None, cols: Tensor | None,
           u: Tensor, v: Tensor, tol: float, add: int, chunk_elems: int,
           held: _Held, best: Tensor, found: _Found) -> None:
    """Streams the scores of rows x cols (None: all; CPU index tensors) in chunks, leaving out
    the candidate pairs `held`, and records, for each row with a pair
    s_ij > u_i + v_j + tol, its `add` pairs of largest s_ij - v_j that do. best[i] is raised to
    at least the largest s_ij - v_j seen in row i."""
    device = feats.device
    t = targets if cols is None else targets[cols.to(device)]
    vc = v if cols is None else v[cols.to(device)]
    pos = None
    if cols is not None:
        pos = torch.full((targets.shape[0],), -1, dtype=torch.int64)
        pos[cols] = torch.arange(cols.numel())
    nrows = feats.shape[0] if rows is None else rows.numel()
    chunks = _row_chunks(nrows, t.shape[0], chunk_elems)
    if not chunks:
        return
    buf = torch.empty(chunks[0][1] * t.shape[0], dtype=feats.dtype, device=device)
    for r0, r1 in chunks:
        ids = torch.arange(r0, r1) if rows is None else rows[r0:r1]
        ids_dev = ids.to(device)
        # s_ij - v_j in one BLAS call, into a buffer reused across chunks (a fresh 64 MB result
        # each chunk costs as much in page faults as the multiply); the scores of the pairs kept
        # are recovered as reduced + v
        reduced = torch.addmm(-vc, feats[r0:r1] if rows is None else feats[ids_dev], t.T,
                              out=buf[:(r1 - r0) * t.shape[0]].view(r1 - r0, t.shape[0]))
        local, local_cols = held.pairs(ids, pos)
        reduced.view(-1).index_fill_(0, (local * reduced.shape[1] + local_cols).to(device),
                                     -math.inf)
        bound = u[ids_dev] + tol
        row_best = reduced.amax(dim=1)
        if bool(row_best.isnan().any()):
            raise _not_finite_error()
        best[ids_dev] = torch.maximum(best[ids_dev], row_best) if cols is not None else row_best
        viol = (row_best > bound).nonzero().squeeze(1)
        if not viol.numel():
            continue
        vals, idx = reduced[viol].topk(min(add, t.shape[0]), dim=1)
        keep = vals > bound[viol, None]
        found.rows.append(ids_dev[viol, None].expand_as(idx)[keep])
        found.cols.append((idx if cols is None else cols.to(device)[idx])[keep])
        found.scores.append((vals + vc[idx])[keep])


def _chunk_candidates(s: Tensor, k: int, col_best: Tensor, col_rows: Tensor, r0: int
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each row's top-k of the score chunk s (rows r0..), and each column's running top-kc rows
    (col_best/col_rows [kc, m]) updated with it: one fused pass on the CPU (the op), torch.topk
    elsewhere."""
    if s.device.type == "cpu" and not _TORCH_TOPK:
        return torch.ops.nat._assign_full_candidates.default(s, k, col_best, col_rows, r0)
    vals, idx = s.topk(k, dim=1)
    kc = col_best.shape[0]
    if kc:
        cvals, cidx = s.topk(min(kc, s.shape[0]), dim=0)
        col_best, pick = torch.cat([col_best, cvals]).topk(kc, dim=0)
        col_rows = torch.cat([col_rows, cidx + r0]).gather(0, pick)
    return vals, idx, col_best, col_rows


@torch.library.register_fake("nat::_assign_full_candidates")
def _assign_full_candidates_fake(scores: Tensor, k: int, col_vals: Tensor, col_rows: Tensor,
                                 row_offset: int):
    torch._check_value(scores.dim() == 2, lambda: f"_assign_full_candidates: scores should be a "
                       f"2-D tensor, got {scores.dim()}-D")
    rows = scores.shape[0]
    return (scores.new_empty(rows, k), scores.new_empty(rows, k, dtype=torch.int64),
            torch.empty_like(col_vals), torch.empty_like(col_rows))


def _default_candidate_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (oneDNN: 4-7x the float32 matmul here),
    else the input dtype. Only the ranking of candidates uses it."""
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and \
            torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return dtype


def _pair_scores(feats: Tensor, targets: Tensor, rows: Tensor, cols: Tensor,
                 chunk_elems: int = 1 << 22) -> Tensor:
    """feats[rows[p]] . targets[cols[p]] for every pair p, in feats' dtype, chunk by chunk."""
    out = torch.empty(rows.numel(), dtype=feats.dtype, device=feats.device)
    step = max(1, chunk_elems // feats.shape[1])
    for p0 in range(0, rows.numel(), step):
        r, c = rows[p0:p0 + step], cols[p0:p0 + step]
        out[p0:p0 + step] = (feats[r] * targets[c]).sum(dim=1)
    return out


@torch.library.register_fake("nat::_assign_full_row_max")
def _assign_full_row_max_fake(scores: Tensor, v: Tensor) -> Tensor:
    torch._check_value(scores.dim() == 2, lambda: f"_assign_full_row_max: scores should be a "
                       f"2-D tensor, got {scores.dim()}-D")
    return v.new_empty(scores.shape[0])


def _c_transform(a: Tensor, b: Tensor, w: Tensor, leave_out: Tensor,
                 chunk_elems: int) -> Tensor:
    """max_i (a_j . b_i - w_i) over i != leave_out[j] (-1: every i), for every row j of a
    (float64 out), streamed in chunks of a."""
    out = torch.empty(a.shape[0], dtype=torch.float64, device=a.device)
    wneg = -w.to(a.dtype)
    chunks = _row_chunks(a.shape[0], b.shape[0], chunk_elems)
    buf = torch.empty(chunks[0][1] * b.shape[0], dtype=a.dtype, device=a.device)
    for r0, r1 in chunks:
        s = torch.addmm(wneg, a[r0:r1], b.T, out=buf[:(r1 - r0) * b.shape[0]].view(r1 - r0, -1))
        skip = leave_out[r0:r1]
        at = (skip >= 0).nonzero().squeeze(1)
        s.view(-1).index_fill_(0, at * s.shape[1] + skip[at], -math.inf)
        out[r0:r1] = s.amax(dim=1)
    return out


def _split(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x (float64) as two columns hi + lo in dtype, hi + lo = x to about dtype's eps squared."""
    hi = x.to(dtype)
    return torch.stack([hi, (x - hi.double()).to(dtype)], 1)


_CROWD_ROWS = 1024  # rows sampled to tell whether the rows crowd onto the same targets


def _crowded(feats: Tensor, targets: Tensor, chunk_elems: int) -> tuple[bool, int, int]:
    """Whether a seeded sample of rows' favourite targets (raw scores) are mostly shared: fewer
    distinct favourites than half of what independent uniform picks would give. Near-parallel
    features (an untrained network's) crowd; then the coarse duals pay for themselves many times over, while on spread features
    the first solve is faster from zero prices (its errors are local, not a global shift)."""
    (n, _), m = feats.shape, targets.shape[0]
    g = torch.Generator().manual_seed(n * 1000003 + m + 1)
    rows = torch.randperm(n, generator=g)[:min(n, _CROWD_ROWS)].to(feats.device)
    best = torch.cat([torch.mm(feats[rows[r0:r1]], targets.T).argmax(dim=1)
                      for r0, r1 in _row_chunks(rows.numel(), m, chunk_elems)])
    distinct = int(best.unique().numel())
    # independent uniform favourites would name m (1 - exp(-r / m)) distinct targets
    expected = m * -math.expm1(-rows.numel() / m)
    return 2 * distinct < expected, distinct, int(rows.numel())


def _coarse_duals(feats: Tensor, targets: Tensor, k: int, col_k: int, chunk_elems: int,
                  candidate_dtype: torch.dtype | None, factor: int, least: int,
                  info: dict) -> tuple[Tensor, Tensor]:
    """Approximate duals (u[n], v[m], float64) from the exact duals of a random 1/factor
    subsample of rows and targets, extended to every row and target by c-transforms."""
    (n, _), m = feats.shape, targets.shape[0]
    g = torch.Generator().manual_seed(n * 1000003 + m)
    rows = torch.randperm(n, generator=g)[:max(1, n // factor)].sort().values.to(feats.device)
    cols = torch.randperm(m, generator=g)[:max(rows.numel(), m // factor)].sort().values
    cols = cols.to(feats.device)
    sub: dict = {}
    x_r, u_r, v_c = assign_full(feats[rows], targets[cols], return_duals=True, k=k,
                                col_k=col_k, chunk_elems=chunk_elems,
                                candidate_dtype=candidate_dtype, coarse=factor,
                                coarse_min=least, stats=sub)
    t0 = time.perf_counter()
    # Every target is priced by the sampled rows, every row by the sampled targets, leaving out
    # a sampled one's own partner: a partner fits it better than any other sample, so keeping it
    # made the sampled targets dearer than the rest, and the first solve spent most of its time
    # moving rows back to them.
    keep_r = torch.full((m,), -1, dtype=torch.int64, device=feats.device)
    keep_r[cols[x_r]] = torch.arange(rows.numel(), device=feats.device)
    v = _c_transform(targets, feats[rows], u_r, keep_r, chunk_elems)
    keep_c = torch.full((n,), -1, dtype=torch.int64, device=feats.device)
    keep_c[rows] = x_r
    u = _c_transform(feats, targets[cols], v_c, keep_c, chunk_elems)
    info["coarse"] = {"n": rows.numel(), "stats": sub, "time_extend": time.perf_counter() - t0}
    return u, v


def assign_full(feats: Tensor, targets: Tensor, init: Tensor | None = None,
                return_duals: bool = False, *, k: int = 8, col_k: int = 2,
                chunk_elems: int = 1 << 24, candidate_dtype: torch.dtype | None = None,
                stats: dict | None = None, coarse: int = 4, coarse_min: int = 1024
                ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
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
    (The CPU's bfloat16 pricing filter relies on oneDNN accumulating bfloat16 products in
    float32, as its AVX512-BF16 kernels do; pass candidate_dtype=feats.dtype to avoid it.)
    On CUDA with TF32 matmuls enabled, the scores are TF32's.

    Args:
        feats: Tensor[n, d], float32 or float64, finite; CPU or CUDA.
        targets: Tensor[m, d] with m >= n, same dtype and device, finite.
        init: int64 (or int32) Tensor[n], the held assignment (a one-to-one map into range(m)),
            on feats' device. Its pairs join the candidates (so the sparse problem is feasible)
            and warm the first solve. None: the identity, for feasibility only.
        return_duals: also return the certificate.
        k: candidates per row from the top-k pass, and the first round's additions per
            violating row (doubled each round).
        col_k: candidate rows per target from the top-k pass (each target's best rows).
        chunk_elems: score entries computed at once (rows per chunk = chunk_elems // m).
        candidate_dtype: the dtype the top-k pass ranks in (never the one the answer is
            certified in). None: bfloat16 on CPUs with native bfloat16 matmul, else feats'.
        stats: a dict to fill with rounds, candidates per row, violations and phase times (s);
            where the coarse duals were computed, "coarse" holds the subsample's size, its own
            stats and the time of the extension, and "crowd" the gate's sample.
        coarse: the subsample factor of the coarse duals (1: never use them). Where n >=
            coarse_min and a sample of rows crowds onto the same favourite targets (fewer
            distinct favourites than half of what independent picks give: near-parallel
            features), the exact duals
            of a random 1/coarse of the rows and targets (solved by this function, so
            recursively), extended to every row and target, rank the first candidates by
            reduced score (4k per row) and warm the first solve.
        coarse_min: the smallest n that computes coarse duals (the recursion's floor).

    Returns:
        int64 Tensor[n] on feats' device: for each feats row, its target. With return_duals,
        (col4row, u, v): float64 Tensor[n] and Tensor[m] on feats' device with u_i + v_j >=
        feats_i . targets_j (up to tol above) for every pair, equality on the assigned pairs,
        and every unassigned target's v (0) at most every assigned one's.
    """
    _check_inputs(feats, targets, init, k, col_k, chunk_elems, coarse, coarse_min)
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
    # in float64: float32 norms of huge (finite) rows could overflow and make tol infinite
    scale = float(feats.double().norm(dim=1).max()) * float(targets.double().norm(dim=1).max())
    info: dict = {"rounds": 0, "candidates_per_row": [], "violating_rows": [],
                  "rechecked_rows": [], "exact_rows": [], "rechecked_cols": [],
                  "time_candidates": 0.0, "time_solve": [], "time_pricing": []}

    # candidates: the top-k targets of each row, its pair in x0, and the top-kc rows of each
    # target (so every target's price is set by the rows that want it most), ranked by scores in
    # candidate_dtype; the scores the solver gets are then computed exactly, pair by pair
    kk, kc = min(k, m), min(col_k, n)
    cdt = candidate_dtype or _default_candidate_dtype(device, dtype)
    u0 = v0 = None  # the coarse duals, where the rows crowd onto the same targets
    if coarse > 1 and n >= coarse_min:
        crowded, distinct, sampled = _crowded(feats, targets, chunk_elems)
        info["crowd"] = {"distinct": distinct, "sampled": sampled}
        if crowded:
            u0, v0 = _coarse_duals(feats, targets, k, col_k, chunk_elems, candidate_dtype,
                                   coarse, coarse_min, info)
            kk = min(_WARM_K * k, m)
    feats_c, targets_c = feats.to(cdt), targets.to(cdt)
    if v0 is None:
        rank_f, rank_t = feats_c, targets_c
    else:
        # rank by reduced scores s_ij - u_i - v_j: each dual enters as two extra columns (hi +
        # lo in cdt), so the products carry it at about cdt's eps squared
        ones = torch.ones(n, 2, dtype=cdt, device=device)
        rank_f = torch.cat([feats_c, ones, -_split(u0, cdt)], 1)
        rank_t = torch.cat([targets_c, -_split(v0, cdt),
                            torch.ones(m, 2, dtype=cdt, device=device)], 1)
    col_best = torch.full((kc, m), -math.inf, dtype=cdt, device=device)
    col_rows = torch.zeros((kc, m), dtype=torch.int64, device=device)
    buf = torch.empty(chunks[0][1] * m, dtype=cdt, device=device)
    pair_rows, pair_cols = [], []
    for r0, r1 in chunks:
        s = torch.mm(rank_f[r0:r1], rank_t.T, out=buf[:(r1 - r0) * m].view(r1 - r0, m))
        _, idx, col_best, col_rows = _chunk_candidates(s, kk, col_best, col_rows, r0)
        pair_rows.append(torch.arange(r0, r1, device=device)[:, None].expand(-1, kk + 1))
        pair_cols.append(torch.cat([idx, x0[r0:r1, None]], 1))
    del buf
    # the pricing filter needs the bfloat16 copies and the op that reads them (CPU)
    lo = _LowPrecision(feats_c, targets_c, feats, targets) if \
        cdt == torch.bfloat16 and device.type == "cpu" else None
    del feats_c, targets_c, rank_f, rank_t
    pair_rows.append(col_rows.T)
    pair_cols.append(torch.arange(m, device=device)[:, None].expand(-1, kc))
    pair_rows = torch.cat([r.flatten() for r in pair_rows])
    pair_cols = torch.cat([c.flatten() for c in pair_cols])
    pair_scores = _pair_scores(feats, targets, pair_rows, pair_cols)
    if not bool(torch.isfinite(pair_scores).all()):
        raise _not_finite_error()
    cand = _Candidates(n, m)
    cand.add(pair_rows, pair_cols, pair_scores)
    del pair_rows, pair_cols, pair_scores
    info["time_candidates"] = time.perf_counter() - start

    x, u, v = x0.cpu(), None, None if v0 is None else v0.cpu()
    add, tol = kk, 0.0
    best = torch.full((n,), math.inf, dtype=dtype, device=device)
    while True:
        # sparse solve, warm from the previous round
        t0 = time.perf_counter()
        info["rounds"] += 1
        info["candidates_per_row"].append(cand.keys.numel() / n)
        v_old = v
        crow, col, cost = cand.csr()
        held = _Held(crow, col)
        x, u, v = sparse_linear_sum_assignment(crow, col, cost, m, True, x, v)
        info["time_solve"].append(time.perf_counter() - t0)

        # pricing: the pairs outside the candidates whose score exceeds u_i + v_j. best[i]
        # bounds s_ij - v_j over row i's other pairs as of its last scan; v only goes up
        # between rounds (except on the columns freed by a warm start, scanned against every
        # row), so a row needs a new scan only when its u fell below best - tol. The first
        # round scans everything.
        t0 = time.perf_counter()
        tol = max(tol, 4 * eps * (math.sqrt(d) * scale + float(u.abs().max()) +
                                  float(v.abs().max())))
        u_dev, v_dev = u.to(device, dtype), v.to(device, dtype)
        found = _Found()
        rows = (best > u_dev + tol).nonzero().squeeze(1).cpu()
        info["rechecked_rows"].append(int(rows.numel()))
        if lo is not None:
            rows = _filter_rows(lo, rows, None, u_dev, v_dev, tol, chunk_elems, held, best)
        info["exact_rows"].append(int(rows.numel()))
        _price(feats, targets, rows, None, u_dev, v_dev, tol, add, chunk_elems, held, best,
               found)
        cols = None if info["rounds"] == 1 else (v < v_old).nonzero().squeeze(1)
        if cols is not None and cols.numel():
            rows = None if lo is None else _filter_rows(lo, None, cols, u_dev, v_dev, tol,
                                                        chunk_elems, held, best)
            _price(feats, targets, rows, cols, u_dev, v_dev, tol, add, chunk_elems, held,
                   best, found)
        info["rechecked_cols"].append(0 if cols is None else int(cols.numel()))
        nviol = found.violating_rows().numel()
        info["violating_rows"].append(nviol)
        new = cand.add(*found.pairs()) if nviol else 0
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
