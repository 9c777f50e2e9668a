"""Assignment state of NAT: which target each training image holds.

``perm[i]`` is the target index held by image ``i``; ``inverse[t]`` is the
image holding target ``t``. Both live on the training device (one int64 per
image) and must always form a permutation of ``range(n)``. Reassignment and
update never wait for the device: the solver's outcome is accumulated on the
device and read by :meth:`Assignment.check`, at the end of an epoch.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .align import round_plan
from .faults import SOLVER_FAULTS, STATUS_NAMES, SolverFaultError, fallback_mode, wait_for_device
from .ops import assign_ex

__all__ = ["Assignment", "cpu_assign"]

AssignFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _default_assign(feats: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return assign_ex(feats, targets)


def cpu_assign(feats: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``assign_ex`` on the CPU, results back on the features' device: the solver a training run
    switches to when the device's faults too often (``--on-solver-faults cpu``; a host sync per batch)."""
    col4row, info = assign_ex(feats.cpu(), targets.cpu())
    return col4row.to(feats.device), info.to(feats.device)


class Assignment:
    """A permutation between images and targets, updated batch by batch on its device.

    Args:
        n: number of images (= number of targets).
        seed: seed of the initial random permutation (drawn on the CPU, so the same on every device).
        assign_fn: solver ``(feats Tensor[b, d], targets Tensor[b, d]) -> (col4row Tensor[b], info
            Tensor[])`` maximising the summed dot products, as ``nat_ext.assign_ex``: ``col4row``
            all -1 and ``info`` nonzero when it fails; defaults to ``nat_ext.assign_ex``.
        device: where the permutation lives (the training device).
    """

    def __init__(self, n: int, seed: int = 0, assign_fn: AssignFn | None = None,
                 device: torch.device | str = "cpu") -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n should be a positive int, got {n!r}")
        self.assign_fn = assign_fn or _default_assign
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        self._set(torch.randperm(n, generator=g))

    def _set(self, perm: torch.Tensor) -> None:
        # One scratch slot past the end of perm and inverse takes the writes of padding
        # entries (index -1), so update() needs no boolean indexing (which would sync).
        n = perm.numel()
        self._perm = torch.cat([perm.to(torch.int64), perm.new_tensor([n])]).to(self.device)
        self._inverse = torch.empty_like(self._perm)
        self._inverse[self._perm] = torch.arange(n + 1, device=self.device)
        # Failed reassignments since the last check(), by assign_ex status (index 1-4), on the device.
        self.solver_status = torch.zeros(len(STATUS_NAMES), dtype=torch.int64, device=self.device)

    @property
    def n(self) -> int:
        return self._perm.numel() - 1

    @property
    def perm(self) -> torch.Tensor:
        """Tensor[n] int64: the target of each image (a view; do not write to it)."""
        return self._perm[:-1]

    @property
    def inverse(self) -> torch.Tensor:
        """Tensor[n] int64: the image holding each target."""
        return self._inverse[:-1]

    def targets_of(self, index: torch.Tensor) -> torch.Tensor:
        """Tensor[b] int64 on the state's device: the targets held by the images ``index`` (Tensor[b])."""
        return self._perm.index_select(0, index.to(self.device))

    def reassign(self, index: torch.Tensor, feats: torch.Tensor,
                 target_rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Redistribute the targets held by a batch among its images.

        Solves the ``b x b`` assignment maximising the sum of dot products
        between features and the batch's targets. Does not modify the
        permutation: apply the result with :meth:`update` (after an exchange
        between processes when distributed). A failed solve (NaN features)
        leaves the batch's targets where they are and is counted for :meth:`check`.

        Args:
            index: Tensor[b] int64 image indices of the batch, distinct.
            feats: Tensor[b, d] features of those images (any float dtype, on the state's device).
            target_rows: maps Tensor[k] target indices to Tensor[k, d] targets.

        Returns:
            Tensor[b] int64 on the state's device: the target index each image of the batch holds next.
        """
        if feats.dim() != 2 or feats.shape[0] != index.numel():
            raise ValueError(f"feats should be Tensor[{index.numel()}, d], got {tuple(feats.shape)}")
        held = self.targets_of(index)
        targets = target_rows(held).to(device=feats.device, dtype=feats.dtype)
        return self._take(held, *self.assign_fn(feats.detach(), targets))

    def reassign_plan(self, index: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        """Redistribute the targets held by a batch by a transport plan rounded to the nearest
        permutation (``nat_ext.align.round_plan``); as :meth:`reassign`, apply with :meth:`update`.

        Args:
            index: Tensor[b] int64 image indices of the batch, distinct.
            plan: Tensor[b, b]: row i image ``index[i]``, column j the target it holds now.

        Returns:
            Tensor[b] int64 on the state's device: the target index each image of the batch holds next.
        """
        if plan.shape != (index.numel(), index.numel()):
            raise ValueError(f"plan should be Tensor[{index.numel()}, {index.numel()}], got {tuple(plan.shape)}")
        return self._take(self.targets_of(index), *round_plan(plan.detach()))

    def _take(self, held: torch.Tensor, col4row: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        # The targets picked by a solve over the held ones; a failed solve keeps them and is counted.
        ok = col4row >= 0
        status = info.to(self.device).reshape(1).clamp(0, len(STATUS_NAMES) - 1)
        self.solver_status.scatter_add_(0, status, (status != 0).to(torch.int64))
        return torch.where(ok, held.index_select(0, col4row.clamp(min=0)), held)

    def update(self, index: torch.Tensor, new_targets: torch.Tensor) -> torch.Tensor:
        """Set ``perm[index] = new_targets`` and fix the inverse, with no host sync.

        The caller guarantees that ``new_targets`` is a permutation of
        ``perm[index]`` over the entries with ``index >= 0`` (true for
        :meth:`reassign` results, and for the union of all ranks' results since
        ranks hold disjoint images). Entries with ``index == -1`` are padding
        and are ignored.

        Args:
            index: Tensor[b] int64 image indices (or -1).
            new_targets: Tensor[b] int64 target indices.

        Returns:
            Tensor[] int64 on the state's device: the number of images whose target changed.
        """
        index, new_targets = index.to(self.device), new_targets.to(self.device)
        valid = index >= 0
        index = torch.where(valid, index, self.n)
        new_targets = torch.where(valid, new_targets, self.n)
        changed = ((self._perm.index_select(0, index) != new_targets) & valid).sum()
        self._perm.scatter_(0, index, new_targets)
        self._inverse.scatter_(0, new_targets, index)
        return changed

    def check(self) -> int:
        """Report the reassignments that failed since the last check, by status, and check that
        ``perm`` is a permutation and ``inverse`` its inverse. Waits for the device (under
        NAT_CUDA_TIMEOUT_S). Returns the number of solver faults (status 3 or 4) since the last check.

        A failed batch kept its targets. Bad input (status 1 or 2: NaN or infinite features)
        raises RuntimeError. Solver faults (3, 4: a bug) warn and let training go on, or raise
        SolverFaultError when NAT_CUDA_FALLBACK=raise.
        """
        wait_for_device(self.device, "the epoch's reassignments")
        counts = self.solver_status.tolist()
        self.solver_status.zero_()

        def report(codes):
            return ", ".join(f"{counts[c]} {STATUS_NAMES[c]} (status {c})" for c in codes if counts[c])
        if counts[1] or counts[2]:
            raise RuntimeError(f"batch reassignments failed: {report((1, 2))}; the features have "
                               "diverged (NaN or infinite)")
        faults = sum(counts[c] for c in SOLVER_FAULTS)
        if faults:
            message = (f"batch reassignments failed in the solver: {report(SOLVER_FAULTS)}. Those "
                       "batches kept their targets. This is a bug in nat_ext: please report it")
            if fallback_mode() == "raise":
                raise SolverFaultError(message + " (NAT_CUDA_FALLBACK=raise stops training)")
            warnings.warn(message + " (NAT_CUDA_FALLBACK=cpu: training goes on)", RuntimeWarning,
                          stacklevel=2)
        n, perm = self.n, self.perm
        counts = torch.bincount(perm, minlength=n)
        if perm.min() < 0 or perm.max() >= n or not bool((counts == 1).all()):
            raise RuntimeError("assignment perm is not a permutation of range(n): "
                               f"{int((counts == 0).sum())} targets unheld")
        if not torch.equal(self.inverse[perm], torch.arange(n, device=perm.device)):
            raise RuntimeError("assignment inverse does not invert perm")
        return faults

    def state_dict(self) -> dict:
        """Tensors only, on the CPU (safe for ``torch.load(weights_only=True)``)."""
        return {"perm": self.perm.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; validates size and the invariant."""
        perm = state["perm"]
        if perm.numel() != self.n:
            raise ValueError(f"state perm has {perm.numel()} entries, expected {self.n}")
        self._set(perm.to(torch.int64).cpu())
        self.check()
