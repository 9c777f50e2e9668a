"""nat_ext: Noise As Targets (Bojanowski & Joulin, ICML 2017) for PyTorch, with exact batched
linear assignment ops on CPU and GPU.

Ops (torch.ops.nat.*): assign, linear_sum_assignment, linear_sum_assignment_with_duals,
certify, and the sync-free assign_ex, linear_sum_assignment_ex.
Python API: assign, linear_sum_assignment (a drop-in for scipy's), solve_with_duals,
check_optimality, certify (the check after every CUDA solve), cuda_fallback_count, assign_ex,
linear_sum_assignment_ex; patch_scipy / unpatch_scipy /
scipy_patched route scipy.optimize.linear_sum_assignment to ours (see docs/porting.md);
assign_full, the exact assignment over a whole dataset without the n x m scores.
"""

from pathlib import Path

import torch  # noqa: F401  (first: _C links against libtorch)

try:
    # Importing _C loads the op library, which registers torch.ops.nat.*, and gives the numpy
    # entry point of the scipy drop-in.
    from . import _C  # noqa: F401
except ImportError as e:
    raise ImportError(
        f"nat_ext's compiled ops (_C) could not be imported from {Path(__file__).parent} ({e}): "
        "install the package with `pip install .` (or `pip install --no-build-isolation .`) "
        "from the repository root"
    ) from e

from . import ops  # noqa: E402  (registers the fake kernels)
from .lsap import check_optimality, linear_sum_assignment  # noqa: E402
from .ops import (assign, assign_ex, certify, cuda_fallback_count,  # noqa: E402
                  linear_sum_assignment_ex, solve_with_duals)
from .scipy_patch import patch_scipy, scipy_is_patched, scipy_patched, unpatch_scipy  # noqa: E402
from .full_assign import SolveInterrupted, assign_full, assign_sharded  # noqa: E402

__all__ = ["assign", "linear_sum_assignment", "solve_with_duals", "check_optimality", "assign_ex",
           "linear_sum_assignment_ex", "certify", "cuda_fallback_count", "patch_scipy",
           "unpatch_scipy", "scipy_is_patched",
           "scipy_patched", "assign_full", "assign_sharded", "SolveInterrupted", "ops"]
