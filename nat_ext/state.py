"""Assignment state of NAT: which target each training image holds.

``perm[i]`` is the target index held by image ``i``; ``inverse[t]`` is the
image holding target ``t``. Both are kept on the CPU (one int64 per image) and
must always form a permutation of ``range(n)``.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["Assignment"]

AssignFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _default_assign(feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Looked up at call time so importing this module never needs the compiled op.
    import nat_ext
    return nat_ext.assign(feats, targets)


class Assignment:
    """A permutation between images and targets, updated batch by batch.

    Args:
        n: number of images (= number of targets).
        seed: seed of the initial random permutation.
        assign_fn: solver ``(feats Tensor[b, d], targets Tensor[b, d]) -> Tensor[b]``
            maximising the summed dot products; defaults to ``nat_ext.assign``.
    """

    def __init__(self, n: int, seed: int = 0, assign_fn: AssignFn | None = None) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n should be a positive int, got {n!r}")
        g = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=g)
        self.inverse = torch.empty_like(self.perm)
        self.inverse[self.perm] = torch.arange(n)
        self.assign_fn = assign_fn or _default_assign

    @property
    def n(self) -> int:
        return self.perm.numel()

    def reassign(self, index: torch.Tensor, feats: torch.Tensor,
                 target_rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Redistribute the targets held by a batch among its images.

        Solves the ``b x b`` assignment maximising the sum of dot products
        between features and the batch's targets. Does not modify the state:
        apply the result with :meth:`update` (after an all-gather when
        distributed).

        Args:
            index: Tensor[b] int64 image indices of the batch, distinct.
            feats: Tensor[b, d] features of those images (any float dtype/device).
            target_rows: maps Tensor[k] target indices to Tensor[k, d] targets.

        Returns:
            Tensor[b] int64 (CPU): the target index each image of the batch holds next.
        """
        index = index.cpu()
        if feats.dim() != 2 or feats.shape[0] != index.numel():
            raise ValueError(f"feats should be Tensor[{index.numel()}, d], got {tuple(feats.shape)}")
        held = self.perm[index]
        targets = target_rows(held).to(device=feats.device, dtype=feats.dtype)
        choice = self.assign_fn(feats.detach(), targets).cpu()
        return held[choice]

    def update(self, index: torch.Tensor, new_targets: torch.Tensor) -> int:
        """Set ``perm[index] = new_targets`` and fix the inverse.

        The caller guarantees that ``new_targets`` is a permutation of
        ``perm[index]`` (true for :meth:`reassign` results, and for the union
        of all ranks' results since ranks hold disjoint images).

        Args:
            index: Tensor[b] int64 image indices.
            new_targets: Tensor[b] int64 target indices.

        Returns:
            Number of images whose target changed.
        """
        index, new_targets = index.cpu(), new_targets.cpu()
        changed = int((self.perm[index] != new_targets).sum())
        self.perm[index] = new_targets
        self.inverse[new_targets] = index
        return changed

    def check(self) -> None:
        """Raise RuntimeError unless ``perm`` is a permutation and ``inverse`` its inverse."""
        n = self.n
        counts = torch.bincount(self.perm, minlength=n)
        if self.perm.min() < 0 or self.perm.max() >= n or not bool((counts == 1).all()):
            raise RuntimeError("assignment perm is not a permutation of range(n): "
                               f"{int((counts == 0).sum())} targets unheld")
        if not torch.equal(self.inverse[self.perm], torch.arange(n)):
            raise RuntimeError("assignment inverse does not invert perm")

    def state_dict(self) -> dict:
        """Tensors only (safe for ``torch.load(weights_only=True)``)."""
        return {"perm": self.perm.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; validates size and the invariant."""
        perm = state["perm"]
        if perm.numel() != self.n:
            raise ValueError(f"state perm has {perm.numel()} entries, expected {self.n}")
        self.perm = perm.to(torch.int64).clone()
        self.inverse = torch.empty_like(self.perm)
        self.inverse[self.perm] = torch.arange(self.n)
        self.check()
