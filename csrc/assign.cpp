// nat::assign and nat::assign_ex for every backend: the score matrix feats @ targets^T, then the
// assignment that maximises it through nat::linear_sum_assignment_ex on the same device.
// Registered as CompositeExplicitAutograd so a backend (CUDA) can still override them with a
// fused kernel.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "ops_common.h"

namespace nat {
namespace {

std::tuple<at::Tensor, at::Tensor> assign_ex_composite(const at::Tensor& feats,
                                                       const at::Tensor& targets,
                                                       c10::string_view solver,
                                                       bool check_errors) {
  check_assign(feats, targets, solver);
  const at::Tensor scores = assign_scores(feats, targets);
  if (check_errors) {
    // One host sync (the plain op makes one anyway), so bad input is named in assign's terms.
    if (!at::isfinite(scores).all().item<bool>()) {
      for (const auto& [name, t] : {std::pair{"feats", feats}, std::pair{"targets", targets}}) {
        TORCH_CHECK_VALUE(at::isfinite(t).all().item<bool>(), "assign: ", name,
                          " contains NaN or infinite values");
      }
      TORCH_CHECK_VALUE(false, "assign: feats @ targets^T overflowed to infinity in ",
                        scores.scalar_type(), "; normalise the inputs");
    }
    // The plain op: a solver fault falls back or raises (solver_faults.h), never passes as -1s.
    static const auto lsa =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("nat::linear_sum_assignment", "")
            .typed<at::Tensor(const at::Tensor&, bool, c10::string_view)>();
    const at::Tensor cols = lsa.call(scores, /*maximize=*/true, solver);
    return {cols, at::zeros(cols.sizes().slice(0, cols.dim() - 1), cols.options())};
  }
  // The caller asked for the statuses, not an error.
  static const auto lsa_ex =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nat::linear_sum_assignment_ex", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, bool, c10::string_view,
                                                    bool)>();
  return lsa_ex.call(scores, /*maximize=*/true, solver, /*check_errors=*/false);
}

at::Tensor assign_composite(const at::Tensor& feats, const at::Tensor& targets,
                            c10::string_view solver) {
  return std::get<0>(assign_ex_composite(feats, targets, solver, /*check_errors=*/true));
}

}  // namespace

TORCH_LIBRARY_IMPL(nat, CompositeExplicitAutograd, m) {
  m.impl("assign", &assign_composite);
  m.impl("assign_ex", &assign_ex_composite);
}

}  // namespace nat
