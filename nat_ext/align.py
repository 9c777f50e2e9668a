"""Soft alignment of a batch's images with the targets they hold: Sinkhorn-Knopp.

NAT aligns a batch's ``b`` images with the ``b`` targets they hold by the exact assignment
(a permutation). ``--align sinkhorn`` replaces it by the entropy-regularised transport plan
with equal marginals (Cuturi, NeurIPS 2013): the ``b x b`` matrix ``P`` with every row and
every column summing to 1 that maximises ``<P, S> + eps * H(P)`` for the scores
``S = feats @ targets^T``. As ``eps -> 0`` the plan tends to the optimal permutation (when it
is unique); larger ``eps`` spreads each image over several targets.

The iterations run in the log domain (``logsumexp`` of ``S / eps`` plus the potentials), so
no ``exp`` overflows or underflows whatever ``eps``; batched over leading dimensions and on
the scores' device, with no host sync.
"""
from __future__ import annotations

import math

import torch

from .ops import linear_sum_assignment_ex

__all__ = ["sinkhorn_plan", "round_plan", "check_sinkhorn"]


def check_sinkhorn(eps: float, iters: int) -> None:
    """Raise ValueError, naming the option, unless ``eps`` and ``iters`` define a Sinkhorn run."""
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"sinkhorn_eps should be a finite number > 0, got {eps!r}")
    if not (isinstance(iters, int) and iters >= 1):
        raise ValueError(f"sinkhorn_iters should be an int >= 1, got {iters!r}")


def sinkhorn_plan(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """The entropy-regularised transport plan between rows and columns, equal marginals.

    Args:
        scores: Tensor[..., b, b] floating point, finite (to be maximised).
        eps: entropy weight (> 0), in the units of ``scores``.
        iters: Sinkhorn iterations (each scales the rows, then the columns).

    Returns:
        Tensor[..., b, b] of ``scores``' dtype: non-negative, columns summing to 1 exactly up to
        rounding after the last iteration, rows to 1 up to the convergence left after ``iters``.
    """
    check_sinkhorn(eps, iters)
    if scores.dim() < 2 or scores.shape[-1] != scores.shape[-2] or not scores.is_floating_point():
        raise ValueError(f"scores should be a floating Tensor[..., b, b], got {scores.dtype} "
                         f"Tensor{list(scores.shape)}")
    logits = scores / eps
    col = torch.zeros_like(logits[..., :1, :])  # log column scalings, Tensor[..., 1, b]
    for _ in range(iters):
        row = -torch.logsumexp(logits + col, dim=-1, keepdim=True)   # rows sum to 1
        col = -torch.logsumexp(logits + row, dim=-2, keepdim=True)   # columns sum to 1
    return torch.exp(logits + row + col)


def round_plan(plan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation nearest to a plan: the assignment maximising the plan's mass it keeps
    (``argmax_perm sum_i P[i, perm(i)]``, i.e. the least Frobenius distance to ``P``).

    Args:
        plan: Tensor[..., b, b] from :func:`sinkhorn_plan`.

    Returns:
        ``(col4row, info)`` as ``nat_ext.linear_sum_assignment_ex``: no host sync; ``col4row``
        all -1 and ``info`` nonzero where the plan holds a NaN.
    """
    return linear_sum_assignment_ex(plan, maximize=True)
