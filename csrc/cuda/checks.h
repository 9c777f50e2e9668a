// The CUDA ops' two safety nets, defined in cuda/certify_kernel.cu: the on-device certificate
// (lap/certify.h) that follows every solve, and the deadline on the host's wait for a solve.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace nat {

// Checks, on `stream`, each problem b of cost [B, n, m] (float32/float64, contiguous) whose
// status[b * stride] is 0, with col4row [B, n] int64 and v [B, m] float64 (the problem as posed,
// contiguous); writes lap::kCertificateFailed there when the certificate does not hold.
void launch_certify(const at::Tensor& cost, const at::Tensor& col4row, const at::Tensor& v,
                    bool maximize, int64_t* status, int64_t stride, cudaStream_t stream);

// Waits for the work queued on `stream` so far, or raises a RuntimeError (naming `op`) once
// NAT_CUDA_TIMEOUT_S seconds have passed (solver_faults.h: timeout_setting): a hung kernel is
// the one fault no check after the solve can see.
void wait_with_deadline(cudaStream_t stream, const char* op);

}  // namespace nat
