"""The exact NAT assignment over a whole dataset without the n x m score matrix:
`assign_full` (one process), `assign_sharded` (rows split across ranks), and the sparse solver
op they rest on, `sparse_linear_sum_assignment`.

Route (column generation with a dual certificate as the stopping rule):
1. candidates: one fused pass (`_scan`: the target tile in the outer loop, regenerated or
   sliced once per pass; on the CPU `nat::_full_scan` multiplies a cache-sized block and ranks it
   in place, on the GPU torch ops do it tile by tile) keeps each row's top-k targets, each
   target's top-col_k rows (so that every target's price is set by the rows that want it most)
   and each row's target in `init`, so the sparse problem always has a perfect matching. The pass
   ranks in bfloat16 where the CPU multiplies it natively; the pairs it keeps get exact scores
   (float64 sums of the float32 products) as it keeps them;
2. solve the sparse problem exactly with duals (`nat::sparse_linear_sum_assignment`: shortest
   augmenting paths over the candidate lists, warm from the previous round, after an
   epsilon-scaled auction on the torch threads where many rows start free) on rank 0, in a
   thread the caller watches (a
   deadline, a stop request), while the other ranks wait on the store;
3. price out: each rank scans its rows again against the broadcast duals, keeping every pair
   within the ranking's proven error bound (`_rank_error`) of a violation s_ij > u_i + v_j + tol,
   scores those exactly, and sends the violating ones to rank 0 (k per row in the first round,
   twice as many each round after). None anywhere: the duals certify the sparse optimum over
   all n x m pairs, so it is the dense optimum. Each row keeps a bound on its pairs' values
   under the prices of its last scan, so a pair can violate only on a column whose price has
   risen by less than the row's deficit (its bound less its u): a row is rescanned against
   those columns only (prices rise on most columns, so a round-1 rescan scores about 1% of
   what a whole row would), or in full where that costs less.
A warm solve (the previous solve's matching and prices, the features moved) makes one pass
ranked under the old prices, each row's top-k with no column lists: its lists are the first
candidates and its bounds certify every row whose value stays above them.
Two exact rewritings keep the ranking sharp: the ranking copy of the features is centred on the
mean row (s_ij = (f_i - mu) . t_j + mu . t_j, the second term an exact per-target offset), so a
bfloat16 product's error scales with |f_i - mu|; and a square problem solves for s_ij - mu . t_j
(a per-target term changes every perfect matching's total alike), so near-parallel features (an
untrained network's) no longer rank every target alike. Where rows still crowd onto the same
favourite targets (rectangular problems), the first candidates are ranked under coarse duals:
the exact duals of a random 1/4 of the rows and targets (this routine, recursively), extended to
every row and target by c-transforms.
Unassigned targets keep v = 0 and every assigned one has v >= 0 (the sparse solver's rectangular
certificate), so m > n needs nothing more.

Why this route: the dense scores never exist (memory O(n k + one tile of targets) per rank), a
round costs at most one pass at the multiply's rate, which is what the dense solve's score
computation costs anyway, and the certificate is checked on the very scores that define the
problem. An epsilon-scaled auction would also give duals but needs an exact finish anyway; the
shortest augmenting paths are exact from the start and re-solve warm, touching only the rows
whose pairs lost tightness.
"""

import logging
import math
import threading
import time
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_OP = "sparse_linear_sum_assignment"
_TORCH_TOPK = False  # tests set it to run the GPU's candidate path (torch.topk) on the CPU
_DTYPE_NAMES = {torch.int64: "Long", torch.float64: "Double"}  # as the C++ checks print them


def close_process_group() -> None:
    """``dist.destroy_process_group()``, after letting gloo's worker threads drop the tensors of the
    last collectives. Under torch 2.6 the group's destructor joins those threads while holding the
    GIL, and a worker freeing a tensor that Python no longer references needs the GIL: both wait
    for ever (seen in CI in the sharded solve's tests; gdb: ~ProcessGroupGloo in thread 1, a
    worker in ~TensorImpl waiting for the GIL). The sleep releases the GIL; no collective, so a
    failing rank can call it too."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    time.sleep(0.2)
    dist.destroy_process_group()


def sparse_linear_sum_assignment(crow: Tensor, col: Tensor, cost: Tensor, m: int,
                                 maximize: bool = False, init_col4row: Tensor | None = None,
                                 init_v: Tensor | None = None, abort: Tensor | None = None
                                 ) -> tuple[Tensor, Tensor, Tensor]:
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
        abort: int32 CPU Tensor[1] that another thread may set non-zero to stop the solve
            early: the rows it had not matched then come back -1 (the op releases the GIL).

    Returns:
        (col4row, u, v): int64 Tensor[n] and float64 Tensor[n], Tensor[m] with u_i + v_j <= cost
        on every edge (>= when maximising; to within 2^-42 (|cost| + |v_j|), the rounding that a
        start's pairs may carry), equality on the assigned pairs, and when m > n (or
        without init_v) unassigned columns at v = 0 and every other column at v <= 0 (>= 0
        when maximising); square problems warm from init_v keep its offset. Raises ValueError
        when no matching of every row uses the given edges.
    """
    return torch.ops.nat.sparse_linear_sum_assignment.default(crow, col, cost, m, maximize,
                                                              init_col4row, init_v, abort)


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
                                       init_v: Tensor | None = None, abort: Tensor | None = None):
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
    _check_k(k, col_k, chunk_elems, coarse, coarse_min)
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


class _Candidates:
    """The candidate pairs, as sorted keys row * m + col with their scores (on the CPU)."""

    def __init__(self, n: int, m: int):
        self.n, self.m = n, m
        self.keys = torch.empty(0, dtype=torch.int64)
        self.scores = torch.empty(0, dtype=torch.float64)
        self._csr: tuple | None = None  # (the keys it was made from, (crow, col, scores))

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
        # kept until the next add: a pricing round asks for it once per rescan run
        if self._csr is None or self._csr[0] is not self.keys:
            rows = torch.div(self.keys, self.m, rounding_mode="floor")
            crow = torch.zeros(self.n + 1, dtype=torch.int64)
            crow[1:] = torch.cumsum(torch.bincount(rows, minlength=self.n), 0)
            self._csr = (self.keys, (crow, self.keys - rows * self.m, self.scores))
        return self._csr[1]


def _unique_first(keys: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct keys and, for each, the index of one occurrence."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    first = torch.empty(uniq.numel(), dtype=torch.int64).scatter_(
        0, inverse, torch.arange(keys.numel(), dtype=torch.int64))
    return uniq, first




# |bf16 score - exact score| <= _BF16_ERROR |f_i| |t_j|: bfloat16 keeps 8 significant bits, so
# each input is off by at most 2^-8 relative, a product by 2^-7 + 2^-16, their sum (accumulated
# in float32 by oneDNN, d 2^-24 more) by 0.00782 sum_k |f_ik t_jk| <= 0.00782 |f_i| |t_j|
# (Cauchy-Schwarz), and the bfloat16 result by 2^-8 of that more: 0.0118 in all, rounded up.
_BF16_ERROR = 0.0125


# Error bounds of the ranking values the passes compare (|ranked - exact| for a pair), so that a
# pair the pass drops provably does not violate the duals. A float32 dot product of d terms is
# off by at most d eps32 |f_i| |t_j| (sequential accumulation; blocked BLAS sums do better), and
# the pass subtracts the float32-rounded offsets: eps32 each on |s|, |u_i| and |v_j|.
_EPS32 = torch.finfo(torch.float32).eps


def _rank_error(rank_dtype: torch.dtype, d: int) -> float:
    """|ranked score - exact score| per unit of |f_i| |t_j| for scores ranked in rank_dtype."""
    if rank_dtype == torch.bfloat16:
        return _BF16_ERROR
    if rank_dtype == torch.float32:
        return (d + 2) * _EPS32
    return 2 * _EPS32  # float64 scores, only rounded to float32 for the comparison


def _value_error(rows: "_Rows", src: "_Source", rank_dtype: torch.dtype, sel: Tensor | None,
                 row_off: Tensor, vmax: float) -> Tensor:
    """Per row of `sel` (None: all): the bound on |ranked - exact| of s_ij - row_off_i - v_j,
    |v_j| <= vmax, for every target: the product's ranking error and the float32 rounding."""
    centred = rows.centred_norms if sel is None else rows.centred_norms[sel]
    norms = rows.norms if sel is None else rows.norms[sel]
    return (_rank_error(rank_dtype, src.d) * centred * src.max_norm() +
            4 * _EPS32 * (1.0 + norms * src.max_norm() + row_off.abs() + vmax))


_TILE = 1 << 15  # targets per tile of a pass: regenerated (or sliced) once per pass
_BAND = 32  # pricing: pairs kept per row within the ranking error of a violation
_LIST_BUDGET = 1 << 24  # list entries one rescan holds at once (rows x their band)
_WARM_K = 1  # candidates per row under coarse prices, in multiples of k (more made the first solve slower)
_CROWD_ROWS = 1024  # rows sampled to tell whether the rows crowd onto the same targets
_TORCH_SCAN = False  # tests set it to run the GPU's pass (torch ops) on the CPU


class SolveInterrupted(RuntimeError):
    """The solve gave up before its certificate: ``reason`` is "budget" (its deadline passed) or
    "stop" (``should_stop`` was true on some rank), after ``seconds``. Raised on every rank."""

    def __init__(self, reason: str, seconds: float):
        super().__init__(f"the exact assignment gave up after {seconds:.1f}s: "
                         f"{'its time budget ran out' if reason == 'budget' else 'asked to stop'}")
        self.reason, self.seconds = reason, seconds


class _Source:
    """The targets of a problem, a tile at a time: slices of a dense Tensor, or rows regenerated
    from a ``nat_ext.targets.Targets`` seed (never the whole table), optionally a subset `ids`."""

    def __init__(self, targets, dtype: torch.dtype, device: torch.device,
                 ids: Tensor | None = None, tile: int = _TILE, w: Tensor | None = None):
        self.base, self.dtype, self.device, self.ids, self.tile = targets, dtype, device, ids, tile
        self.w = w  # a per-column term subtracted from every score (float64 CPU, or None)
        self._max_norm: float | None = None
        full = targets.shape[0] if isinstance(targets, Tensor) else targets.n
        self.m = full if ids is None else ids.numel()
        self.d = targets.shape[1] if isinstance(targets, Tensor) else targets.d

    def subset(self, local: Tensor) -> "_Source":
        return _Source(self.base, self.dtype, self.device,
                       local if self.ids is None else self.ids[local.to(self.ids.device)],
                       self.tile, None if self.w is None else self.w[local.cpu()])

    def take(self, local: Tensor) -> Tensor:
        """The targets of the problem's columns `local`, [len, d] in dtype on device."""
        cols = local if self.ids is None else self.ids[local.to(self.ids.device)]
        if isinstance(self.base, Tensor):
            return self.base.index_select(0, cols.to(self.base.device)).to(self.device, self.dtype)
        return self.base.rows(cols.cpu()).to(self.device, self.dtype)

    def tiles(self):
        """(c0, Tensor[c, d]) for consecutive tiles of the problem's columns."""
        for c0 in range(0, self.m, self.tile):
            c1 = min(self.m, c0 + self.tile)
            if self.ids is None and isinstance(self.base, Tensor):
                yield c0, self.base[c0:c1].to(self.device, self.dtype)
            else:
                yield c0, self.take(torch.arange(c0, c1))

    @property
    def regen_pairs(self) -> float:
        """What making one target row for a pass costs, in scored pairs: regenerating it from
        the seed (CPU Philox, ~2.5e6 values/s) against the fused pass (~0.5 CPU-ns a pair at
        d = 64): about 5e4. Slicing a dense table: about nothing."""
        return 0.0 if isinstance(self.base, Tensor) else 5e4

    def max_norm(self) -> float:
        # once per source: the pricing asks for it every chunk of every round
        if self._max_norm is None:
            if isinstance(self.base, Tensor):
                t = self.base if self.ids is None else self.base[self.ids.to(self.base.device)]
                self._max_norm = float(t.double().norm(dim=1).max()) if t.shape[0] else 0.0
            else:
                self._max_norm = 1.0 + 1e-6  # Targets' rows are unit vectors, rounded to float32
        return self._max_norm


class _Comm:
    """The few collectives of a sharded solve, on the CPU (gloo; a gloo group is made beside an
    NCCL default group), and the store through which ranks wait for rank 0 without a collective
    (a long sparse solve must not trip the process group's watchdog). One process: no-ops."""

    _groups: dict = {}
    _calls = 0

    def __init__(self, group=None, local: bool = False, solve_threads: int | None = None):
        import torch.distributed as dist
        self.dist = dist
        self.solve_threads = solve_threads  # rank 0's torch threads in the sparse solve
        self.world = dist.get_world_size(group) if not local and dist.is_available() and \
            dist.is_initialized() else 1
        self.rank = dist.get_rank(group) if self.world > 1 else 0
        self.group, self.store = group, None
        if self.world > 1:
            if dist.get_backend(group) != "gloo":
                key = id(group)
                if key not in _Comm._groups:
                    _Comm._groups[key] = dist.new_group(backend="gloo")
                self.group = _Comm._groups[key]
            self.store = dist.distributed_c10d._get_default_store()
        _Comm._calls += 1
        self.prefix = f"nat_ext/assign_sharded/{_Comm._calls}"

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        if self.world > 1:
            ops = {"sum": self.dist.ReduceOp.SUM, "max": self.dist.ReduceOp.MAX,
                   "min": self.dist.ReduceOp.MIN}
            self.dist.all_reduce(t, op=ops[op], group=self.group)
        return t

    def broadcast(self, t: Tensor) -> Tensor:
        if self.world > 1:
            self.dist.broadcast(t, 0, group=self.group)
        return t

    def all_gather_ints(self, value: int) -> list[int]:
        t = torch.zeros(self.world, dtype=torch.int64)
        t[self.rank] = value
        return [int(x) for x in self.all_reduce(t)]

    def gather_to_root(self, parts: list[Tensor]) -> list[Tensor] | None:
        """Concatenates each of `parts` (1-D, same length on a rank) over the ranks, on rank 0."""
        if self.world == 1:
            return parts
        sizes = self.all_gather_ints(parts[0].numel())
        most = max(sizes)
        out = []
        for p in parts:
            padded = torch.zeros(most, dtype=p.dtype)
            padded[:p.numel()] = p
            bufs = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 \
                else None
            self.dist.gather(padded, bufs, dst=0, group=self.group)
            if self.rank == 0:
                out.append(torch.cat([b[:s] for b, s in zip(bufs, sizes)]))
        return out if self.rank == 0 else None


class _Watch:
    """When to give up: the deadline (time.monotonic), a stop request on any rank (`should_stop`,
    shared through the store). Every rank must agree: `agreed()` is a collective."""

    def __init__(self, comm: _Comm, deadline: float | None, should_stop, start: float):
        self.comm, self.deadline, self.should_stop, self.start = comm, deadline, should_stop, start
        self.reason, self.solves = None, 0

    def local(self) -> str | None:
        """This rank's reason to give up now (cheap; polled inside passes and waits)."""
        if self.reason:
            return self.reason
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.reason = "budget"
        elif self.should_stop is not None and self.should_stop():
            self.reason = "stop"
        elif self.comm.store is not None and self.comm.store.check([self.comm.prefix + "/stop"]):
            self.reason = self.comm.store.get(self.comm.prefix + "/stop").decode()
        if self.reason and self.comm.store is not None:
            self.comm.store.set(self.comm.prefix + "/stop", self.reason)
        return self.reason

    def agreed(self) -> None:
        """Raises SolveInterrupted on every rank when any rank gave up (a collective)."""
        code = {None: 0, "budget": 1, "stop": 2}
        flag = self.comm.all_reduce(torch.tensor([code[self.local()]]), "max")
        if int(flag):
            reason = "stop" if int(flag) == 2 else "budget"
            raise SolveInterrupted(reason, time.perf_counter() - self.start)


class _Rows:
    """One rank's rows of a problem: feats (the answer's dtype), their global offset, and their
    ranking copy f_i - mu in the ranking dtype. Any mu gives the same scores, s_ij = (f_i - mu) .
    t_j + mu . t_j, the second term a per-target offset the passes add exactly; with mu the mean
    row, the error of a low-precision product scales with |f_i - mu| instead of |f_i|, which on
    near-parallel features (an untrained network's) is what lets bfloat16 decide at all."""

    def __init__(self, feats: Tensor, row0: int, n: int, rank_dtype: torch.dtype, mu: Tensor):
        self.f, self.row0, self.n, self.nr = feats, row0, n, feats.shape[0]
        self.rank_dtype, self.mu = rank_dtype, mu
        self.f_rank = self.centred(None, rank_dtype)
        self.norms = feats.double().norm(dim=1).cpu() if self.nr else torch.zeros(0)
        self.centred_norms = (feats.double() - mu).norm(dim=1).cpu() if self.nr else \
            torch.zeros(0)

    def centred(self, sel: Tensor | None, dtype: torch.dtype) -> Tensor:
        f = self.f if sel is None else self.f[sel.to(self.f.device)]
        return (f - self.mu.to(f.dtype)).to(dtype)

    def subset(self, local: Tensor, row0: int, n: int) -> "_Rows":
        return _Rows(self.f[local.to(self.f.device)], row0, n, self.rank_dtype, self.mu)


class _Lists:
    """What one pass kept, per row of the scanned rows and per column of the problem."""

    def __init__(self, nr: int, k: int, m: int, kc: int, device: torch.device):
        f32 = dict(dtype=torch.float32, device=device)
        self.vals = torch.full((nr, k), -math.inf, **f32)
        self.idx = torch.full((nr, k), -1, dtype=torch.int64, device=device)
        self.exact = torch.full((nr, k), math.nan, dtype=torch.float64, device=device)
        self.count = torch.zeros(nr, dtype=torch.int64, device=device)
        self.max = torch.full((nr,), -math.inf, **f32)
        self.col_vals = torch.full((kc, m), -math.inf, **f32)
        self.col_rows = torch.full((kc, m), -1, dtype=torch.int64, device=device)


def _scan(rows: _Rows, src: _Source, *, sel: Tensor | None = None, k: int = 0, kc: int = 0,
          row_off: Tensor | None = None, col_off: Tensor | None = None,
          row_thr: Tensor | None = None, held: tuple[Tensor, Tensor] | None = None,
          rank_dtype: torch.dtype | None = None, watch: _Watch | None = None) -> _Lists:
    """One pass of rows (their local indices `sel`, None: all) against every target of `src`,
    tile by tile: ranks r_ij = s_ij - row_off_i - col_off_j (float64 offsets, of the selected
    rows and of src's columns), skipping the `held` pairs (CSR over the selected rows, sorted
    columns), into each row's top-k above row_thr (with exact float64 scores), its count above
    row_thr and its maximum, and each column's top-kc rows (global row ids)."""
    device = rows.f.device
    rank_dtype = rank_dtype or rows.rank_dtype
    f = rows.f if sel is None else rows.f[sel.to(device)]
    fr = rows.f_rank if sel is None and rank_dtype == rows.rank_dtype else \
        rows.centred(sel, rank_dtype)
    mu = rows.mu.to(device, torch.float64)
    nr = f.shape[0]
    out = _Lists(nr, k, src.m, kc, device)
    row0 = rows.row0 if sel is None else 0  # column lists only come from whole-shard scans
    if nr == 0:
        return out
    ro = None if row_off is None else row_off.to(device, torch.float32)
    thr = None if row_thr is None else row_thr.to(device, torch.float32)
    co = None if col_off is None else col_off.to(device, torch.float64)
    hc = None if held is None else tuple(h.to(device) for h in held)
    w = None if src.w is None else src.w.to(device)
    for c0, t in src.tiles():
        c1 = c0 + t.shape[0]
        tr = t if rank_dtype == t.dtype else t.to(rank_dtype)
        # the centring's per-target term mu . t_j, exact, moved into the column offsets
        shift = -(t.double() @ mu) if co is None else co[c0:c1] - t.double() @ mu
        if w is not None:
            shift += w[c0:c1]
        cv, cr = out.col_vals[:, c0:c1], out.col_rows[:, c0:c1]
        cv_t, cr_t = cv.contiguous(), cr.contiguous()
        args = (fr, tr, f, t, ro, shift.float().contiguous(), thr,
                None if hc is None else hc[0], None if hc is None else hc[1], row0, c0,
                out.vals, out.idx, out.exact, out.count, out.max, cv_t, cr_t)
        if device.type == "cpu" and not _TORCH_SCAN:
            torch.ops.nat._full_scan(*args)
        else:
            _scan_torch(*args)
        cv.copy_(cv_t)
        cr.copy_(cr_t)
        if watch is not None and watch.local():
            break  # the caller's agreement raises on every rank
    if w is not None and k:  # the problem's scores: the column term off the exact products
        kept = out.idx >= 0
        out.exact[kept] -= w[out.idx[kept]]
    return out


_TORCH_BLOCK = 1 << 28  # scores of one block of the torch pass (1 GB in float32)


def _scan_torch(f, t, fe, te, ro, co, thr, held_crow, held_col, row0, col0, vals, idx, exact,
                count, rmax, col_vals, col_rows) -> None:
    """_full_scan's semantics in torch ops: the GPU's pass, a block of rows against the tile at
    a time (thousands of rows: the multiply stays compute-bound), and a second implementation
    the CPU kernel is tested against."""
    step = max(1, _TORCH_BLOCK // max(1, t.shape[0]))
    for r0 in range(0, f.shape[0], step):
        r1 = min(f.shape[0], r0 + step)
        held = (None, None) if held_crow is None else (
            held_crow[r0:r1 + 1] - held_crow[r0], held_col[int(held_crow[r0]):int(held_crow[r1])])
        _scan_torch_block(f[r0:r1], t, fe[r0:r1], te, None if ro is None else ro[r0:r1], co,
                          None if thr is None else thr[r0:r1], *held, row0 + r0, col0,
                          vals[r0:r1], idx[r0:r1], exact[r0:r1], count[r0:r1], rmax[r0:r1],
                          col_vals, col_rows)


def _scan_torch_block(f, t, fe, te, ro, co, thr, held_crow, held_col, row0, col0, vals, idx,
                      exact, count, rmax, col_vals, col_rows) -> None:
    s = torch.mm(f, t.T).float()
    if ro is not None:
        s -= ro[:, None]
    if co is not None:
        s -= co[None, :]
    nr, mt = s.shape
    if held_crow is not None and held_col.numel():
        row_of = torch.repeat_interleave(torch.arange(nr, device=s.device), held_crow.diff())
        local = held_col - col0
        inside = (local >= 0) & (local < mt)
        s.view(-1).index_fill_(0, row_of[inside] * mt + local[inside], -math.inf)
    nan = s.isnan().any(dim=1)
    tile_max = torch.where(nan, math.nan, s.nan_to_num(nan=-math.inf).amax(dim=1))
    rmax.copy_(torch.where(rmax.isnan() | (tile_max > rmax) | nan, tile_max, rmax))
    cut = thr[:, None] if thr is not None else -math.inf
    count += (s > cut).sum(dim=1)
    k = vals.shape[1]
    if k:
        tv, ti = s.topk(min(k, mt), dim=1)
        tv = torch.where(tv > cut, tv, -math.inf)
        ti = torch.where(tv > -math.inf, ti + col0, -1)
        allv = torch.cat([vals, tv], 1)
        alli = torch.cat([idx, ti], 1)
        alle = torch.cat([exact, torch.full_like(tv, math.nan, dtype=torch.float64)], 1)
        # stable: equal values keep the earlier entry first, as the kernel does
        order = torch.sort(allv, dim=1, descending=True, stable=True).indices[:, :k]
        vals.copy_(allv.gather(1, order))
        idx.copy_(alli.gather(1, order))
        exact.copy_(alle.gather(1, order))
        new = exact.isnan() & (idx >= col0) & (idx < col0 + mt)
        r, q = new.nonzero(as_tuple=True)
        if r.numel():
            exact[r, q] = (fe[r].double() * te[idx[r, q] - col0].double()).sum(dim=1)
    kc = col_vals.shape[0]
    if kc:
        cvals, crows = s.topk(min(kc, nr), dim=0)
        allv = torch.cat([col_vals, cvals])
        allr = torch.cat([col_rows, crows + row0])
        order = torch.sort(allv, dim=0, descending=True, stable=True).indices[:kc]
        col_vals.copy_(allv.gather(0, order))
        col_rows.copy_(allr.gather(0, order))


def _pair_scores(rows: _Rows, src: _Source, local_rows: Tensor, cols: Tensor,
                 step: int = 1 << 16) -> Tensor:
    """f_i . t_j in float64 for the pairs (this rank's local row, problem column)."""
    out = torch.empty(local_rows.numel(), dtype=torch.float64)
    dev = rows.f.device
    for p0 in range(0, local_rows.numel(), step):
        r = local_rows[p0:p0 + step].to(dev)
        t = src.take(cols[p0:p0 + step])
        out[p0:p0 + step] = (rows.f[r].double() * t.double()).sum(dim=1).cpu()
    if src.w is not None:
        out -= src.w[cols]
    return out


def _held_csr(mine: "_Candidates", sel: Tensor | None,
              col_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """This rank's candidate pairs as CSR over the rows `sel` (None: all), columns sorted; with
    col_ids (sorted problem columns: a scan of a subset), only the pairs in those columns, as
    positions in col_ids."""
    crow, col, _ = mine.csr()
    if sel is None and col_ids is None:
        return crow, col
    sel = torch.arange(crow.numel() - 1) if sel is None else sel
    starts, ends = crow[sel], crow[sel + 1]
    lens = ends - starts
    sub_crow = torch.zeros(sel.numel() + 1, dtype=torch.int64)
    sub_crow[1:] = torch.cumsum(lens, 0)
    pos = torch.repeat_interleave(starts - sub_crow[:-1], lens) + torch.arange(int(sub_crow[-1]))
    sub_col = col[pos]
    if col_ids is None:
        return sub_crow, sub_col
    if not col_ids.numel():
        return torch.zeros(sel.numel() + 1, dtype=torch.int64), sub_col[:0]
    at = torch.searchsorted(col_ids, sub_col).clamp(max=col_ids.numel() - 1)
    keep = col_ids[at] == sub_col
    row_of = torch.repeat_interleave(torch.arange(sel.numel()), lens)
    kept_crow = torch.zeros(sel.numel() + 1, dtype=torch.int64)
    kept_crow[1:] = torch.cumsum(torch.bincount(row_of[keep], minlength=sel.numel()), 0)
    return kept_crow, at[keep]


def _crowded(rows: _Rows, src: _Source, comm: _Comm) -> tuple[bool, int, int]:
    """Whether a seeded sample of rows' favourite targets are mostly shared: fewer distinct
    favourites than half of what independent uniform picks would give. Near-parallel features
    (an untrained network's) crowd; then the coarse duals pay for themselves many times over,
    while on spread features the first solve is faster from zero prices (its errors are local,
    not a global shift)."""
    m = src.m
    sample, mine = _sample_rows(rows, m, 1)
    lists = _scan(rows, src, sel=mine, k=1)
    favourites = comm.gather_to_root([lists.idx[:, 0].cpu()])
    crowded = torch.zeros(3, dtype=torch.int64)
    if comm.rank == 0:
        distinct = int(favourites[0].unique().numel())
        # independent uniform favourites would name m (1 - exp(-r / m)) distinct targets
        expected = m * -math.expm1(-sample.numel() / m)
        crowded[:] = torch.tensor([int(2 * distinct < expected), distinct, sample.numel()])
    comm.broadcast(crowded)
    return bool(crowded[0]), int(crowded[1]), int(crowded[2])


def _sample_rows(rows: _Rows, m: int, salt: int) -> tuple[Tensor, Tensor]:
    """A seeded sample of min(n, _CROWD_ROWS) of the n rows, the same on every rank: (global
    ids, this rank's local ids among them, sorted)."""
    g = torch.Generator().manual_seed(rows.n * 1000003 + m + salt)
    sample = torch.randperm(rows.n, generator=g)[:min(rows.n, _CROWD_ROWS)]
    mine = sample[(sample >= rows.row0) & (sample < rows.row0 + rows.nr)] - rows.row0
    return sample, mine.sort().values


def _warm_cut(rows: _Rows, src: _Source, comm: _Comm, u0: Tensor, v0: Tensor,
              k: int) -> tuple[float | None, float]:
    """Whether the old prices still rank the rows, and the warm pass's cut on s_ij - u0_i -
    v0_j. A seeded sample of rows is ranked under them in float32: where most sampled rows have
    a target better than their held one by more than the ranking's error, the features moved
    too far and the cut is None: the cold route (spread, n = 262,144, moved by 0.02 N(0, I): 57%
    of the sample, and the warm pass had made the solve 1.1x the cold one; 0.01: 45%, 0.71x;
    0.005: 39%, 0.56x). Else the cut is the sample's median k-th best value: without one a
    row's list fills from the first tiles on and takes about k ln(m / k) entries over the pass,
    each a walk of its stretch; above the cut it takes at most k (12 on average at n = 65,536),
    and the pass costs 0.75 of the uncut one. Returns (cut, the share of the sample that
    moved)."""
    _, mine = _sample_rows(rows, src.m, 2)
    lists = _scan(rows, src, sel=mine, k=k, row_off=u0[mine], col_off=v0,
                  rank_dtype=torch.float32)
    e = _value_error(rows, src, torch.float32, mine, u0[mine], float(v0.abs().max()))
    moved = (lists.vals[:, 0].double().cpu() > e).double()
    got = comm.gather_to_root([lists.vals[:, -1].double().cpu(), moved])
    out = torch.tensor([math.nan, 1.0], dtype=torch.float64)
    if comm.rank == 0 and got[0].numel():
        out[1] = got[1].mean()
        if out[1] <= 0.5:
            out[0] = float(got[0].median().float())  # the pass compares in float32: exact
    cut, share = comm.broadcast(out).tolist()
    return (cut if math.isfinite(cut) else None), share


def _pick(lists_idx: Tensor, lists_vals: Tensor, avoid: Tensor) -> Tensor:
    """Per row (or column) of 2-entry lists: the first value whose index is not `avoid`."""
    first_ok = lists_idx[:, 0] != avoid
    return torch.where(first_ok, lists_vals[:, 0], lists_vals[:, 1]).double()


def _coarse_duals(rows: _Rows, src: _Source, comm: _Comm, watch: _Watch, k: int, col_k: int,
                  factor: int, least: int, info: dict) -> tuple[Tensor, Tensor]:
    """Approximate duals (this rank's u, every target's v; float64 CPU) from the exact duals of a
    random 1/factor subsample of rows and targets, extended to every row and target."""
    n, m = rows.n, src.m
    g = torch.Generator().manual_seed(n * 1000003 + m)
    sample = torch.randperm(n, generator=g)[:max(1, n // factor)].sort().values
    cols = torch.randperm(m, generator=g)[:max(sample.numel(), m // factor)].sort().values
    mine = sample[(sample >= rows.row0) & (sample < rows.row0 + rows.nr)] - rows.row0
    sub_row0 = int((sample < rows.row0).sum())
    sub_rows = rows.subset(mine, sub_row0, sample.numel())
    sub: dict = {}
    x_r, u_r, v_c = _solve(sub_rows, src.subset(cols), None, None, comm, watch, k=k,
                           col_k=col_k, coarse=factor, coarse_min=least, info=sub)
    t0 = time.perf_counter()
    # Every target is priced by the sampled rows, every row by the sampled targets, leaving out
    # a sampled one's own partner: a partner fits it better than any other sample, so keeping it
    # made the sampled targets dearer than the rest, and the first solve spent most of its time
    # moving rows back to them.
    partner_row = torch.full((m,), -1, dtype=torch.int64)  # global sampled-row id of a column
    partner_row[cols[x_r]] = torch.arange(sample.numel())
    by_col = _scan(sub_rows, src, kc=2, row_off=u_r[sub_row0:sub_row0 + mine.numel()])
    cv, cr = by_col.col_vals.T.cpu(), by_col.col_rows.T.cpu()
    v = comm.all_reduce(_pick(cr, cv, partner_row).nan_to_num(neginf=-1e300), "max")
    by_row = _scan(rows, src.subset(cols), k=2, col_off=v_c)
    partner_col = torch.full((rows.nr,), -1, dtype=torch.int64)
    partner_col[mine] = x_r[sub_row0:sub_row0 + mine.numel()]
    u = _pick(by_row.idx.cpu(), by_row.vals.cpu(), partner_col)
    info["coarse"] = {"n": sample.numel(), "stats": sub, "time_extend": time.perf_counter() - t0}
    return u, v


def _proposals(cand: "_Candidates", v: Tensor | None, n: int, m: int) -> Tensor:
    """A start for the first sparse solve: each row proposes its best candidate under the prices
    v (zero: None) and each target takes its best proposer (ties: the lower row), the rest start
    free (-1). Every pair is tight, so the solve keeps them all and augments only the free rows
    (from a random init it kept none)."""
    crow, col, cost = cand.csr()
    rows = torch.repeat_interleave(torch.arange(n), crow.diff())
    red = cost - v[col] if v is not None else cost
    best = torch.full((n,), -math.inf, dtype=torch.float64).scatter_reduce(0, rows, red, "amax")
    at = (red == best[rows]).nonzero().squeeze(1)
    first = torch.full((n,), col.numel(), dtype=torch.int64).scatter_reduce(0, rows[at], at,
                                                                            "amin")
    wants, gain = col[first], red[first]
    top = torch.full((m,), -math.inf, dtype=torch.float64).scatter_reduce(0, wants, gain, "amax")
    ok = (gain == top[wants]).nonzero().squeeze(1)
    winner = torch.full((m,), n, dtype=torch.int64).scatter_reduce(0, wants[ok], ok, "amin")
    x = torch.full((n,), -1, dtype=torch.int64)
    taken = (winner < n).nonzero().squeeze(1)
    x[winner[taken]] = taken
    return x


def _sparse_solve(cand: "_Candidates", m: int, x: Tensor, v: Tensor | None, comm: _Comm,
                  watch: _Watch) -> tuple[Tensor, Tensor, Tensor]:
    """Rank 0 solves the sparse problem in a thread that the main thread watches (deadline, stop
    on any rank); the other ranks wait on the store, not in a collective. Every rank returns
    (x, u, v), or raises SolveInterrupted on every rank."""
    n = cand.n
    done = comm.prefix + f"/solved/{watch.solves}"
    watch.solves += 1
    result: dict = {}
    if comm.rank == 0:
        abort = torch.zeros(1, dtype=torch.int32)
        crow, col, cost = cand.csr()

        def work():
            try:
                result["x"] = sparse_linear_sum_assignment(crow, col, cost, m, True, x, v,
                                                           abort=abort)
            except BaseException as e:  # re-raised in the main thread
                result["error"] = e

        # the other ranks only wait meanwhile, so rank 0 may take their cores (a thread's first
        # parallel region reads torch's setting: set it before the thread starts)
        threads = torch.get_num_threads()
        change = comm.solve_threads is not None and comm.solve_threads != threads
        if change:
            torch.set_num_threads(comm.solve_threads)
        try:
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            while thread.is_alive():
                thread.join(0.2)
                if thread.is_alive() and watch.local():
                    abort[0] = 1
        finally:
            if change:
                torch.set_num_threads(threads)
        if comm.store is not None:
            comm.store.set(done, "error" if "error" in result else watch.reason or "ok")
        if "error" in result:
            raise result["error"]
    else:
        # poll (a timed store.wait logs a warning at every timeout), watching for a stop request
        while not comm.store.check([done]):
            watch.local()
            time.sleep(0.2)
        state = comm.store.get(done).decode()
        if state == "error":
            raise RuntimeError(f"rank {comm.rank}: the sparse solve on rank 0 failed (see "
                               f"rank 0's error)")
    watch.agreed()  # every rank gives up together, or none
    if comm.rank == 0:
        x, u, v = result["x"]
    else:
        x = torch.empty(n, dtype=torch.int64)
        u = torch.empty(n, dtype=torch.float64)
        v = torch.empty(m, dtype=torch.float64)
    for t in (x, u, v):
        comm.broadcast(t)
    return x, u, v


def _plan_rescan(deficit: Tensor, rise: Tensor, regen_pairs: float,
                 parts: int = 32) -> list[tuple[Tensor, int]]:
    """How to rescan rows that can violate only on columns whose price rose by less than their
    deficit. Splits the rows, by deficit, into runs (boundaries at `parts` quantiles, chosen by
    dynamic programming), each rescanned against the c columns that rose least, c covering its
    largest deficit; c = m is a full rescan. Minimises the pairs scored, a column made for a
    run counted as regen_pairs. rise: all m columns' rises, sorted. Returns [(positions in
    deficit, c)]."""
    order = deficit.argsort()
    ds = deficit[order]
    ends = (torch.arange(parts + 1) * ds.numel() // parts).unique()  # integers: exact at any n
    # a run ending at ends[b] needs every column that rose less than its largest deficit
    cols = torch.searchsorted(rise, ds[ends[1:] - 1]).double()
    best = torch.zeros(ends.numel(), dtype=torch.float64)
    back = torch.zeros(ends.numel(), dtype=torch.int64)
    for b in range(1, ends.numel()):
        cost = best[:b] + ((ends[b] - ends[:b]).double() + regen_pairs) * cols[b - 1]
        back[b] = cost.argmin()
        best[b] = cost[back[b]]
    runs, b = [], ends.numel() - 1
    while b > 0:
        a = int(back[b])
        runs.append((order[ends[a]:ends[b]], int(cols[b - 1])))
        b = a
    return runs


def _solve(rows: _Rows, src: _Source, init: Tensor | None, warm, comm: _Comm, watch: _Watch,
           *, k: int, col_k: int, coarse: int, coarse_min: int, info: dict
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Column generation over the ranks' rows (see the module docstring). init: Tensor[n] CPU or
    None (the identity); warm: (x, u, v) of an earlier solve or None. Returns (x, u, v) on the
    CPU, the same on every rank."""
    start = time.perf_counter()
    n, m, d = rows.n, src.m, src.d
    lo, nr = rows.row0, rows.nr
    info.update({"rounds": 0, "candidates_per_row": [], "violating_rows": [],
                 "rechecked_rows": [], "exact_rows": [], "restricted_rows": [],
                 "restricted_pairs": [],
                 "time_candidates": 0.0, "time_solve": [], "time_pricing": []})
    mine = _Candidates(nr, m)  # this rank's pairs (local rows): what its passes skip
    cand = mine if comm.world == 1 else _Candidates(n, m)  # every pair, on rank 0
    scale = comm.all_reduce(torch.tensor([float(rows.norms.max()) if nr else 0.0],
                                         dtype=torch.float64), "max").item() * src.max_norm()
    local_ids = torch.arange(nr)

    def add(local: Tensor, cols: Tensor, scores: Tensor) -> int:
        """Adds pairs of this rank's rows everywhere; returns how many are new over all ranks."""
        bad = torch.tensor([int(not bool(torch.isfinite(scores).all()))])
        if int(comm.all_reduce(bad, "max")):  # every rank raises, none waits for the others
            raise _not_finite_error()
        new_here = mine.add(local, cols, scores)
        if comm.world == 1:
            return new_here
        parts = comm.gather_to_root([local + lo, cols, scores])
        new = torch.zeros(1, dtype=torch.int64)
        if comm.rank == 0:
            new[0] = cand.add(*parts)
        return int(comm.broadcast(new))

    x = torch.arange(n) if init is None else init.cpu().to(torch.int64)
    if warm is not None and init is None:
        x = warm[0].cpu().to(torch.int64)
    # the pairs every solve holds: the init (or warm) matching, so the sparse problem is feasible
    held_x = x[lo:lo + nr]
    held_s = _pair_scores(rows, src, local_ids, held_x)
    u0 = v0 = cut = None
    kk = min(k, m)
    if warm is not None and kk:
        # the previous solve's prices rank the candidates by reduced score, as the coarse duals
        # do, in one pass without column lists (the prices already say which rows want a
        # target), where they still hold: from the matching alone, each round added only what
        # already violated and a warm solve took 35 rounds at n = 16384
        v0 = warm[2].cpu().to(torch.float64)
        u0 = held_s - v0[held_x]  # the held pairs' values under the old prices
        cut, info["warm_moved"] = _warm_cut(rows, src, comm, u0, v0, kk)
        info["warm"] = cut is not None
        if cut is None:
            u0 = v0 = None  # the cold route, from the held matching
    if v0 is None and coarse > 1 and n >= coarse_min:
        crowded, distinct, sampled = _crowded(rows, src, comm)
        info["crowd"] = {"distinct": distinct, "sampled": sampled}
        if crowded:
            u0, v0 = _coarse_duals(rows, src, comm, watch, k, col_k, coarse, coarse_min, info)
            kk = min(_WARM_K * k, m)
    best = torch.full((nr,), math.inf, dtype=torch.float64)  # bound on max_j s_ij - v_j, non-held
    if kk:
        # candidates: each row's top-kk targets and each target's top-kc rows, ranked (under the
        # coarse prices where there are some), scored exactly as the pass keeps them
        lists = _scan(rows, src, k=kk, kc=0 if cut is not None else min(col_k, n),
                      row_off=u0, col_off=v0, watch=watch,
                      row_thr=None if cut is None else torch.full((nr,), cut, dtype=torch.float32))
        watch.agreed()
        # an overflowed product (inf, or NaN from inf - inf) leaves nothing the ranking can trust
        bad = torch.tensor([int(not bool(torch.isfinite(lists.max).all()))])
        if int(comm.all_reduce(bad, "max")):
            raise _not_finite_error()
        keep = lists.idx >= 0
        add(local_ids[:, None].expand_as(lists.idx)[keep.cpu()], lists.idx[keep].cpu(),
            lists.exact[keep].cpu())
        cr = lists.col_rows.T.cpu()  # [m, kc], global rows (this rank's)
        ok = cr >= 0
        c_rows = cr[ok] - lo
        c_cols = torch.arange(m)[:, None].expand_as(cr)[ok]
        add(c_rows, c_cols, _pair_scores(rows, src, c_rows, c_cols))
        # every pair the pass left out ranked at most as its row's last listed one, so round 1
        # rescans only the rows whose u fell below that (a warm solve: few)
        last = lists.vals[:, -1].double().cpu()  # -inf where fewer than kk beat the cut
        if cut is not None:
            last = last.clamp(min=cut)
        uo = torch.zeros(nr, dtype=torch.float64) if u0 is None else u0.cpu()
        vmax = 0.0 if v0 is None or not m else float(v0.abs().max())
        e = _value_error(rows, src, rows.rank_dtype, None, uo, vmax)
        best = uo + last + e
        del lists
    add(local_ids, held_x, held_s)
    info["time_candidates"] = time.perf_counter() - start

    u = v = torch.zeros(m, dtype=torch.float64) if v0 is None else v0.to(torch.float64)
    if comm.rank == 0:
        x = _proposals(cand, v, n, m)
    add_k, tol = max(k, 1), 0.0
    price_dtype = [rows.rank_dtype]  # what the pricing passes rank in (see price_all)
    snaps = {0: v}  # the prices each row's bound in `best` was proved under, by round
    ref = torch.zeros(nr, dtype=torch.int64)  # which of them, per row
    while True:
        t0 = time.perf_counter()
        info["rounds"] += 1
        info["candidates_per_row"].append(float(comm.broadcast(torch.tensor(
            [cand.keys.numel() / n if comm.rank == 0 else 0.0], dtype=torch.float64))))
        x, u, v = _sparse_solve(cand, m, x, v, comm, watch)
        info["time_solve"].append(time.perf_counter() - t0)

        # pricing: this rank's pairs outside the candidates with s_ij > u_i + v_j + tol. Row
        # i's bound best_i holds for s_ij - w_j over every pair it does not hold, w the prices
        # when the bound was proved (snaps[ref_i]); a pair can now violate only on a column
        # whose price rose by less than the row's deficit best_i - u_i - tol (v - w is
        # negative where a rectangular warm start freed a column). Rows are rescanned in runs
        # of like deficits, each against the columns that rose less than its largest deficit
        # (_plan_rescan), or in full.
        t0 = time.perf_counter()
        tol = max(tol, 4 * torch.finfo(rows.f.dtype).eps * (
            math.sqrt(d) * scale + float(u.abs().max()) + float(v.abs().max())))
        um = u[lo:lo + nr]
        snaps[info["rounds"]] = v
        full_parts, restricted = [], []
        for r in ref.unique().tolist():
            group = (ref == r).nonzero().squeeze(1)
            rise, order = (v - snaps[r]).sort()
            deficit = best[group] - um[group] - tol
            need = deficit > rise[0]
            group, deficit = group[need], deficit[need]
            if not group.numel():
                continue
            for pos, c in _plan_rescan(deficit, rise, src.regen_pairs):
                if c == m:
                    full_parts.append(group[pos])
                else:
                    restricted.append((group[pos].sort().values, order[:c].sort().values))
        sel = torch.cat(full_parts).sort().values if full_parts else local_ids[:0]
        info["rechecked_rows"].append(int(comm.all_reduce(torch.tensor([sel.numel()]))))
        found_r, found_c, found_s, info_band = [], [], [], []
        exact_rows = torch.zeros(1, dtype=torch.int64)

        def price(sel: Tensor, src_p: _Source, col_ids: Tensor | None,
                  rank_dtype: torch.dtype, band: int, out: Tensor) -> Tensor:
            """Scans rows `sel` against src_p (whose columns are col_ids, None: all), keeping
            each row's `band` best pairs within the ranking error of a violation; records the
            violating ones and writes each row's bound under the current prices into out[sel].
            Returns the rows to scan again: their band overflowed its list and the list held no
            violation."""
            vp = v if col_ids is None else v[col_ids]
            redo = []
            per = max(1, _LIST_BUDGET // band)
            for p0 in range(0, sel.numel(), per):
                part = sel[p0:p0 + per]
                e = _value_error(rows, src, rank_dtype, part, um[part], float(vp.abs().max()))
                # the band reaches `e` further down than a violation needs (so twice the ranking
                # error below tol): what it leaves out is then provably `e` under tol, a margin
                # by which the row's u may fall before the row needs another scan
                lists = _scan(rows, src_p, sel=part, k=band, row_off=um[part], col_off=vp,
                              row_thr=tol - 2 * e,
                              held=_held_csr(mine, part, col_ids),
                              rank_dtype=rank_dtype, watch=watch)
                count, idx, ex = lists.count.cpu(), lists.idx.cpu(), lists.exact.cpu()
                rmax = lists.max.double().cpu()
                if bool(rmax.isnan().any()):
                    raise _not_finite_error()
                cols = idx if col_ids is None else \
                    torch.where(idx >= 0, col_ids[idx.clamp(min=0)], -1)
                reduced = torch.where(cols >= 0, ex - um[part, None] - v[cols.clamp(min=0)],
                                      -math.inf)
                viol = reduced > tol
                has = viol.any(dim=1)
                complete = count <= band
                # bound on max_j s_ij - v_j over the pairs scanned: a complete list knows its
                # pairs exactly and the rest lie below tol - e; else the scan's maximum
                out[part] = torch.where(complete, um[part] + torch.maximum(
                    reduced.amax(dim=1) if band else torch.full_like(e, -math.inf), tol - e),
                    um[part] + rmax + e)
                info_band.append(float(count.double().mean()) if count.numel() else 0.0)
                if bool(has.any()):
                    # each violating row's `add_k` most violating pairs
                    top = torch.where(viol, reduced, -math.inf).topk(min(add_k, band), dim=1)
                    pick = top.values > tol
                    found_r.append(part[:, None].expand_as(pick)[pick])
                    found_c.append(cols.gather(1, top.indices)[pick])
                    found_s.append(ex.gather(1, top.indices)[pick])
                redo.append(part[~complete & ~has])
            return torch.cat(redo) if redo else sel[:0]

        def price_all(sel: Tensor, src_p: _Source, col_ids: Tensor | None,
                      out: Tensor) -> None:
            # first in the ranking dtype (bfloat16: a wide band), then the rows whose band
            # overflowed in feats' dtype (a narrow one), with longer lists until none overflows
            redo = price(sel, src_p, col_ids, price_dtype[0], _BAND, out)
            if col_ids is None and 2 * redo.numel() > sel.numel():
                # most rows' bands overflowed: the ranking dtype is too coarse for these prices,
                # so the next rounds rank in feats' dtype at once (one pass instead of two)
                price_dtype[0] = rows.f.dtype
            band = max(4 * _BAND, 2 * add_k)
            while redo.numel():
                exact_rows[0] += redo.numel()
                band = min(src_p.m, band)
                redo = price(redo, src_p, col_ids, rows.f.dtype, band, out)
                band *= 4

        if sel.numel():
            price_all(sel, src, None, best)
            ref[sel] = info["rounds"]
        n_restricted = pairs_restricted = 0
        scanned = torch.empty(nr, dtype=torch.float64)  # (bounds over a subset: not kept)
        for group, cols in restricted:
            # the columns left out rose by at least the rows' deficits: certified. The rows
            # keep their bound and its prices: later rounds test the columns against the rises
            # since then, which only grow (a bound moved to the current prices kept no margin,
            # and the next round rescanned nearly every row against a third of the columns)
            price_all(group, src.subset(cols), cols, scanned)
            n_restricted += group.numel()
            pairs_restricted += group.numel() * cols.numel()
        for r in [r for r in snaps if not bool((ref == r).any())]:
            del snaps[r]
        info["restricted_rows"].append(int(comm.all_reduce(torch.tensor([n_restricted]))))
        info["restricted_pairs"].append(int(comm.all_reduce(torch.tensor([pairs_restricted]))))
        info["exact_rows"].append(int(comm.all_reduce(exact_rows)))
        info.setdefault("band_per_row", []).append(info_band[0] if info_band else 0.0)
        watch.agreed()
        if found_r:
            fr, fc, fs = torch.cat(found_r), torch.cat(found_c), torch.cat(found_s)
        else:
            fr = fc = torch.empty(0, dtype=torch.int64)
            fs = torch.empty(0, dtype=torch.float64)
        nviol = int(comm.all_reduce(torch.tensor([fr.unique().numel()])))
        info["violating_rows"].append(nviol)
        new = add(fr, fc, fs)
        info["time_pricing"].append(time.perf_counter() - t0)
        log.debug("assign_full round %d: %.1f candidates/row, solve %.3fs, pricing %.3fs, "
                  "%d violating rows, %d pairs added", info["rounds"],
                  info["candidates_per_row"][-1], info["time_solve"][-1],
                  info["time_pricing"][-1], nviol, new)
        if not new:
            break  # no pair violates the duals (or only pairs already held, by rounding)
        add_k = min(2 * add_k, m)
    info["tol"] = tol
    info["time_total"] = time.perf_counter() - start
    return x, u, v


def _not_finite_error() -> ValueError:
    return ValueError("assign_full: feats @ targets^T is not finite (the product overflowed)")


def _default_candidate_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (oneDNN: 4-7x the float32 matmul here),
    else the input dtype. Only the ranking of candidates uses it."""
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and \
            torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return dtype


def _check_k(k: int, col_k: int, chunk_elems: int, coarse: int, coarse_min: int) -> None:
    for name, value, least in (("k", k, 1), ("col_k", col_k, 0), ("chunk_elems", chunk_elems, 1),
                               ("coarse", coarse, 1), ("coarse_min", coarse_min, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"assign_full: {name} should be an int >= {least}, got {value!r}")


def _run(feats: Tensor, row0: int, n: int, targets, init: Tensor | None, warm, comm: _Comm,
         deadline: float | None, should_stop, *, k: int, col_k: int, chunk_elems: int,
         candidate_dtype: torch.dtype | None, coarse: int, coarse_min: int,
         stats: dict | None) -> tuple[Tensor, Tensor, Tensor]:
    """The solve shared by assign_full (one process) and assign_sharded (this rank's rows)."""
    start = time.perf_counter()
    device = feats.device
    # the exact scores are computed from float32 (or float64) values, never from bfloat16 ones
    exact_dtype = feats.dtype if feats.dtype in (torch.float32, torch.float64) else torch.float32
    feats = feats.to(exact_dtype).contiguous()
    d = feats.shape[1]
    rank_dtype = candidate_dtype or _default_candidate_dtype(device, exact_dtype)
    src = _Source(targets, exact_dtype, device, tile=max(1, chunk_elems // max(d, 1)))
    mu = comm.all_reduce(feats.double().sum(dim=0).cpu()) / max(n, 1)  # the mean row
    rows = _Rows(feats, row0, n, rank_dtype, mu.to(device))
    if n == src.m:
        # Square: every target is taken once, so a per-target term changes every matching's
        # total alike. Solving for s_ij - mu . t_j leaves the optimum as it is and takes away
        # what near-parallel features share (their rows all rank the targets by mu . t_j and
        # crowd onto the same few); v gets the term back at the end.
        src.w = torch.cat([(t.double() @ rows.mu.double()).cpu() for _, t in src.tiles()])
        if warm is not None:
            warm = (warm[0], warm[1], warm[2].cpu().double() - src.w)
    watch = _Watch(comm, deadline, should_stop, start)
    info: dict = {}
    x, u, v = _solve(rows, src, init, warm, comm, watch, k=k, col_k=col_k, coarse=coarse,
                     coarse_min=coarse_min, info=info)
    if src.w is not None:
        v = v + src.w
    info["time_total"] = time.perf_counter() - start
    if stats is not None:
        stats.update(info)
    return x, u, v


def assign_full(feats: Tensor, targets: Tensor, init: Tensor | None = None,
                return_duals: bool = False, *, k: int = 16, col_k: int = 2,
                chunk_elems: int = 1 << 24, candidate_dtype: torch.dtype | None = None,
                stats: dict | None = None, coarse: int = 4, coarse_min: int = 1024
                ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The exact assignment of every feats row to its own target over the whole dataset,
    maximising sum_i feats_i . targets_c(i), without forming the n x m score matrix.

    Column generation (see the module docstring): top-k candidates from one fused pass, an
    exact sparse solve with duals, and pricing passes until no pair violates the duals. Memory
    O(n k + one tile of targets); time about two passes plus the sparse solves.

    Exactness: every pair's score s_ij = feats_i . targets_j is certified against the returned
    duals in float64 (from feats' values): s_ij <= u_i + v_j + tol for every pair, with equality
    on the assigned pairs, tol = 4 eps (sqrt(d) max|f_i| max|t_j| + max|u| + max|v|) and eps
    feats' machine epsilon (about 5e-6 for unit float32 vectors at d = 64); the passes rank in
    bfloat16 (CPUs with native bfloat16) or feats' dtype and score exactly every pair within
    the ranking's proven error of a violation. On CUDA with TF32 matmuls enabled, the ranking
    is TF32's and its bound is float32's: disable TF32 for a proof.

    Args:
        feats: Tensor[n, d], float32 or float64, finite; CPU or CUDA.
        targets: Tensor[m, d] with m >= n, same dtype and device, finite.
        init: int64 (or int32) Tensor[n], the held assignment (a one-to-one map into range(m)),
            on feats' device. Its pairs join the candidates (so the sparse problem is feasible)
            and warm the first solve. None: the identity, for feasibility only.
        return_duals: also return the certificate.
        k: candidates per row from the first pass, and the first round's additions per
            violating row (doubled each round).
        col_k: candidate rows per target from the first pass (each target's best rows).
        chunk_elems: target entries per tile of a pass (targets per tile = chunk_elems // d):
            the memory one tile takes.
        candidate_dtype: the dtype the passes rank in (never the one the answer is certified
            in). None: bfloat16 on CPUs with native bfloat16 matmul, else feats'.
        stats: a dict to fill with rounds, candidates per row, violations and phase times (s);
            where the coarse duals were computed, "coarse" holds the subsample's size, its own
            stats and the time of the extension, and "crowd" the gate's sample.
        coarse: the subsample factor of the coarse duals (1: never use them). Where n >=
            coarse_min and a sample of rows crowds onto the same favourite targets (fewer
            distinct favourites than half of what independent picks give: near-parallel
            features), the exact duals of a random 1/coarse of the rows and targets (solved by
            this function, so recursively), extended to every row and target, rank the first
            candidates by reduced score (4k per row) and warm the first solve.
        coarse_min: the smallest n that computes coarse duals (the recursion's floor).

    Returns:
        int64 Tensor[n] on feats' device: for each feats row, its target. With return_duals,
        (col4row, u, v): float64 Tensor[n] and Tensor[m] on feats' device with u_i + v_j >=
        feats_i . targets_j (up to tol above) for every pair, equality on the assigned pairs,
        and every unassigned target's v (0) at most every assigned one's.
    """
    _check_inputs(feats, targets, init, k, col_k, chunk_elems, coarse, coarse_min)
    n, device = feats.shape[0], feats.device
    if n == 0:
        cols = torch.empty(0, dtype=torch.int64, device=device)
        f64 = dict(dtype=torch.float64, device=device)
        return (cols, torch.empty(0, **f64), torch.zeros(targets.shape[0], **f64)) \
            if return_duals else cols
    x, u, v = _run(feats, 0, n, targets.contiguous(), init, None, _Comm(local=True), None, None,
                   k=k, col_k=col_k, chunk_elems=chunk_elems, candidate_dtype=candidate_dtype,
                   coarse=coarse, coarse_min=coarse_min, stats=stats)
    x = x.to(device)
    return (x, u.to(device), v.to(device)) if return_duals else x


def assign_sharded(feats: Tensor, row0: int, n: int, targets, init: Tensor, *,
                   warm: tuple[Tensor, Tensor, Tensor] | None = None,
                   deadline: float | None = None, should_stop=None, group=None,
                   stats: dict | None = None, k: int = 16, col_k: int = 2,
                   chunk_elems: int = 1 << 24, candidate_dtype: torch.dtype | None = None,
                   coarse: int = 4, coarse_min: int = 1024, solve_threads: int | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """assign_full over rows split across the ranks of a process group: each rank passes its
    own contiguous rows, which stay where they are; the targets come tile by tile (a Targets
    regenerates them from its seed, so no rank holds the table). Call it on every rank.

    Each rank scores its rows against every target; only candidate pairs (to rank 0) and duals
    and the matching (from rank 0) travel. Rank 0 solves the sparse problem while the others
    wait on the group's store, not in a collective, so a long solve cannot trip the watchdog.

    Args:
        feats: Tensor[r, d] (float32, float64 or bfloat16; bfloat16 is widened to float32 for
            the exact scores), rows row0 .. row0 + r of the n; the ranks' rows tile [0, n).
        row0: this rank's first row.
        n: rows over all ranks (n <= m).
        targets: Tensor[m, d] or nat_ext.targets.Targets, the same on every rank.
        init: int64 Tensor[n], the held one-to-one assignment (the same on every rank).
        warm: (col4row, u, v) returned by an earlier call: its prices start the solve, and
            the one full pass ranks under them (init stays the held matching).
        deadline: time.monotonic() after which the solve gives up: SolveInterrupted("budget").
        should_stop: polled through the solve on every rank (every tile of a pass, every 0.2 s
            of the sparse solve): true on any rank gives SolveInterrupted("stop") on every rank.
        group: the process group (default: the default group; none: one process).
        stats, k, col_k, chunk_elems, candidate_dtype, coarse, coarse_min: as assign_full.
        solve_threads: torch threads rank 0's sparse solve runs on (None: torch's setting).
            Every other rank only waits meanwhile, so a launcher's one thread per rank
            (torchrun sets OMP_NUM_THREADS=1) can be raised for the solve alone.

    Returns:
        (col4row int64[n], u float64[n], v float64[m]) on the CPU, the same on every rank.
    """
    if not isinstance(feats, Tensor) or feats.dim() != 2 or not feats.is_floating_point():
        raise ValueError(f"assign_sharded: feats should be a 2-D floating point Tensor, got "
                         f"{type(feats).__name__} {getattr(feats, 'shape', '')}")
    if not bool(torch.isfinite(feats).all()):
        raise ValueError("assign_sharded: feats contains NaN or infinite values")
    m, d = (targets.shape if isinstance(targets, Tensor) else (targets.n, targets.d))
    if d != feats.shape[1]:
        raise ValueError(f"assign_sharded: targets should have the feature size d="
                         f"{feats.shape[1]} of feats, got {d}")
    if not isinstance(init, Tensor) or tuple(init.shape) != (n,) or n > m:
        raise ValueError(f"assign_sharded: init should be a Tensor of shape ({n},) with n <= "
                         f"m = {m}, got {getattr(init, 'shape', init)}")
    _check_k(k, col_k, chunk_elems, coarse, coarse_min)
    if solve_threads is not None and (isinstance(solve_threads, bool) or
                                      not isinstance(solve_threads, int) or solve_threads < 1):
        raise ValueError(f"assign_sharded: solve_threads should be a positive int or None, got "
                         f"{solve_threads!r}")
    comm = _Comm(group, solve_threads=solve_threads)
    spans = torch.tensor(comm.all_gather_ints(row0)), torch.tensor(
        comm.all_gather_ints(feats.shape[0]))
    order = spans[0].argsort()
    starts, sizes = spans[0][order], spans[1][order]
    if int(starts[0]) != 0 or bool((starts[1:] != (starts + sizes)[:-1]).any()) or \
            int(starts[-1] + sizes[-1]) != n:
        raise ValueError(f"assign_sharded: the ranks' rows should tile [0, {n}) without gaps or "
                         f"overlaps, got (row0, rows) = {list(zip(spans[0].tolist(), spans[1].tolist()))}")
    if n == 0:  # nothing to assign (n is the same on every rank): every target keeps v = 0
        m = targets.shape[0] if isinstance(targets, Tensor) else targets.n
        return (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float64),
                torch.zeros(m, dtype=torch.float64))
    return _run(feats, row0, n, targets, init.cpu(), warm, comm, deadline, should_stop, k=k,
                col_k=col_k, chunk_elems=chunk_elems, candidate_dtype=candidate_dtype,
                coarse=coarse, coarse_min=coarse_min, stats=stats)
