"""What the Python layer does with solver faults, as the plain ops do in C++ (csrc/solver_faults.h).

Statuses (the `info` of the _ex ops, csrc/lap/status.h): 0 solved, 1 infeasible, 2 invalid entry
(bad input); 3 iteration limit and 4 certificate failed are solver faults, a bug to report.
NAT_CUDA_FALLBACK=cpu (default) lets work go on past a fault (the plain ops re-solve on the CPU;
training keeps the batch's targets) with a warning; =raise stops. NAT_CUDA_TIMEOUT_S bounds every
wait for a solve (default 300 s; 0 or less: no deadline).

The names, the fault statuses and the two settings come from the compiled library (ops
nat::_solver_statuses and nat::_solver_settings), which the C++ ops use too: one definition, one
parser, the same ValueError for a bad setting whichever side reads it.
"""
from __future__ import annotations

import time

import torch

__all__ = ["STATUS_NAMES", "SOLVER_FAULTS", "SolverFaultError", "fallback_mode", "wait_for_device"]

# _C is loaded by nat_ext/__init__.py before any of its modules, so the ops are registered here.
_names, _faults = torch.ops.nat._solver_statuses()
STATUS_NAMES = dict(enumerate(_names))
SOLVER_FAULTS = tuple(_faults)


class SolverFaultError(RuntimeError):
    """A solver faulted (status 3 or 4) and NAT_CUDA_FALLBACK=raise."""


def fallback_mode() -> str:
    """NAT_CUDA_FALLBACK: "cpu" (the default) or "raise"; anything else is a ValueError."""
    return torch.ops.nat._solver_settings()[0]


def _timeout_seconds() -> float:
    # NAT_CUDA_TIMEOUT_S (default 300); not a number: ValueError
    return torch.ops.nat._solver_settings()[1]


def wait_for_device(device: torch.device | str, what: str) -> None:
    """Waits for the work queued so far on `device`'s current stream, or raises RuntimeError once
    NAT_CUDA_TIMEOUT_S has passed (a hung kernel: the process should exit). No-op off CUDA.

    Args:
        device: the device whose current stream to wait for.
        what: what is being waited for, for the message.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return
    limit = _timeout_seconds()
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    start = time.monotonic()
    while not done.query():
        waited = time.monotonic() - start
        if 0 < limit < waited:
            raise RuntimeError(
                f"{what}: the GPU did not finish within NAT_CUDA_TIMEOUT_S = {limit:g} s. A kernel "
                "may still be running (a hang is a bug in nat_ext: please report it), so this "
                "process cannot use the GPU reliably any more and should exit. If the work is "
                "only slow, raise NAT_CUDA_TIMEOUT_S.")
        if waited > 2e-3:
            time.sleep(5e-4)
