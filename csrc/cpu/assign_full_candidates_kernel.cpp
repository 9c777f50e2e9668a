// CPU kernels internal to nat_ext.assign_full.
// _assign_full_candidates: one pass over a chunk of scores that keeps each row's k largest
// entries and folds the chunk into each column's running kc largest (with their rows); scores
// may be bfloat16 (the candidate pass ranks in bfloat16 where the CPU multiplies it natively).
// torch.topk along both dimensions took three times as long as the matmul (the GPU uses it).
// _assign_full_row_max: the bfloat16 pricing filter's row maxima.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace nat {
namespace {

constexpr const char* kOp = "_assign_full_candidates";
constexpr double kInfD = std::numeric_limits<double>::infinity();
constexpr int64_t kBlock = 32;  // columns tested at once in the column pass

// Inserts (val, idx) into the descending list vals[0..len) (stride apart) when it beats the last
// entry; equal values keep the earlier entry first.
template <typename T>
inline void insert_sorted(T* vals, int64_t* idx, int64_t len, int64_t stride, T val,
                          int64_t id) {
  int64_t q = len - 1;
  while (q > 0 && vals[(q - 1) * stride] < val) {
    vals[q * stride] = vals[(q - 1) * stride];
    idx[q * stride] = idx[(q - 1) * stride];
    --q;
  }
  vals[q * stride] = val;
  idx[q * stride] = id;
}

template <typename T>
void chunk_candidates(const T* s, int64_t rows, int64_t m, int64_t k, int64_t kc,
                      int64_t row_offset, T* row_vals, int64_t* row_idx, T* col_vals,
                      int64_t* col_rows) {
  // Comparisons in float (double for double scores): bfloat16 compared as bfloat16 converts
  // both sides every time, which made the column pass 3x slower than the row pass.
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const T lowest = -std::numeric_limits<T>::infinity();
  // Rows: independent, so split across threads.
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = s + r * m;
      T* vals = row_vals + r * k;
      int64_t* idx = row_idx + r * k;
      for (int64_t q = 0; q < k; ++q) {
        vals[q] = lowest;
        idx[q] = q;  // placeholder; replaced unless the row has fewer than k entries above -inf
      }
      acc_t threshold = static_cast<acc_t>(lowest);
      for (int64_t j = 0; j < m; ++j) {
        if (static_cast<acc_t>(row[j]) > threshold) {
          insert_sorted(vals, idx, k, 1, row[j], j);
          threshold = static_cast<acc_t>(vals[k - 1]);
        }
      }
    }
  });
  if (kc == 0) return;
  // Columns: each thread takes a range of columns and reads the chunk row by row within it,
  // against a float copy of each column's current last (kc-th) value.
  at::parallel_for(0, m, 2048, [&](int64_t j0, int64_t j1) {
    const T* last = col_vals + (kc - 1) * m;
    std::vector<acc_t> threshold(last + j0, last + j1);
    const int64_t len = j1 - j0;
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = s + r * m + j0;
      for (int64_t b = 0; b < len; b += kBlock) {
        const int64_t e = std::min(len, b + kBlock);
        // Inserts are rare past the first rows: test a block at once (a loop of fixed length
        // without branches, which vectorises), and walk it only when something beats its column.
        bool any = false;
        if (e - b == kBlock) {
          for (int64_t j = b; j < b + kBlock; ++j) any |= static_cast<acc_t>(row[j]) > threshold[j];
        } else {
          any = true;
        }
        if (!any) continue;
        for (int64_t j = b; j < e; ++j) {
          if (static_cast<acc_t>(row[j]) > threshold[j]) {
            insert_sorted(col_vals + j0 + j, col_rows + j0 + j, kc, m, row[j], row_offset + r);
            threshold[j] = static_cast<acc_t>(last[j0 + j]);
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> assign_full_candidates_cpu(
    const at::Tensor& scores_in, int64_t k, const at::Tensor& col_vals_in,
    const at::Tensor& col_rows_in, int64_t row_offset) {
  TORCH_CHECK_VALUE(scores_in.dim() == 2, kOp, ": scores should be a 2-D tensor, got ",
                    scores_in.dim(), "-D");
  const auto st = scores_in.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, kOp,
                   ": scores should be float32, float64 or bfloat16, got ", st);
  const int64_t rows = scores_in.size(0), m = scores_in.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= m, kOp, ": k should be in [1, ", m, "], got ", k);
  TORCH_CHECK_VALUE(col_vals_in.dim() == 2 && col_vals_in.size(1) == m, kOp,
                    ": col_vals should have shape [kc, ", m, "], got ", col_vals_in.sizes());
  TORCH_CHECK_TYPE(col_vals_in.scalar_type() == scores_in.scalar_type(), kOp,
                   ": col_vals should have the dtype of scores (", scores_in.scalar_type(),
                   "), got ", col_vals_in.scalar_type());
  TORCH_CHECK_VALUE(col_rows_in.sizes() == col_vals_in.sizes(), kOp,
                    ": col_rows should have the shape of col_vals (", col_vals_in.sizes(),
                    "), got ", col_rows_in.sizes());
  TORCH_CHECK_TYPE(col_rows_in.scalar_type() == at::kLong, kOp,
                   ": col_rows should be Long, got ", col_rows_in.scalar_type());
  const at::Tensor scores = scores_in.contiguous();
  at::Tensor col_vals = col_vals_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor col_rows = col_rows_in.clone(at::MemoryFormat::Contiguous);
  at::Tensor row_vals = at::empty({rows, k}, scores.options());
  at::Tensor row_idx = at::empty({rows, k}, scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, scores.scalar_type(), kOp, [&] {
    chunk_candidates<scalar_t>(scores.const_data_ptr<scalar_t>(), rows, m, k, col_vals.size(0),
                               row_offset, row_vals.data_ptr<scalar_t>(),
                               row_idx.data_ptr<int64_t>(), col_vals.data_ptr<scalar_t>(),
                               col_rows.data_ptr<int64_t>());
  });
  return {row_vals, row_idx, col_vals, col_rows};
}

// max_j (scores[r][j] - v[j]) per row, in double; NaN where a row holds a NaN. The pricing
// filter of assign_full: one pass over a bfloat16 score chunk.
template <typename T>
void row_max_reduced(const T* s, const double* v, int64_t rows, int64_t m, double* out) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = s + r * m;
      double best[4] = {-kInfD, -kInfD, -kInfD, -kInfD};
      bool nan = false;
      int64_t j = 0;
      for (; j + 4 <= m; j += 4) {
        for (int l = 0; l < 4; ++l) {
          const double x = static_cast<double>(row[j + l]) - v[j + l];
          nan |= x != x;
          best[l] = x > best[l] ? x : best[l];
        }
      }
      for (; j < m; ++j) {
        const double x = static_cast<double>(row[j]) - v[j];
        nan |= x != x;
        best[0] = x > best[0] ? x : best[0];
      }
      const double b = std::max(std::max(best[0], best[1]), std::max(best[2], best[3]));
      out[r] = nan ? std::numeric_limits<double>::quiet_NaN() : b;
    }
  });
}

at::Tensor assign_full_row_max_cpu(const at::Tensor& scores_in, const at::Tensor& v_in) {
  constexpr const char* op = "_assign_full_row_max";
  TORCH_CHECK_VALUE(scores_in.dim() == 2, op, ": scores should be a 2-D tensor, got ",
                    scores_in.dim(), "-D");
  const auto st = scores_in.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op,
                   ": scores should be float32, float64 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(v_in.dim() == 1 && v_in.size(0) == scores_in.size(1), op,
                    ": v should have shape [", scores_in.size(1), "], got ", v_in.sizes());
  TORCH_CHECK_TYPE(v_in.scalar_type() == at::kDouble, op, ": v should be Double, got ",
                   v_in.scalar_type());
  const at::Tensor scores = scores_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = at::empty({scores.size(0)}, v.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st, op, [&] {
    row_max_reduced<scalar_t>(scores.const_data_ptr<scalar_t>(), v.const_data_ptr<double>(),
                              scores.size(0), scores.size(1), out.data_ptr<double>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nat, CPU, m) {
  m.impl("_assign_full_candidates", &assign_full_candidates_cpu);
  m.impl("_assign_full_row_max", &assign_full_row_max_cpu);
}

}  // namespace nat
