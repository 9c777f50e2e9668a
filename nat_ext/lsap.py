"""scipy-compatible linear_sum_assignment on numpy arrays and tensors, and the optimality check
for the dual certificates our solvers return."""

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .ops import _FLOATS

_NUMPY_FLOATS = (np.float16, np.float32, np.float64)


def _as_cost_tensor(cost_matrix: Any) -> tuple[Tensor, bool]:
    """Returns (cost as a float tensor, whether the input was numpy-like)."""
    if isinstance(cost_matrix, Tensor):
        cost = cost_matrix
        if cost.is_complex():
            raise TypeError(f"cost_matrix should be real-valued, got a tensor of {cost.dtype}")
        if cost.dtype not in _FLOATS:
            cost = cost.to(torch.float64)  # integers and bools, as scipy casts them
        return cost, False
    arr = np.asarray(cost_matrix)
    if arr.dtype.type not in _NUMPY_FLOATS:
        if not np.can_cast(arr.dtype, np.float64, casting="safe"):
            raise TypeError(f"Cannot cast array data from {arr.dtype!r} to dtype('float64') "
                            "according to the rule 'safe'")
        arr = arr.astype(np.float64)
    if any(s < 0 for s in arr.strides):
        arr = np.ascontiguousarray(arr)  # torch.from_numpy refuses negative strides
    return torch.from_numpy(arr), True


def linear_sum_assignment(cost_matrix: Any, maximize: bool = False,
                          solver: str = "auto") -> tuple[Any, Any]:
    """Drop-in for scipy.optimize.linear_sum_assignment, on numpy arrays or tensors, and batched.

    Same results (an optimal assignment; under ties the indices may differ from scipy's), same
    exceptions: ValueError for a wrong number of dimensions, NaN or -inf entries (+inf when
    maximize=True) and infeasible problems; TypeError for values that are not real numbers.
    +inf entries (-inf when maximising) are forbidden pairs.

    Args:
        cost_matrix: array_like or Tensor[n, m], or Tensor[B, n, m] for a batch; any n, m.
        maximize: maximise the total instead of minimising it.
        solver: "auto", "jv" or "auction" (square only); see `nat_ext.solve_with_duals`.

    Returns:
        (row_ind, col_ind): int64, each [k] or [B, k] with k = min(n, m); row_ind sorted.
        numpy arrays for numpy-like input, tensors on the input's device for tensors.
    """
    cost, from_numpy = _as_cost_tensor(cost_matrix)
    if cost.dim() not in (2, 3):
        raise ValueError(f"expected a matrix (2-D array) or a batch of matrices (3-D), "
                         f"got a {cost.dim()}-D array of shape {tuple(cost.shape)}")
    n, m = cost.shape[-2:]
    transposed = n > m
    cols = torch.ops.nat.linear_sum_assignment(cost.transpose(-1, -2) if transposed else cost,
                                               maximize, solver)
    if transposed:
        # cols[j] is the row of original column j; scipy lists pairs in row order.
        col_ind = torch.argsort(cols, dim=-1)
        row_ind = torch.gather(cols, -1, col_ind)
    else:
        col_ind = cols
        row_ind = torch.arange(n, device=cost.device).expand_as(cols)
    if from_numpy:
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
