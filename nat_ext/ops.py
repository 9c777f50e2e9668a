"""Python wrappers of the nat ops, and their fake kernels for torch.compile / meta tensors.

The schemas live in csrc/nat.cpp; the fake kernels repeat the C++ checks (csrc/ops_common.h)
word for word, with the same exception types (torch._check_value: ValueError,
torch._check_type: TypeError), so traced code fails as eager code does.
"""

from typing import Any

import torch
from torch import Tensor

from ._arrays import as_float_array, to_tensor

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SOLVERS = ("auto", "jv", "auction")


def assign(feats: Any, targets: Any, solver: str = "auto") -> Any:
    """The NAT batch reassignment: match feature rows to targets one-to-one, maximising the
    sum of dot products. Exact.

    The objective, exactly: for square problems (n == m) every target is used once, so
    sum_i ||f_i - t_c(i)||^2 = sum ||f||^2 + sum ||t||^2 - 2 sum_i <f_i, t_c(i)>: maximising the
    dot products IS minimising the summed squared distances, whatever the norms. With m > n the
    unused targets change the second sum, so the two agree only when every target has the same
    norm (NAT's targets are on the unit sphere). Cosine similarity is the dot product of
    L2-normalised rows: normalise feats and targets first to maximise it.

    Unlike the op `torch.ops.nat.assign` (tensors of one dtype only), this wrapper also takes
    numpy arrays (numpy in, numpy out; big-endian, read-only and strided arrays as they are)
    and mixed float dtypes (computed in the wider one, as torch promotes them).

    Args:
        feats: Tensor or array [n, d] or [B, n, d], floating point.
        targets: Tensor or array [m, d] or [B, m, d] with m >= n. A tensor and an array may be
            mixed: the array goes to the tensor's device.
        solver: "auto", "jv" or "auction" (see `solve_with_duals`).

    Returns:
        int64 [n] or [B, n]: for each feats row, the row of targets assigned to it; a Tensor on
        the inputs' device, or a numpy array when neither input is a tensor.
    """
    tensors = isinstance(feats, Tensor), isinstance(targets, Tensor)
    if not all(tensors):
        device = feats.device if tensors[0] else targets.device if tensors[1] else None
        if not tensors[0]:
            feats = to_tensor(as_float_array(feats, "feats")).to(device)
        if not tensors[1]:
            targets = to_tensor(as_float_array(targets, "targets")).to(device)
    if feats.dtype != targets.dtype and feats.dtype in _FLOATS and targets.dtype in _FLOATS:
        wide = torch.promote_types(feats.dtype, targets.dtype)
        feats, targets = feats.to(wide), targets.to(wide)
    cols = torch.ops.nat.assign.default(feats, targets, solver)
    return cols if any(tensors) else cols.numpy()


def solve_with_duals(cost: Tensor, maximize: bool = False,
                     solver: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Solves the assignment problem and returns an optimality certificate with it.

    Args:
        cost: Tensor[n, m] or Tensor[B, n, m] with n <= m, floating point. +inf (-inf when
            maximize=True) marks a forbidden pair.
        maximize: maximise the total instead of minimising it.
        solver: every choice is exact. "jv": shortest augmenting paths per problem (on the GPU,
            one thread block a problem). "auction" (square problems only): on the GPU, an
            epsilon-scaled auction on the whole GPU as a warm start, finished by exact augmenting
            paths, for single large problems; on the CPU the same algorithm runs serially, which
            is slow and meant for testing. "auto": "jv" on the CPU; on the GPU "auction" for
            square problems with n >= 2048 in batches of at most 8, else "jv".

    Returns:
        (col4row, u, v): int64 Tensor[.., n], the column of each row; float64 Tensor[.., n] and
        Tensor[.., m], duals with u_i + v_j <= c_ij (>= when maximising) on every finite entry,
        equality on assigned pairs, and every unassigned column's v at least every assigned
        column's (at most, when maximising). `check_optimality` verifies all of it.
    """
    return torch.ops.nat.linear_sum_assignment_with_duals.default(cost, maximize, solver)


def linear_sum_assignment_ex(cost: Tensor, maximize: bool = False, solver: str = "auto",
                             check_errors: bool = False) -> tuple[Tensor, Tensor]:
    """`torch.ops.nat.linear_sum_assignment` without the host sync, as torch.linalg's _ex ops.

    With check_errors=False the call never waits for the device and never raises for the values
    of cost (shapes, dtypes and arguments are still checked at once): each problem's outcome is
    returned in `info`, and the rows of a problem that failed are all -1, so a failure cannot
    pass for an assignment. With check_errors=True it raises as the plain op does.

    Args:
        cost: Tensor[n, m] or Tensor[B, n, m] with n <= m, floating point.
        maximize: maximise the total instead of minimising it.
        solver: "auto", "jv" or "auction" (see `solve_with_duals`).
        check_errors: raise (after a host sync) instead of reporting through `info`.

    Returns:
        (col4row, info): int64 Tensor[.., n], the column of each row (-1 in failed problems);
        int64 Tensor[B] (or [] unbatched) on cost's device: 0 solved, 1 infeasible, 2 a NaN or
        -inf entry (+inf when maximising); 3 (iteration limit) and 4 (certificate failed) are
        solver faults, a bug to report: re-solve such problems on the CPU.
    """
    return torch.ops.nat.linear_sum_assignment_ex.default(cost, maximize, solver, check_errors)


def assign_ex(feats: Tensor, targets: Tensor, solver: str = "auto",
              check_errors: bool = False) -> tuple[Tensor, Tensor]:
    """`assign` without the host sync: (col4row, info) as in `linear_sum_assignment_ex`
    (info 2 when feats @ targets^T holds a NaN or an infinity).

    Args:
        feats: Tensor[n, d] or Tensor[B, n, d]. targets: Tensor[m, d] or Tensor[B, m, d], m >= n.
        solver: "auto", "jv" or "auction".
        check_errors: raise (after a host sync) instead of reporting through `info`.

    Returns:
        (col4row, info): int64 Tensor[.., n] (-1 in failed problems) and int64 Tensor[B] / [].
    """
    return torch.ops.nat.assign_ex.default(feats, targets, solver, check_errors)


def certify(cost: Tensor, col4row: Tensor, v: Tensor, maximize: bool = False) -> Tensor:
    """The independent optimality check that follows every CUDA solve, on any device.

    Holds when col4row uses each column at most once, every assigned entry and every v_j is
    finite, each row's assigned column attains min_j (c_ij - v_j) (max when maximising) within
    tol, and, when n < m, every unassigned column's v is at least every assigned column's v - tol
    (at most + tol when maximising). tol = rel * (1 + max finite |c_ij| + max |v_j|), rel = 1e-9
    for float64 costs and 1e-6 for float32, float16 and bfloat16 (widened to float32) ones. It
    shares no code with the solvers (csrc/lap/certify.h); `check_optimality` is a second,
    independent implementation in Python, and the tests hold each against the other.

    Args:
        cost: Tensor[n, m] or Tensor[B, n, m] with n <= m, floating point.
        col4row: int64 Tensor[n] / Tensor[B, n] (-1 rows fail).
        v: Tensor[m] / Tensor[B, m]: column duals of the problem as posed, as `solve_with_duals`
            returns them.
        maximize: whether the assignment maximises.

    Returns:
        int64 Tensor[B] ([] unbatched) on cost's device: 0 where the certificate holds, 4
        (certificate failed) where it does not.
    """
    return torch.ops.nat.certify.default(cost, col4row, v, maximize)


def cuda_fallback_count() -> int:
    """Problems that a plain op re-solved on the CPU after a GPU solver fault (status 3 or 4), in
    this process. The first fallback warns; later ones are only counted here. NAT_CUDA_FALLBACK
    (cpu by default, or raise) chooses between falling back and raising."""
    from . import _C
    return _C._fallback_count()


# --- fake kernels: the checks of csrc/ops_common.h, in its words -------------------------------

_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble", torch.complex32: "ComplexHalf",
}


def _type_name(dtype: torch.dtype) -> str:
    """dtype as c10 prints a ScalarType in the eager messages."""
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _shape_str(shape) -> str:
    """A shape as c10 prints an IntArrayRef."""
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _sizes(t: Tensor) -> str:
    return _shape_str(t.shape)


def _check_solver(solver: str, n, m, op: str) -> None:
    torch._check_value(solver in SOLVERS, lambda: (
        f"{op}: solver should be 'auto', 'jv' or 'auction', got '{solver}'"))
    torch._check_value(solver != "auction" or n == m, lambda: (
        f"{op}: solver='auction' needs square problems (n == m), got n={n}, m={m}; "
        "use solver='auto' or 'jv'"))


def _check_cost(cost: Tensor, op: str) -> None:
    torch._check_value(cost.dim() in (2, 3), lambda: (
        f"{op}: cost should be a 2-D [n, m] or 3-D [B, n, m] tensor, got {cost.dim()}-D with "
        f"shape {_sizes(cost)}"))
    torch._check_type(cost.dtype in _FLOATS, lambda: (
        f"{op}: cost should be float32, float64, float16 or bfloat16, got "
        f"{_type_name(cost.dtype)}"))
    n, m = cost.shape[-2], cost.shape[-1]
    torch._check_value(n <= m, lambda: (
        f"{op}: cost should have no more rows than columns (n <= m), got n={n}, m={m}; "
        "transpose it, or use nat_ext.linear_sum_assignment"))


def _check_assign(feats: Tensor, targets: Tensor, solver: str) -> None:
    torch._check_value(feats.dim() in (2, 3), lambda: (
        f"assign: feats should be a 2-D [n, d] or 3-D [B, n, d] tensor, got {feats.dim()}-D "
        f"with shape {_sizes(feats)}"))
    torch._check_value(targets.dim() == feats.dim(), lambda: (
        f"assign: targets should be {feats.dim()}-D like feats ({_sizes(feats)}), got "
        f"{targets.dim()}-D with shape {_sizes(targets)}"))
    torch._check_type(feats.dtype in _FLOATS, lambda: (
        "assign: feats should be float32, float64, float16 or bfloat16, got "
        f"{_type_name(feats.dtype)}"))
    torch._check_type(targets.dtype == feats.dtype, lambda: (
        f"assign: targets should have the dtype of feats ({_type_name(feats.dtype)}), got "
        f"{_type_name(targets.dtype)}"))
    torch._check_value(feats.device == targets.device, lambda: (
        f"assign: feats and targets should be on the same device, got feats on {feats.device} "
        f"and targets on {targets.device}"))
    torch._check_value(feats.shape[-1] == targets.shape[-1], lambda: (
        "assign: feats and targets should have the same feature size d, got "
        f"{feats.shape[-1]} and {targets.shape[-1]}"))
    if feats.dim() == 3:
        torch._check_value(feats.shape[0] == targets.shape[0], lambda: (
            "assign: feats and targets should have the same batch size B, got "
            f"{feats.shape[0]} and {targets.shape[0]}"))
    n, m = feats.shape[-2], targets.shape[-2]
    torch._check_value(n <= m, lambda: (
        f"assign: feats should have no more rows than targets (n <= m), got n={n}, m={m}"))
    _check_solver(solver, n, m, "assign")


@torch.library.register_fake("nat::certify")
def _certify_fake(cost: Tensor, col4row: Tensor, v: Tensor, maximize: bool = False) -> Tensor:
    _check_cost(cost, "certify")
    rows = tuple(cost.shape[:-1])
    torch._check_value(tuple(col4row.shape) == rows, lambda: (
        f"certify: col4row should have shape {_shape_str(rows)} for cost of shape "
        f"{_sizes(cost)}, got {_sizes(col4row)}"))
    torch._check_type(col4row.dtype == torch.int64, lambda: (
        f"certify: col4row should be int64, got {_type_name(col4row.dtype)}"))
    cols = tuple(cost.shape[:-2]) + (cost.shape[-1],)
    torch._check_value(tuple(v.shape) == cols, lambda: (
        f"certify: v should have shape {_shape_str(cols)} for cost of shape {_sizes(cost)}, "
        f"got {_sizes(v)}"))
    torch._check_type(v.dtype in _FLOATS, lambda: (
        f"certify: v should be float32, float64, float16 or bfloat16, got {_type_name(v.dtype)}"))
    torch._check_value(col4row.device == cost.device and v.device == cost.device, lambda: (
        f"certify: cost, col4row and v should be on the same device, got cost on {cost.device}, "
        f"col4row on {col4row.device} and v on {v.device}"))
    return cost.new_empty(cost.shape[:-2], dtype=torch.int64)


@torch.library.register_fake("nat::_certify_or_fall_back")
def _certify_or_fall_back_fake(cost: Tensor, col4row: Tensor, v: Tensor, maximize: bool = False):
    _certify_fake(cost, col4row, v, maximize)
    return torch.empty_like(col4row)


@torch.library.register_fake("nat::linear_sum_assignment")
def _linear_sum_assignment_fake(cost: Tensor, maximize: bool = False, solver: str = "auto",
                                op: str = "linear_sum_assignment") -> Tensor:
    _check_cost(cost, op)
    _check_solver(solver, cost.shape[-2], cost.shape[-1], op)
    return cost.new_empty(cost.shape[:-1], dtype=torch.int64)


@torch.library.register_fake("nat::linear_sum_assignment_with_duals")
def _linear_sum_assignment_with_duals_fake(cost: Tensor, maximize: bool = False,
                                           solver: str = "auto",
                                           op: str = "linear_sum_assignment_with_duals"):
    _check_cost(cost, op)
    _check_solver(solver, cost.shape[-2], cost.shape[-1], op)
    rows = cost.new_empty(cost.shape[:-1], dtype=torch.int64)
    u = cost.new_empty(cost.shape[:-1], dtype=torch.float64)
    v = cost.new_empty(cost.shape[:-2] + cost.shape[-1:], dtype=torch.float64)
    return rows, u, v


@torch.library.register_fake("nat::_linear_sum_assignment_team")
def _linear_sum_assignment_team_fake(cost: Tensor, maximize: bool, threads: int,
                                     solver: str = "jv"):
    op = "_linear_sum_assignment_team"
    _check_cost(cost, op)
    torch._check_value(1 <= threads <= 64,
                       lambda: f"{op}: threads should be in [1, 64], got {threads}")
    torch._check_value(solver in SOLVERS, lambda: (
        f"{op}: solver should be 'auto', 'jv' or 'auction', got '{solver}'"))
    torch._check_value(solver != "auto", lambda: f"{op}: solver should be 'jv' or 'auction', got 'auto'")
    return _linear_sum_assignment_with_duals_fake(cost, maximize, solver, op)


@torch.library.register_fake("nat::linear_sum_assignment_ex")
def _linear_sum_assignment_ex_fake(cost: Tensor, maximize: bool = False, solver: str = "auto",
                                   check_errors: bool = False):
    cols = _linear_sum_assignment_fake(cost, maximize, solver, "linear_sum_assignment_ex")
    return cols, cost.new_empty(cost.shape[:-2], dtype=torch.int64)


@torch.library.register_fake("nat::assign")
def _assign_fake(feats: Tensor, targets: Tensor, solver: str = "auto") -> Tensor:
    _check_assign(feats, targets, solver)
    return feats.new_empty(feats.shape[:-1], dtype=torch.int64)


@torch.library.register_fake("nat::assign_ex")
def _assign_ex_fake(feats: Tensor, targets: Tensor, solver: str = "auto",
                    check_errors: bool = False):
    cols = _assign_fake(feats, targets, solver)
    return cols, feats.new_empty(feats.shape[:-2], dtype=torch.int64)
