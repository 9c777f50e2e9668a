// CUDA kernels of nat::linear_sum_assignment, nat::linear_sum_assignment_with_duals and
// nat::linear_sum_assignment_ex (and through them nat::assign). Two solvers, whose algorithms the CPU tests run through
// nat::_linear_sum_assignment_team:
//   - "jv": one thread block per problem runs lap/block_lsap.h;
//   - "auction" (square problems): up to n = kBlockAuctionMaxSize one block a problem runs the
//     auction prepass of lap/auction_lsap.h and its exact repair, the batch in parallel; above,
//     a cooperative kernel on the whole GPU runs the prepass, then one block finishes with exact
//     augmenting paths, the problems of a batch one after another.
// Every solve is followed, on the same stream, by the independent certificate of
// lap/certify.h (cuda/certify_kernel.cu), which marks a problem whose answer does not hold
// lap::kCertificateFailed; the solvers' loops are bounded (lap::kIterationLimit). The plain ops
// then make one host sync, under a deadline (NAT_CUDA_TIMEOUT_S), to read the statuses: bad input
// raises, and solver faults fall back to the CPU or raise (solver_faults.h). The _ex ops return
// the statuses on the device without a sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <tuple>

#include "cuda/checks.h"
#include "cuda/team.cuh"
#include "lap/auction_lsap.h"
#include "lap/block_lsap.h"
#include "ops_common.h"

namespace nat {
namespace {

// The cooperative auction kernel: 2 blocks of 512 threads an SM give one warp per row up to
// n = 32 x (number of SMs) (4224 rows on an H100) while keeping the grid barrier's arrival
// count low (it grows with the number of blocks).
constexpr int kGridBlockThreads = 512;
constexpr int kGridBlocksPerSm = 2;

// A problem's block_lsap state: 4 double arrays of m (prices, distances, and their saved
// values), 2 int64 arrays of m (pred, row4col) and the n free rows.
int64_t state_bytes(int64_t n, int64_t m) { return 8 * (6 * m + n); }

// At most 16 warps a problem: the 128 registers a thread may then have hold the unrolled column
// sweeps (lap/block_lsap.h) without spilling, which they do at 1024 threads (64 registers).
constexpr int kMaxBlockThreads = 512;

// Up to this size (m <= ~2k) the state lives in shared memory: every Dijkstra step reads and
// writes it, and global stores do not stay in L1, so in global memory each step would wait on
// L2 round trips. Larger problems keep it in global memory (workspace from the allocator).
constexpr int64_t kMaxSharedState = 96 * 1024;

template <typename T, bool kMax>
__global__ void __launch_bounds__(kMaxBlockThreads)
    block_lsap_kernel(const T* cost, int64_t n, int64_t m, double* work, int64_t* iwork,
                      int64_t* col4row, double* u, double* v, int64_t* status) {
  __shared__ lap::CudaBlockTeam::Slots slots;
  extern __shared__ __align__(8) unsigned char shared_state[];
  lap::CudaBlockTeam team(&slots);
  const int64_t b = blockIdx.x;
  // work == nullptr: the state is in the dynamic shared memory the launch reserved for it.
  double* w = work ? work + b * 4 * m : reinterpret_cast<double*>(shared_state);
  int64_t* iw = work ? iwork + b * (2 * m + n) : reinterpret_cast<int64_t*>(w + 4 * m);
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

// About eight columns a thread (two unrolled rounds of loads a sweep) by default: a single warp,
// with no block barrier in its arg-min, up to m = 256. NAT_CUDA_COLS_PER_THREAD overrides the
// eight, so that one GPU run can measure the trade-off (benchmarks/jv_threads_sweep.py).
int threads_for(int64_t m) {
  static const int64_t env_cols = [] {
    const char* s = std::getenv("NAT_CUDA_COLS_PER_THREAD");
    return s ? std::max<int64_t>(1, std::atoll(s)) : 0;
  }();
  const int64_t cols = env_cols > 0 ? env_cols : 8;
  const int64_t warps = (m / cols + 31) / 32;
  return static_cast<int>(32 * std::clamp<int64_t>(warps, 1, kMaxBlockThreads / 32));
}

template <typename T, bool kMax>
__global__ void __launch_bounds__(kGridBlockThreads, kGridBlocksPerSm)
    auction_prepass_kernel(const T* cost, int64_t n, lap::AuctionState s, int64_t* status) {
  lap::CudaGrid grid;
  int64_t bad = -1;
  const lap::Status code = lap::auction_prepass<T, kMax>(grid, n, cost, s, &bad);
  if (grid.rank() == 0) {
    status[0] = code;
    status[1] = bad;
  }
}

// The auction and its repair for one problem a block (blockIdx.x), barriers within the block:
// the whole batch at once, and no grid barrier, whose cost is several times a block's.
template <typename T, bool kMax>
__global__ void __launch_bounds__(kMaxBlockThreads)
    auction_block_kernel(const T* cost, int64_t n, double* work, int64_t* iwork, int64_t* col4row,
                         double* u, double* v, int64_t* status) {
  __shared__ lap::CudaBlockTeam::Slots slots;
  lap::CudaBlockTeam team(&slots);
  lap::CudaBlockGrid grid;
  const int64_t b = blockIdx.x;
  double* w = work + b * 5 * n;
  int64_t* iw = iwork + b * (3 * n + lap::kNumCounters);
  const lap::AuctionState a{w, w + n, col4row + b * n, iw, reinterpret_cast<uint64_t*>(iw + 2 * n),
                            reinterpret_cast<uint64_t*>(iw + 3 * n)};
  const lap::BlockState r = lap::repair_state(a, w + 2 * n, w + 3 * n, w + 4 * n, iw + n);
  int64_t bad = -1;
  const lap::Status code = lap::auction_lsap<T, kMax>(grid, team, n, cost + b * n * n, a, r,
                                                      u ? u + b * n : nullptr,
                                                      v ? v + b * n : nullptr, &bad);
  if (threadIdx.x == 0) {
    status[2 * b] = code;
    status[2 * b + 1] = bad;
  }
}

template <typename T, bool kMax>
__global__ void __launch_bounds__(kMaxBlockThreads)
    auction_repair_kernel(const T* cost, int64_t n, lap::BlockState s, double* u, double* v,
                          int64_t* status) {
  if (status[0] != lap::kSolved) return;  // the prepass failed: its status stands
  __shared__ lap::CudaBlockTeam::Slots slots;
  lap::CudaBlockTeam team(&slots);
  const lap::Status code = lap::block_augment<T, kMax>(team, n, n, cost, s);  // barriers first
  if (code == lap::kSolved) lap::block_duals<T, kMax>(team, n, n, cost, s, u, v);
  if (threadIdx.x == 0) status[0] = code;
}

// Auto choice of solver. Provisional, from host step counts (tests/cpp/test_lsap.cpp) until a
// GPU measures the crossover: at n = 4096 the one-block solver takes ~79k dependent steps and
// the auction ~700 rounds (two grid barriers each) plus a few hundred steps; at n = 1024, 8.7k
// steps against ~500 rounds, close enough that the per-round cost decides. Batches of large
// problems run one after another under the auction, so it pays only for few of them.
constexpr int64_t kAuctionMinSize = 2048;
constexpr int64_t kAuctionMaxBatch = 8;
// solver="auction" runs one block a problem up to this size (the batch in parallel), and the
// whole-GPU cooperative kernel above it (problems one after another). Provisional: the
// benchmark times both at 256 and 4096 so one GPU run can place it.
constexpr int64_t kBlockAuctionMaxSize = 1024;

bool use_auction(Solver solver, int64_t B, int64_t n, int64_t m) {
  if (solver != Solver::kAuto) return solver == Solver::kAuction;
  return n == m && n >= kAuctionMinSize && B <= kAuctionMaxBatch;
}

// u: the row duals or nullptr; v: the column duals [B, n] (always: the certificate needs them).
template <typename T, bool kMax>
void launch_auction(const at::Tensor& cost, const at::Tensor& col4row, double* u, double* v,
                    const at::Tensor& status, cudaStream_t stream) {
  const int64_t B = cost.size(0), n = cost.size(1);
  // Prices, row duals, distances, saved prices and distances; row4col, pred, keys, counters.
  at::Tensor work = at::empty({B, 5 * n}, cost.options().dtype(at::kDouble));
  at::Tensor iwork = at::empty({B, 3 * n + lap::kNumCounters}, cost.options().dtype(at::kLong));
  if (n <= kBlockAuctionMaxSize) {
    const int threads = static_cast<int>(std::clamp<int64_t>((n + 31) / 32 * 32, 32, kMaxBlockThreads));
    auction_block_kernel<T, kMax><<<static_cast<unsigned>(B), threads, 0, stream>>>(
        cost.const_data_ptr<T>(), n, work.data_ptr<double>(), iwork.data_ptr<int64_t>(),
        col4row.data_ptr<int64_t>(), u, v, status.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // No more blocks than fit on the GPU at once, which a grid barrier requires.
  auto prepass = auction_prepass_kernel<T, kMax>;
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, prepass,
                                                               kGridBlockThreads, 0));
  TORCH_CHECK(blocks_per_sm > 0, "linear_sum_assignment: the auction kernel does not fit on ",
              "this GPU");
  const int blocks = std::min(blocks_per_sm, kGridBlocksPerSm) *
                     at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (std::getenv("NAT_CUDA_VERBOSE")) {
    std::fprintf(stderr, "nat_ext: cooperative auction n=%lld blocks_per_sm=%d blocks=%d threads=%d\n",
                 static_cast<long long>(n), blocks_per_sm, blocks, kGridBlockThreads);
  }
  for (int64_t b = 0; b < B; ++b) {
    double* w = work.data_ptr<double>() + b * 5 * n;
    int64_t* iw = iwork.data_ptr<int64_t>() + b * (3 * n + lap::kNumCounters);
    lap::AuctionState a{w, w + n, col4row.data_ptr<int64_t>() + b * n, iw,
                              reinterpret_cast<uint64_t*>(iw + 2 * n),
                              reinterpret_cast<uint64_t*>(iw + 3 * n)};
    const lap::BlockState r = lap::repair_state(a, w + 2 * n, w + 3 * n, w + 4 * n, iw + n);
    const T* c = cost.const_data_ptr<T>() + b * n * n;
    int64_t nn = n;
    int64_t* st = status.data_ptr<int64_t>() + 2 * b;
    void* args[] = {&c, &nn, &a, &st};
    C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(prepass), blocks,
                                               kGridBlockThreads, args, 0, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auction_repair_kernel<T, kMax><<<1, threads_for(n), 0, stream>>>(
        c, n, r, u ? u + b * n : nullptr, v ? v + b * n : nullptr, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// info: see finish_solve (nullptr: raise on failure, the one host sync).
std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_cuda(const at::Tensor& cost_in, bool maximize,
                                                          c10::string_view solver_name,
                                                          bool with_duals, const char* op,
                                                          at::Tensor* info = nullptr) {
  check_cost(cost_in, op);
  const Solver solver = parse_solver(solver_name, op);
  check_solver_shape(solver, cost_in.size(-2), cost_in.size(-1), op);
  const c10::cuda::CUDAGuard guard(cost_in.device());
  const auto [cost, batched] = prepare_cost(cost_in);
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  SolveOutputs out(cost, with_duals);
  if (B == 0 || n == 0) {
    out.v.zero_();  // no rows: every column is free, priced 0
    if (info) {
      const at::Tensor solved = at::zeros({B}, out.col4row.options());
      *info = batched ? solved : solved.squeeze(0);
    }
    return out.result(batched, with_duals);
  }
  TORCH_CHECK_VALUE(B <= INT32_MAX, op, ": at most 2^31 - 1 problems a call, got ", B);
  at::Tensor status = at::empty({B, 2}, cost.options().dtype(at::kLong));
  const auto stream = at::cuda::getCurrentCUDAStream();
  // The column duals always (scratch when the caller did not ask): the certificate reads them.
  const at::Tensor v_all = with_duals ? out.v : at::empty({B, m}, cost.options().dtype(at::kDouble));
  double* u = with_duals ? out.u.data_ptr<double>() : nullptr;
  double* v = v_all.data_ptr<double>();
  if (use_auction(solver, B, n, m)) {
    AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "linear_sum_assignment_cuda", [&] {
      (maximize ? launch_auction<scalar_t, true> : launch_auction<scalar_t, false>)(
          cost, out.col4row, u, v, status, stream);
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "linear_sum_assignment_cuda", [&] {
      auto kernel =
          maximize ? block_lsap_kernel<scalar_t, true> : block_lsap_kernel<scalar_t, false>;
      // The state goes to shared memory where it fits (kMaxSharedState, and what this GPU lets
      // a block have beside the reduction slots) and the whole batch still runs in one wave;
      // with more problems than that, more blocks at a time (global state) may do better: to
      // be measured. The attribute is always set to the same cap, so concurrent callers agree.
      const int64_t bytes = state_bytes(n, m);
      const int threads = threads_for(m);
      const auto* props = at::cuda::getCurrentDeviceProperties();
      const int cap = static_cast<int>(std::min<int64_t>(
          kMaxSharedState, props->sharedMemPerBlockOptin - sizeof(lap::CudaBlockTeam::Slots)));
      bool in_shared = bytes <= cap;
      if (in_shared) {
        C10_CUDA_CHECK(
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, cap));
        int per_sm = 0;
        C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads,
                                                                     bytes));
        in_shared = B <= int64_t{per_sm} * props->multiProcessorCount;
      }
      at::Tensor work, iwork;
      if (!in_shared) {
        work = at::empty({B, 4 * m}, cost.options().dtype(at::kDouble));
        iwork = at::empty({B, 2 * m + n}, cost.options().dtype(at::kLong));
      }
      kernel<<<static_cast<unsigned>(B), threads, in_shared ? bytes : 0, stream>>>(
          cost.const_data_ptr<scalar_t>(), n, m, in_shared ? nullptr : work.data_ptr<double>(),
          in_shared ? nullptr : iwork.data_ptr<int64_t>(), out.col4row.data_ptr<int64_t>(), u,
          v, status.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  launch_certify(cost, out.col4row, v_all, maximize, status.data_ptr<int64_t>(), 2, stream);
  if (!info) wait_with_deadline(stream, op);
  finish_solve(op, status, cost, batched, maximize, out, info);
  return out.result(batched, with_duals);
}

at::Tensor linear_sum_assignment_cuda(const at::Tensor& cost, bool maximize,
                                      c10::string_view solver) {
  return std::get<0>(solve_cuda(cost, maximize, solver, false, "linear_sum_assignment"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sum_assignment_with_duals_cuda(
    const at::Tensor& cost, bool maximize, c10::string_view solver) {
  return solve_cuda(cost, maximize, solver, true, "linear_sum_assignment_with_duals");
}

std::tuple<at::Tensor, at::Tensor> linear_sum_assignment_ex_cuda(const at::Tensor& cost,
                                                                 bool maximize,
                                                                 c10::string_view solver,
                                                                 bool check_errors) {
  return solve_ex(check_errors, [&](at::Tensor* info) {
    return std::get<0>(
        solve_cuda(cost, maximize, solver, false, "linear_sum_assignment_ex", info));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nat, CUDA, m) {
  m.impl("linear_sum_assignment", &linear_sum_assignment_cuda);
  m.impl("linear_sum_assignment_with_duals", &linear_sum_assignment_with_duals_cuda);
  m.impl("linear_sum_assignment_ex", &linear_sum_assignment_ex_cuda);
  // assign and assign_ex: the composite kernels of assign.cpp (scores by cuBLAS, then the
  // linear_sum_assignment_ex above, which applies the sign for maximisation on load), so both
  // devices raise the same errors.
}

}  // namespace nat
