// CUDA kernels of the certificate (lap/certify.h): launch_certify, run by the solvers after
// every solve, and the op nat::certify; and the deadline on the host's wait (cuda/checks.h). Two kernels on the same stream, so the verdict needs no
// grid barrier:
//   1. rows: blocks of kRowsPerBlock rows (a warp a row, lanes over columns, so the cost is read
//      once, coalesced, by enough blocks to fill the GPU even for one large problem); each block
//      marks its rows' columns used (an atomic per row, a repeat fails) and writes a partial
//      Verdict;
//   2. columns: a block per problem folds the partial Verdicts and the duals of every column and
//      writes the status.
// It shares no code with the solvers (cuda/team.cuh, lap/*_lsap.h) on purpose.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <chrono>
#include <thread>

#include "cuda/checks.h"
#include "lap/certify.h"
#include "ops_common.h"
#include "solver_faults.h"

namespace nat {
namespace {

namespace cert = lap::certify;

constexpr int kCertifyThreads = 256;
constexpr int kCertifyWarps = kCertifyThreads / 32;
// One row a warp: a single 4096 x 4096 problem then spreads over 512 blocks (about 4 an SM on
// an H100/H200, 32 warps an SM), enough loads in flight to approach the memory bandwidth.
constexpr int64_t kRowsPerBlock = kCertifyWarps;

__device__ cert::RowScan shuffle_merge(cert::RowScan s) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const cert::RowScan other{__shfl_xor_sync(0xffffffffu, s.min_reduced, offset),
                              __shfl_xor_sync(0xffffffffu, s.max_abs_cost, offset)};
    s = cert::merge(s, other);
  }
  return s;
}

__device__ cert::Verdict shuffle_merge(cert::Verdict x) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const cert::Verdict other{
        __shfl_xor_sync(0xffffffffu, static_cast<int>(x.broken), offset) != 0,
        __shfl_xor_sync(0xffffffffu, x.worst_margin, offset),
        __shfl_xor_sync(0xffffffffu, x.max_abs_cost, offset),
        __shfl_xor_sync(0xffffffffu, x.max_abs_v, offset),
        __shfl_xor_sync(0xffffffffu, x.v_assigned_max, offset),
        __shfl_xor_sync(0xffffffffu, x.v_free_min, offset)};
    x = cert::merge(x, other);
  }
  return x;
}

// The block's Verdict, folded over its warps, in thread 0 (others get junk).
__device__ cert::Verdict block_merge(cert::Verdict x) {
  __shared__ cert::Verdict slots[kCertifyWarps];
  x = shuffle_merge(x);
  if ((threadIdx.x & 31) == 0) slots[threadIdx.x >> 5] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kCertifyWarps; ++w) x = cert::merge(x, slots[w]);
  }
  return x;
}

template <typename T, bool kMax>
__global__ void __launch_bounds__(kCertifyThreads)
    certify_rows_kernel(const T* cost, int64_t n, int64_t m, int64_t chunks, const int64_t* col4row,
                        const double* v, int* used, cert::Verdict* partial,
                        const int64_t* status, int64_t stride) {
  const int64_t b = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  if (status[b * stride] != lap::kSolved) return;  // the same for the whole block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const double* vb = v + b * m;
  int* ub = used + b * m;
  cert::Verdict verdict = cert::empty_verdict();
  const int64_t end = min(n, (chunk + 1) * kRowsPerBlock);
  for (int64_t i = chunk * kRowsPerBlock + warp; i < end; i += kCertifyWarps) {
    const T* row = cost + (b * n + i) * m;
    const cert::RowScan scan = shuffle_merge(cert::scan_row<T, kMax>(row, vb, m, lane, 32));
    if (lane == 0) {
      const int64_t j = col4row[b * n + i];
      const bool unique = j >= 0 && j < m && atomicAdd(&ub[j], 1) == 0;
      cert::judge_row<T, kMax>(verdict, row, vb, m, j, unique, scan);
    }
  }
  verdict = block_merge(verdict);
  if (threadIdx.x == 0) partial[blockIdx.x] = verdict;
}

template <bool kMax>
__global__ void __launch_bounds__(kCertifyThreads)
    certify_columns_kernel(int64_t m, int64_t chunks, const double* v, const int* used,
                           const cert::Verdict* partial, double rel, int64_t* status,
                           int64_t stride) {
  const int64_t b = blockIdx.x;
  if (status[b * stride] != lap::kSolved) return;
  cert::Verdict verdict = cert::empty_verdict();
  for (int64_t k = threadIdx.x; k < chunks; k += blockDim.x) {
    verdict = cert::merge(verdict, partial[b * chunks + k]);
  }
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    cert::judge_column<kMax>(verdict, v[b * m + j], used[b * m + j] != 0);
  }
  verdict = block_merge(verdict);
  if (threadIdx.x == 0 && cert::conclude(verdict, rel) != lap::kSolved) {
    status[b * stride] = lap::kCertificateFailed;
  }
}

}  // namespace

void launch_certify(const at::Tensor& cost, const at::Tensor& col4row, const at::Tensor& v,
                    bool maximize, int64_t* status, int64_t stride, cudaStream_t stream) {
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  if (B == 0) return;
  const int64_t chunks = std::max<int64_t>(1, (n + kRowsPerBlock - 1) / kRowsPerBlock);
  TORCH_CHECK_VALUE(B * chunks <= INT32_MAX, "certify: at most 2^31 - 1 blocks of ",
                    kRowsPerBlock, " rows a call, got ", B * chunks);
  const at::Tensor used = at::zeros({B, m}, cost.options().dtype(at::kInt));
  const at::Tensor partial = at::empty(
      {B * chunks * static_cast<int64_t>(sizeof(cert::Verdict))}, cost.options().dtype(at::kByte));
  auto* partial_ptr = reinterpret_cast<cert::Verdict*>(partial.data_ptr<uint8_t>());
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "certify_cuda", [&] {
    const double rel = cert::certify_rel(cost.scalar_type() == at::kDouble);
    auto rows = maximize ? certify_rows_kernel<scalar_t, true> : certify_rows_kernel<scalar_t, false>;
    rows<<<static_cast<unsigned>(B * chunks), kCertifyThreads, 0, stream>>>(
        cost.const_data_ptr<scalar_t>(), n, m, chunks, col4row.const_data_ptr<int64_t>(),
        v.const_data_ptr<double>(), used.data_ptr<int>(), partial_ptr, status, stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto columns = maximize ? certify_columns_kernel<true> : certify_columns_kernel<false>;
    columns<<<static_cast<unsigned>(B), kCertifyThreads, 0, stream>>>(
        m, chunks, v.const_data_ptr<double>(), used.data_ptr<int>(), partial_ptr, rel, status,
        stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Spins on an event for the first milliseconds (what a solve usually takes, so the common path
// pays nothing), then polls it.
void wait_with_deadline(cudaStream_t stream, const char* op) {
  using Clock = std::chrono::steady_clock;
  const double limit = timeout_setting();  // first: a bad value raises before the event exists
  cudaEvent_t done;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(done, stream));
  const auto start = Clock::now();
  for (;;) {
    const cudaError_t state = cudaEventQuery(done);
    if (state == cudaSuccess) break;
    if (state == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: clear it, as torch.cuda.Event.query does
    } else {
      cudaEventDestroy(done);
      C10_CUDA_CHECK(state);
    }
    const double waited = std::chrono::duration<double>(Clock::now() - start).count();
    if (limit > 0 && waited > limit) {
      cudaEventDestroy(done);  // released once the event completes, if ever
      TORCH_CHECK(false, op, ": the CUDA solver did not finish within NAT_CUDA_TIMEOUT_S = ", limit,
                  " s. Its kernel may still be running (a hang is a bug in nat_ext: please report "
                  "it), so this process cannot use the GPU reliably any more and should exit. If "
                  "the problem is only large, raise NAT_CUDA_TIMEOUT_S.");
    }
    if (waited > 2e-3) std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  C10_CUDA_CHECK(cudaEventDestroy(done));
}

namespace {

at::Tensor certify_cuda(const at::Tensor& cost_in, const at::Tensor& col4row_in,
                        const at::Tensor& v_in, bool maximize) {
  check_certify(cost_in, col4row_in, v_in);
  const c10::cuda::CUDAGuard guard(cost_in.device());
  const auto [cost, batched] = prepare_cost(cost_in);
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  const at::Tensor col4row = col4row_in.reshape({B, n}).contiguous();
  const at::Tensor v = v_in.to(at::kDouble).reshape({B, m}).contiguous();
  at::Tensor status = at::zeros({B}, cost.options().dtype(at::kLong));
  launch_certify(cost, col4row, v, maximize, status.data_ptr<int64_t>(), 1,
                 at::cuda::getCurrentCUDAStream());
  return batched ? status : status.squeeze(0);
}

// The verdict is read after the same deadline as a solve's status.
at::Tensor certify_or_fall_back_cuda(const at::Tensor& cost, const at::Tensor& col4row,
                                     const at::Tensor& v, bool maximize) {
  const at::Tensor verdict = certify_cuda(cost, col4row, v, maximize);
  wait_with_deadline(at::cuda::getCurrentCUDAStream(), "_certify_or_fall_back");
  return certify_or_fall_back(cost, col4row, verdict, maximize);
}

}  // namespace

TORCH_LIBRARY_IMPL(nat, CUDA, m) {
  m.impl("certify", &certify_cuda);
  m.impl("_certify_or_fall_back", &certify_or_fall_back_cuda);
}

}  // namespace nat
