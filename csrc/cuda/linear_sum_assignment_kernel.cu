// CUDA kernels of nat::linear_sum_assignment, nat::linear_sum_assignment_with_duals and
// nat::assign: one thread block per problem runs lap/block_lsap.h (the algorithm the CPU tests
// run through nat::_linear_sum_assignment_team). One host sync per call: reading the
// per-problem status, so that NaN, -inf and infeasible inputs raise instead of returning junk.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/team.cuh"
#include "lap/block_lsap.h"
#include "ops_common.h"

namespace nat {
namespace {

template <typename T, bool kMax>
__global__ void __launch_bounds__(1024)
    block_lsap_kernel(const T* cost, int64_t n, int64_t m, double* work, int64_t* iwork,
                      int64_t* col4row, double* u, double* v, int64_t* status) {
  __shared__ lap::CudaBlockTeam::Slots slots;
  lap::CudaBlockTeam team(&slots);
  const int64_t b = blockIdx.x;
  double* w = work + b * 4 * m;
  int64_t* iw = iwork + b * (2 * m + n);
  const lap::BlockState s{w, w + m, w + 2 * m, w + 3 * m, iw, iw + m, col4row + b * n, iw + 2 * m};
  int64_t bad = -1;
  const lap::Status code = lap::block_lsap<T, kMax>(team, n, m, cost + b * n * m, s,
                                                u ? u + b * n : nullptr, v ? v + b * m : nullptr,
                                                &bad);
  if (threadIdx.x == 0) {
    status[2 * b] = code;
    status[2 * b + 1] = bad;
  }
}

// About eight columns a thread: enough parallel loads per sweep without making the arg-min
// reduction wider than it needs to be (a single warp up to m = 256).
int threads_for(int64_t m) {
  const int64_t warps = (m / 8 + 31) / 32;
  return static_cast<int>(32 * std::min<int64_t>(std::max<int64_t>(warps, 1), 32));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_cuda(const at::Tensor& cost_in, bool maximize,
                                                          bool with_duals, const char* op) {
  check_cost(cost_in, op);
  const c10::cuda::CUDAGuard guard(cost_in.device());
  const auto [cost, batched] = prepare_cost(cost_in);
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  SolveOutputs out(cost, with_duals);
  if (B == 0) return out.result(batched, with_duals);
  TORCH_CHECK_VALUE(B <= INT32_MAX, op, ": at most 2^31 - 1 problems a call, got ", B);
  // Workspace from the caching allocator: prices, distances, saved prices and distances; pred,
  // row4col and the free-row list.
  at::Tensor work = at::empty({B, 4 * m}, cost.options().dtype(at::kDouble));
  at::Tensor iwork = at::empty({B, 2 * m + n}, cost.options().dtype(at::kLong));
  at::Tensor status = at::empty({B, 2}, cost.options().dtype(at::kLong));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "linear_sum_assignment_cuda", [&] {
    auto kernel = maximize ? block_lsap_kernel<scalar_t, true> : block_lsap_kernel<scalar_t, false>;
    kernel<<<static_cast<unsigned>(B), threads_for(m), 0, stream>>>(
        cost.const_data_ptr<scalar_t>(), n, m, work.data_ptr<double>(), iwork.data_ptr<int64_t>(),
        out.col4row.data_ptr<int64_t>(), with_duals ? out.u.data_ptr<double>() : nullptr,
        with_duals ? out.v.data_ptr<double>() : nullptr, status.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  raise_on_failure(op, status.cpu(), cost, batched, maximize);
  return out.result(batched, with_duals);
}

at::Tensor linear_sum_assignment_cuda(const at::Tensor& cost, bool maximize) {
  return std::get<0>(solve_cuda(cost, maximize, false, "linear_sum_assignment"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sum_assignment_with_duals_cuda(
    const at::Tensor& cost, bool maximize) {
  return solve_cuda(cost, maximize, true, "linear_sum_assignment_with_duals");
}

// Scores by cuBLAS (through ATen), read by the solver as they are: it applies the sign for
// maximisation on load, so no conversion pass is needed between the two.
at::Tensor assign_cuda(const at::Tensor& feats, const at::Tensor& targets) {
  check_assign(feats, targets);
  const c10::cuda::CUDAGuard guard(feats.device());
  return std::get<0>(solve_cuda(assign_scores(feats, targets), true, false, "assign"));
}

}  // namespace

TORCH_LIBRARY_IMPL(nat, CUDA, m) {
  m.impl("linear_sum_assignment", &linear_sum_assignment_cuda);
  m.impl("linear_sum_assignment_with_duals", &linear_sum_assignment_with_duals_cuda);
  m.impl("assign", &assign_cuda);
}

}  // namespace nat
