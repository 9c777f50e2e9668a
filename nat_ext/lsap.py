"""scipy-compatible linear_sum_assignment on numpy arrays and tensors, and the optimality check
for the dual certificates our solvers return."""

import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _C
from ._arrays import as_float_array, to_tensor
from .ops import _FLOATS

_lsa_numpy = _C._lsa_numpy  # the lean numpy path (csrc/numpy_lsap.cpp), bound once
_ndarray = np.ndarray
_INDEX = re.compile(r"cost((?:\[\d+\])?)\[(\d+)\]\[(\d+)\]")  # cost[b][i][j] / cost[i][j]


def linear_sum_assignment(cost_matrix: Any, maximize: bool = False,
                          solver: str = "auto") -> tuple[Any, Any]:
    """Drop-in for scipy.optimize.linear_sum_assignment, on numpy arrays or tensors, and batched.

    Named after scipy's function, not after the op `torch.ops.nat.linear_sum_assignment` (which
    returns only the column of each row, for n <= m): it returns what scipy returns.

    Same results as scipy (an optimal assignment), same exceptions: ValueError for a wrong number
    of dimensions, NaN or -inf entries (+inf when maximize=True) and infeasible problems;
    TypeError for values that cannot be cast to float64 (strings, complex numbers). +inf entries
    (-inf when maximising) are forbidden pairs. Any byte order, strides and read-only arrays are
    taken as they are; numpy input never goes through torch unless batched.

    Ties (numpy input, and tensors on the CPU; the CUDA kernels return an optimal assignment
    without this rule): the answer depends on the cost matrix only. For n <= m, col_ind is the
    lexicographically smallest among the optimal assignments (so a constant matrix gives the
    identity, as scipy does); for n > m the rule applies to the transpose: the row of each
    column, in column order, is lexicographically smallest. Optimal means tight for the solver's
    duals in double arithmetic, which is exact for integer costs. scipy has no stated rule and
    may pick another optimum on other tied inputs.

    Args:
        cost_matrix: array_like or Tensor[n, m], or a 3-D array / Tensor[B, n, m] for a batch;
            any n, m.
        maximize: maximise the total instead of minimising it.
        solver: "auto", "jv" or "auction" (square only); see `nat_ext.solve_with_duals`.

    Returns:
        (row_ind, col_ind): int64, each [k] or [B, k] with k = min(n, m); row_ind sorted.
        numpy arrays for numpy-like input, tensors on the input's device for tensors.
    """
    # `type(..) is` costs a fifth of isinstance(.., Tensor) and keeps torch.compile off the
    # numpy path (tensors never take it).
    if type(cost_matrix) is _ndarray and (solver == "auto" or solver == "jv"):
        out = _lsa_numpy(cost_matrix, maximize)  # None unless 2-D, float, native, aligned
        if out is not None:
            return out
    return _linear_sum_assignment(cost_matrix, maximize, solver)


def _linear_sum_assignment(cost_matrix: Any, maximize: bool, solver: str) -> tuple[Any, Any]:
    """linear_sum_assignment for everything the numpy fast path does not take."""
    if isinstance(cost_matrix, Tensor):
        cost = cost_matrix
        if cost.is_complex():
            raise TypeError(f"cost_matrix should be real-valued, got a tensor of {cost.dtype}")
        if cost.dtype not in _FLOATS:
            cost = cost.to(torch.float64)  # integers and bools, as scipy casts them
    else:
        arr = as_float_array(cost_matrix, "cost_matrix")
        if arr.ndim == 2 and solver in ("auto", "jv"):
            return _lsa_numpy(arr, maximize)
        cost = to_tensor(arr)
    if cost.dim() not in (2, 3):
        raise ValueError(f"cost_matrix: expected a matrix (2-D array) or a batch of matrices "
                         f"(3-D), got a {cost.dim()}-D array of shape {tuple(cost.shape)}")
    n, m = cost.shape[-2:]
    transposed = n > m
    try:
        cols = torch.ops.nat.linear_sum_assignment(
            cost.transpose(-1, -2) if transposed else cost, maximize, solver)
    except ValueError as e:
        if not transposed:
            raise
        # The op read the transpose: name the caller's entry, cost[..][i][j], not cost[..][j][i].
        raise ValueError(_INDEX.sub(r"cost\1[\3][\2]", str(e))) from None
    if transposed:
        # cols[j] is the row of original column j; scipy lists pairs in row order.
        col_ind = torch.argsort(cols, dim=-1)
        row_ind = torch.gather(cols, -1, col_ind)
    else:
        col_ind = cols
        row_ind = torch.arange(n, device=cost.device).expand_as(cols)
    if not isinstance(cost_matrix, Tensor):
        return row_ind.numpy().copy(), col_ind.numpy()
    return row_ind.contiguous(), col_ind


def check_optimality(cost: Tensor, col4row: Tensor, u: Tensor, v: Tensor,
                     maximize: bool = False, tol: float | None = None) -> bool:
    """Verifies a dual certificate of optimality, independently of the solver that made it.

    For minimisation it checks, in float64: col4row is one-to-one with finite cost; every finite
    entry has u_i + v_j <= c_ij + tol; assigned pairs have |u_i + v_j - c_ij| <= tol; and when
    m > n every unassigned column's v is >= every assigned column's v - tol. Together these
    prove no other assignment costs less than sum_i c[i, col4row[i]] (up to about n * tol).
    With maximize=True the same is checked on the negated problem.

    Args:
        cost: Tensor[n, m] or Tensor[B, n, m] with n <= m.
        col4row: int64 Tensor[n] / Tensor[B, n].
        u: Tensor[n] / Tensor[B, n]. v: Tensor[m] / Tensor[B, m].
        maximize: whether the certificate is for the maximisation problem.
        tol: absolute tolerance; default 1e-9 * (1 + the largest finite |c_ij|).

    Returns:
        True when the certificate holds for every problem of the batch.
    """
    c = torch.as_tensor(cost).to(torch.float64)
    if c.dim() not in (2, 3):
        raise ValueError(f"cost should be 2-D or 3-D, got shape {tuple(c.shape)}")
    batched, cost_shape = c.dim() == 3, tuple(c.shape)
    if not batched:
        c = c.unsqueeze(0)
    B, n, m = c.shape
    if n > m:
        raise ValueError(f"cost should have n <= m (transpose it and its duals), got n={n}, m={m}")
    expected = {"col4row": (B, n), "u": (B, n), "v": (B, m)}
    given = {"col4row": col4row, "u": u, "v": v}
    for name, shape in expected.items():
        given[name] = torch.as_tensor(given[name], device=c.device)
        if given[name].numel() != shape[0] * shape[1]:
            want = shape if batched else shape[1:]
            raise ValueError(f"{name} should have shape {want} for cost of shape "
                             f"{cost_shape}, got {tuple(given[name].shape)}")
    x = given["col4row"].to(torch.int64).reshape(B, n)
    uu = given["u"].to(torch.float64).reshape(B, n)
    vv = given["v"].to(torch.float64).reshape(B, m)
    if not (torch.isfinite(uu).all() and torch.isfinite(vv).all()):
        return False
    if maximize:
        c, uu, vv = -c, -uu, -vv
    finite = torch.isfinite(c)
    if tol is None:
        scale = c[finite].abs().max().item() if finite.any() else 0.0
        tol = 1e-9 * (1.0 + scale)
    if n == 0:
        return True
    if ((x < 0) | (x >= m)).any():
        return False
    if (torch.sort(x, dim=-1).values.diff(dim=-1) == 0).any():
        return False  # a column used twice
    slack = c - uu.unsqueeze(-1) - vv.unsqueeze(-2)
    if (finite & (slack < -tol)).any():
        return False
    assigned_cost = torch.gather(c, -1, x.unsqueeze(-1)).squeeze(-1)
    assigned_slack = torch.gather(slack, -1, x.unsqueeze(-1)).squeeze(-1)
    if not torch.isfinite(assigned_cost).all() or (assigned_slack.abs() > tol).any():
        return False
    if m > n:
        used = torch.zeros(B, m, dtype=torch.bool, device=c.device).scatter_(-1, x, True)
        v_assigned_max = torch.where(used, vv, -torch.inf).amax(dim=-1)
        v_free_min = torch.where(used, torch.inf, vv).amin(dim=-1)
        if (v_free_min < v_assigned_max - tol).any():
            return False
    return True
