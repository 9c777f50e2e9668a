// The plain ops' handling of solver faults (solver_faults.h).
#include "solver_faults.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/library.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <tuple>
#include <vector>

#include "lap/status.h"

namespace nat {
namespace {

std::atomic<int64_t> fallbacks{0};
std::atomic<bool> warned{false};
std::atomic<WarningReporter> reporter{nullptr};

std::string item_name(bool batched, int64_t b) {
  return batched ? "batch item " + std::to_string(b) : std::string("the problem");
}

// Saves the problem for a bug report: torch.load(path) gives (op, cost, maximize, status), cost
// on the CPU as the solver read it. Returns the file's path (NAT_FAULT_DIR, or the temp folder).
std::string save_problem(const char* op, const at::Tensor& cost, bool maximize, int64_t status) {
  // A tuple, not a dict: torch.load(weights_only=True) takes it without a type tag.
  const c10::IValue problem =
      c10::ivalue::Tuple::create({c10::IValue(std::string(op)), c10::IValue(cost),
                                  c10::IValue(maximize), c10::IValue(status)});
  const char* dir = std::getenv("NAT_FAULT_DIR");
  const std::filesystem::path folder = dir ? std::filesystem::path(dir)
                                           : std::filesystem::temp_directory_path();
  const std::string path =
      (folder / ("nat_ext_fault_" + std::to_string(getpid()) + "_" +
                 std::to_string(fallbacks.load()) + ".pt"))
          .string();
  const std::vector<char> bytes = torch::jit::pickle_save(problem);
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

}  // namespace

std::string fallback_setting() {
  const char* s = std::getenv("NAT_CUDA_FALLBACK");
  const std::string mode = s ? s : "cpu";
  TORCH_CHECK_VALUE(mode == "cpu" || mode == "raise",
                    "NAT_CUDA_FALLBACK should be 'cpu' or 'raise', got '", mode, "'");
  return mode;
}

double timeout_setting() {
  const char* s = std::getenv("NAT_CUDA_TIMEOUT_S");
  if (!s) return kDefaultTimeoutSeconds;
  char* end = nullptr;
  const double t = std::strtod(s, &end);
  TORCH_CHECK_VALUE(end != s && *end == '\0' && !std::isnan(t),
                    "NAT_CUDA_TIMEOUT_S should be a number of seconds, got '", s, "'");
  return t;
}

const char* status_name(int64_t status) {
  switch (status) {
    case lap::kSolved: return "solved";
    case lap::kInfeasible: return "infeasible";
    case lap::kInvalidEntry: return "invalid entry";
    case lap::kIterationLimit: return "iteration limit";
    case lap::kCertificateFailed: return "certificate failed";
    default: return "unknown status";
  }
}

void resolve_solver_faults(const char* op, const at::Tensor& status, const at::Tensor& cost,
                           bool batched, bool maximize, const at::Tensor& col4row,
                           const at::Tensor& u, const at::Tensor& v) {
  int64_t* st = status.data_ptr<int64_t>();
  const int64_t B = status.size(0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t code = st[2 * b];
    if (!lap::is_solver_fault(code)) continue;
    const std::string what = c10::str(op, ": the ", cost.device().type(), " solver failed on ",
                                      item_name(batched, b), " (status ", code, ", ",
                                      status_name(code), "); this is a bug in nat_ext, not in "
                                      "your input");
    TORCH_CHECK(fallback_setting() == "cpu", what,
                ". Set NAT_CUDA_FALLBACK=cpu to re-solve such problems on the CPU, and please "
                "report it");
    const at::Tensor problem = cost[b].cpu();
    static const auto solve =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("nat::linear_sum_assignment_with_duals", "")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, bool,
                                                                  c10::string_view)>();
    const auto [x, ub, vb] = solve.call(problem, maximize, "jv");
    col4row[b].copy_(x);
    if (u.size(0) == B) u[b].copy_(ub);
    if (v.size(0) == B) v[b].copy_(vb);
    st[2 * b] = lap::kSolved;
    const bool first = !warned.exchange(true);
    const std::string saved = first ? save_problem(op, problem, maximize, code) : std::string();
    fallbacks.fetch_add(1);
    if (first) {
      const std::string message = c10::str(
          what, "; re-solved on the CPU (NAT_CUDA_FALLBACK=cpu). Please report it with the "
          "problem, saved to ", saved, " (torch.load gives (op, cost, maximize, status)). Later fallbacks do not warn: "
          "nat_ext.cuda_fallback_count() counts them.");
      if (const WarningReporter report = reporter.load()) {
        report(message);
      } else {
        TORCH_WARN(message);
      }
    }
  }
}

at::Tensor certify_or_fall_back(const at::Tensor& cost, const at::Tensor& col4row,
                                const at::Tensor& verdict, bool maximize) {
  const bool batched = cost.dim() == 3;
  const at::Tensor cost3d = batched ? cost : cost.unsqueeze(0);
  const int64_t B = cost3d.size(0);
  at::Tensor status = at::zeros({B, 2}, verdict.options().device(at::kCPU));
  status.select(1, 0).copy_(verdict.reshape({B}));
  const at::Tensor fixed = col4row.reshape({B, cost3d.size(1)}).clone();
  const at::Tensor none = at::empty({0}, cost.options().dtype(at::kDouble));
  resolve_solver_faults("_certify_or_fall_back", status, cost3d, batched, maximize, fixed, none,
                        none);
  return batched ? fixed : fixed.squeeze(0);
}

namespace {

// nat::_solver_settings and nat::_solver_statuses (nat.cpp): what Python's nat_ext.faults reads.
std::tuple<std::string, double> solver_settings() { return {fallback_setting(), timeout_setting()}; }

std::tuple<std::vector<std::string>, std::vector<int64_t>> solver_statuses() {
  std::vector<std::string> names;
  std::vector<int64_t> faults;
  for (int64_t s = 0; s < lap::kNumStatuses; ++s) {
    names.emplace_back(status_name(s));
    if (lap::is_solver_fault(s)) faults.push_back(s);
  }
  return {names, faults};
}

}  // namespace

// No tensor argument, so no backend to dispatch on: CompositeExplicitAutograd serves every call.
TORCH_LIBRARY_IMPL(nat, CompositeExplicitAutograd, m) {
  m.impl("_solver_settings", &solver_settings);
  m.impl("_solver_statuses", &solver_statuses);
}

int64_t fallback_count() { return fallbacks.load(); }

void set_warning_reporter(WarningReporter report) { reporter.store(report); }

void reset_fallback_warning() { warned.store(false); }

}  // namespace nat
