"""nat_ext: Noise As Targets (Bojanowski & Joulin, ICML 2017) for PyTorch, with exact batched
linear assignment ops on CPU and GPU.

Ops (torch.ops.nat.*): assign, linear_sum_assignment, linear_sum_assignment_with_duals, and
the sync-free assign_ex, linear_sum_assignment_ex.
Python API: assign, linear_sum_assignment (a drop-in for scipy's), solve_with_duals,
check_optimality, assign_ex, linear_sum_assignment_ex.
"""

import importlib.machinery
from pathlib import Path

import torch


def _load_library() -> None:
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        lib = here / f"_C{suffix}"
        if lib.exists():
            torch.ops.load_library(str(lib))
            return
    raise ImportError(
        f"nat_ext's compiled ops (_C) were not found in {here}: install the package with "
        "`pip install .` (or `pip install --no-build-isolation .`) from the repository root"
    )


_load_library()

from . import ops  # noqa: E402  (registers the fake kernels)
from .lsap import check_optimality, linear_sum_assignment  # noqa: E402
from .ops import assign, assign_ex, linear_sum_assignment_ex, solve_with_duals  # noqa: E402
from .full_assign import assign_full  # noqa: E402

__all__ = ["assign", "linear_sum_assignment", "solve_with_duals", "check_optimality", "assign_ex",
           "linear_sum_assignment_ex", "assign_full", "ops"]
