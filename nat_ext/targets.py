"""Noise-as-targets: fixed targets drawn uniformly on the unit sphere.

Every target row is a pure function of ``(seed, index)``: row ``i`` is drawn
from its own counter-seeded stream (``numpy`` PCG64 seeded with
``SeedSequence([seed, i])``), then L2-normalised. So a run can store just the
seed and regenerate any row, or the whole ``n x d`` matrix, bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["target_rows", "Targets"]


def _check_sizes(seed: int, d: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise TypeError(f"seed should be a non-negative int, got {seed!r}")
    if not isinstance(d, int) or d < 1:
        raise ValueError(f"d should be a positive int, got {d!r}")


def target_rows(seed: int, index: torch.Tensor | list[int], d: int) -> torch.Tensor:
    """Regenerate target rows from ``(seed, index)``.

    Args:
        seed: non-negative int identifying the target set.
        index: Tensor[k] (or list) of row indices, any non-negative ints.
        d: target dimension.

    Returns:
        Tensor[k, d] float32 on the CPU, each row of unit L2 norm.
    """
    _check_sizes(seed, d)
    idx = torch.as_tensor(index, dtype=torch.int64).reshape(-1).tolist()
    out = np.empty((len(idx), d), dtype=np.float64)
    for r, i in enumerate(idx):
        if i < 0:
            raise ValueError(f"index should be non-negative, got {i}")
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, i])))
        out[r] = rng.standard_normal(d)
    # Normalise in float64 so the float32 result does not depend on summation order.
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return torch.from_numpy(out.astype(np.float32))


class Targets:
    """The ``n`` targets of a run, materialised or regenerated on demand.

    Args:
        n: number of targets (one per training image).
        d: dimension.
        seed: seed of the target set.
        materialize: keep the Tensor[n, d] matrix (fast lookups) instead of
            regenerating the rows a batch needs from the seed (no memory).
        device: device for the materialised matrix and for ``rows`` results.
    """

    def __init__(self, n: int, d: int, seed: int, materialize: bool = True,
                 device: torch.device | str = "cpu") -> None:
        _check_sizes(seed, d)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n should be a positive int, got {n!r}")
        self.n, self.d, self.seed = n, d, seed
        self.device = torch.device(device)
        self.matrix: torch.Tensor | None = None
        if materialize:
            self.matrix = target_rows(seed, torch.arange(n), d).to(self.device)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Targets of the given rows.

        Args:
            index: Tensor[k] int64 target indices in ``[0, n)``.

        Returns:
            Tensor[k, d] float32 on ``self.device``.
        """
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n):
            raise ValueError(f"index should lie in [0, {self.n}), got range "
                             f"[{int(index.min())}, {int(index.max())}]")
        if self.matrix is not None:
            return self.matrix[index.to(self.device)]
        return target_rows(self.seed, index.cpu(), self.d).to(self.device)

    def state_dict(self) -> dict:
        """Plain description (no matrix): the seed regenerates everything."""
        return {"n": self.n, "d": self.d, "seed": self.seed}
