// Argument checks shared by every backend, so each op validates in one place.
#pragma once

#include <ATen/ATen.h>

namespace nat {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// cost: [n, m] or [B, n, m] floating point with n <= m.
inline void check_cost(const at::Tensor& cost, const char* op) {
  TORCH_CHECK_VALUE(cost.dim() == 2 || cost.dim() == 3, op,
                    ": cost should be a 2-D [n, m] or 3-D [B, n, m] tensor, got ", cost.dim(),
                    "-D with shape ", cost.sizes());
  TORCH_CHECK_TYPE(is_supported_float(cost.scalar_type()), op,
                   ": cost should be float32, float64, float16 or bfloat16, got ",
                   cost.scalar_type());
  const int64_t n = cost.size(-2), m = cost.size(-1);
  TORCH_CHECK_VALUE(n <= m, op, ": cost should have no more rows than columns (n <= m), got n=",
                    n, ", m=", m, "; transpose it, or use nat_ext.linear_sum_assignment");
}

// feats: [n, d] / [B, n, d]; targets: [m, d] / [B, m, d]; same dims, B, d, dtype and device.
inline void check_assign(const at::Tensor& feats, const at::Tensor& targets) {
  TORCH_CHECK_VALUE(feats.dim() == 2 || feats.dim() == 3,
                    "assign: feats should be a 2-D [n, d] or 3-D [B, n, d] tensor, got ",
                    feats.dim(), "-D with shape ", feats.sizes());
  TORCH_CHECK_VALUE(targets.dim() == feats.dim(), "assign: targets should be ", feats.dim(),
                    "-D like feats (", feats.sizes(), "), got ", targets.dim(),
                    "-D with shape ", targets.sizes());
  TORCH_CHECK_TYPE(is_supported_float(feats.scalar_type()),
                   "assign: feats should be float32, float64, float16 or bfloat16, got ",
                   feats.scalar_type());
  TORCH_CHECK_TYPE(targets.scalar_type() == feats.scalar_type(),
                   "assign: targets should have the dtype of feats (", feats.scalar_type(),
                   "), got ", targets.scalar_type());
  TORCH_CHECK_VALUE(feats.device() == targets.device(),
                    "assign: feats and targets should be on the same device, got feats on ",
                    feats.device(), " and targets on ", targets.device());
  TORCH_CHECK_VALUE(feats.size(-1) == targets.size(-1),
                    "assign: feats and targets should have the same feature size d, got ",
                    feats.size(-1), " and ", targets.size(-1));
  if (feats.dim() == 3) {
    TORCH_CHECK_VALUE(feats.size(0) == targets.size(0),
                      "assign: feats and targets should have the same batch size B, got ",
                      feats.size(0), " and ", targets.size(0));
  }
  TORCH_CHECK_VALUE(feats.size(-2) <= targets.size(-2),
                    "assign: feats should have no more rows than targets (n <= m), got n=",
                    feats.size(-2), ", m=", targets.size(-2));
}

}  // namespace nat
