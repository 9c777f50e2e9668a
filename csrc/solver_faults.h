// What the plain ops do when a solver faults (lap::kIterationLimit or lap::kCertificateFailed:
// a bug, or hardware we have not seen; never the input's fault). NAT_CUDA_FALLBACK chooses:
//   cpu (default): the faulted problems are re-solved by the CPU solver; the first fallback of
//     the process warns (naming a file that holds the problem, for a bug report) and every one
//     is counted (fallback_count(), nat_ext.cuda_fallback_count());
//   raise: a RuntimeError naming the batch item, the status and how to fall back.
// The _ex ops report the statuses instead (their callers decide), so none of this runs there.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace nat {

// "solved", "infeasible", "invalid entry", "iteration limit", "certificate failed".
const char* status_name(int64_t status);

// The two environment settings, read at each call and parsed here only (Python reads them through
// the op nat::_solver_settings, so a bad value gives the same ValueError from both):
// NAT_CUDA_FALLBACK: "cpu" (also when unset) or "raise".
std::string fallback_setting();
// NAT_CUDA_TIMEOUT_S: the seconds a wait for a CUDA solve may take before it raises (0 or less, or
// inf: no deadline); a value that is not a number (NaN included) is refused.
constexpr double kDefaultTimeoutSeconds = 300.0;  // longest expected solves take seconds
double timeout_setting();

// status: CPU int64 [B, 2] ({lap::Status, detail} a problem), updated to 0 for the problems
// re-solved; cost: the [B, n, m] matrix the solver read (any device); col4row [B, n] and, when
// they have B rows, the duals u [B, n] and v [B, m] get the CPU solver's answers.
void resolve_solver_faults(const char* op, const at::Tensor& status, const at::Tensor& cost,
                           bool batched, bool maximize, const at::Tensor& col4row,
                           const at::Tensor& u, const at::Tensor& v);

// nat::_certify_or_fall_back from a backend's certify verdict ([B] / [], any device): col4row
// with the problems whose verdict is not 0 handled by resolve_solver_faults.
at::Tensor certify_or_fall_back(const at::Tensor& cost, const at::Tensor& col4row,
                                const at::Tensor& verdict, bool maximize);

// Problems re-solved on the CPU after a solver fault, in this process.
int64_t fallback_count();

// How the fallback warning is given: TORCH_WARN by default (stderr: torch.ops calls do not turn
// C++ warnings into Python ones); the Python module installs a reporter that raises a Python
// UserWarning instead (numpy_lsap.cpp).
using WarningReporter = void (*)(const std::string& message);
void set_warning_reporter(WarningReporter reporter);

// Test hook: forget that the process has warned (the count stays).
void reset_fallback_warning();

}  // namespace nat
