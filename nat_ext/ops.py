"""Python wrappers of the nat ops, and their fake kernels for torch.compile / meta tensors.

The schemas live in csrc/nat.cpp; the fake kernels mirror the C++ shape checks with
torch._check so that traced code fails the same way eager code does.
"""

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SOLVERS = ("auto", "jv", "auction")


def assign(feats: Tensor, targets: Tensor, solver: str = "auto") -> Tensor:
    """The NAT batch reassignment: match feature rows to targets one-to-one, maximising the
    sum of dot products (equivalently, for L2-normalised rows, minimising the summed squared
    distances). Exact.

    Args:
        feats: Tensor[n, d] or Tensor[B, n, d], float32/float64/float16/bfloat16.
        targets: Tensor[m, d] or Tensor[B, m, d] with m >= n, same dtype and device.
        solver: "auto", "jv" or "auction" (see `solve_with_duals`).

    Returns:
        int64 Tensor[n] or Tensor[B, n]: for each feats row, the row of targets assigned to it.
    """
    return torch.ops.nat.assign.default(feats, targets, solver)


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
        -inf entry (+inf when maximising).
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


def _check_solver(solver: str, n, m) -> None:
    torch._check(solver in SOLVERS, lambda: f"solver should be one of {SOLVERS}, got {solver!r}")
    torch._check(solver != "auction" or n == m,
                 lambda: f"solver='auction' needs square problems (n == m), got n={n}, m={m}")


def _check_cost(cost: Tensor, solver: str = "auto") -> None:
    torch._check(cost.dim() in (2, 3), lambda: f"cost should be 2-D or 3-D, got {cost.dim()}-D")
    torch._check(cost.dtype in _FLOATS, lambda: f"cost should be floating point, got {cost.dtype}")
    torch._check(cost.shape[-2] <= cost.shape[-1],
                 lambda: f"cost should have n <= m, got shape {tuple(cost.shape)}")
    _check_solver(solver, cost.shape[-2], cost.shape[-1])


@torch.library.register_fake("nat::linear_sum_assignment")
def _linear_sum_assignment_fake(cost: Tensor, maximize: bool = False,
                                solver: str = "auto") -> Tensor:
    _check_cost(cost, solver)
    return cost.new_empty(cost.shape[:-1], dtype=torch.int64)


@torch.library.register_fake("nat::linear_sum_assignment_with_duals")
def _linear_sum_assignment_with_duals_fake(cost: Tensor, maximize: bool = False,
                                           solver: str = "auto"):
    _check_cost(cost, solver)
    rows = cost.new_empty(cost.shape[:-1], dtype=torch.int64)
    u = cost.new_empty(cost.shape[:-1], dtype=torch.float64)
    v = cost.new_empty(cost.shape[:-2] + cost.shape[-1:], dtype=torch.float64)
    return rows, u, v


@torch.library.register_fake("nat::_linear_sum_assignment_team")
def _linear_sum_assignment_team_fake(cost: Tensor, maximize: bool, threads: int,
                                     solver: str = "jv"):
    return _linear_sum_assignment_with_duals_fake(cost, maximize, solver)


@torch.library.register_fake("nat::linear_sum_assignment_ex")
def _linear_sum_assignment_ex_fake(cost: Tensor, maximize: bool = False, solver: str = "auto",
                                   check_errors: bool = False):
    cols = _linear_sum_assignment_fake(cost, maximize, solver)
    return cols, cost.new_empty(cost.shape[:-2], dtype=torch.int64)


@torch.library.register_fake("nat::assign_ex")
def _assign_ex_fake(feats: Tensor, targets: Tensor, solver: str = "auto",
                    check_errors: bool = False):
    cols = _assign_fake(feats, targets, solver)
    return cols, feats.new_empty(feats.shape[:-2], dtype=torch.int64)


@torch.library.register_fake("nat::assign")
def _assign_fake(feats: Tensor, targets: Tensor, solver: str = "auto") -> Tensor:
    torch._check(feats.dim() in (2, 3), lambda: f"feats should be 2-D or 3-D, got {feats.dim()}-D")
    torch._check(targets.dim() == feats.dim(),
                 lambda: f"targets should be {feats.dim()}-D like feats, got {targets.dim()}-D")
    torch._check(feats.dtype in _FLOATS, lambda: f"feats should be floating point, got {feats.dtype}")
    torch._check(targets.dtype == feats.dtype,
                 lambda: f"targets should have the dtype of feats ({feats.dtype}), got {targets.dtype}")
    torch._check(feats.shape[-1] == targets.shape[-1], lambda: "feats and targets differ in d")
    if feats.dim() == 3:
        torch._check(feats.shape[0] == targets.shape[0], lambda: "feats and targets differ in B")
    torch._check(feats.shape[-2] <= targets.shape[-2], lambda: "assign needs n <= m")
    _check_solver(solver, feats.shape[-2], targets.shape[-2])
    return feats.new_empty(feats.shape[:-1], dtype=torch.int64)
