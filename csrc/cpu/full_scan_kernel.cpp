// _full_scan (CPU): one fused pass of nat_ext.assign_full over a tile of targets. The scores of a
// block of rows against a block of targets are multiplied into a buffer that stays in the core's
// cache and ranked there (each row's running top-K, its count above a threshold and its maximum,
// each column's running top-kc rows), so no score is written to memory and read back: the pass
// runs at the multiply's rate instead of memory's (the chunked torch.mm + topk it replaces wrote
// 64 MB of scores per chunk and read them three times).
//
// Ranking value r_ij = s_ij - row_off[i] - col_off[j], with s = feats @ targets^T in their dtype
// (bfloat16 where the caller ranks with a proven error bound). The pairs of `held` (each row's
// sorted candidate columns) are skipped. Entries a call puts on a row's list get their exact
// score, sum_k feats_exact[i][k] * targets_exact[j][k] in double, at the end of the call, so the
// caller never re-reads the targets to score what the pass kept.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace nat {
namespace {

constexpr const char* kOp = "_full_scan";
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// rows multiplied at once: the block's scores (2048 x 2048, 8 MB in bfloat16) stay in the
// last-level cache; 512 rows a block took 0.33-0.41 wall-ns a score on 2 threads against
// 0.26-0.33 (k = 0)
constexpr int64_t kRowBlock = 2048;
constexpr int64_t kColBlock = 2048;
constexpr int64_t kStretch = 256;  // columns tested at once before walking them one by one

// Inserts (val, id) into the list vals[0..len) (stride apart), kept in descending value and, at
// equal values, ascending id (so the lists do not depend on how rows were split across threads),
// dropping the last entry; the caller has checked that val beats it or ties it.
inline void insert_sorted(float* vals, int64_t* idx, double* exact, int64_t len, int64_t stride,
                          float val, int64_t id) {
  const float last = vals[(len - 1) * stride];
  if (val < last || (val == last && idx[(len - 1) * stride] >= 0 && idx[(len - 1) * stride] < id))
    return;
  int64_t q = len - 1;
  while (q > 0 && (vals[(q - 1) * stride] < val ||
                   (vals[(q - 1) * stride] == val && idx[(q - 1) * stride] > id))) {
    vals[q * stride] = vals[(q - 1) * stride];
    idx[q * stride] = idx[(q - 1) * stride];
    if (exact) exact[q * stride] = exact[(q - 1) * stride];
    --q;
  }
  vals[q * stride] = val;
  idx[q * stride] = id;
  if (exact) exact[q * stride] = std::numeric_limits<double>::quiet_NaN();  // scored at the end
}

struct ScanArgs {
  int64_t nr, mt, d, k, kc, row0, col0;
  const float* row_off;   // [nr] or null
  const float* col_off;   // [mt] or null
  const float* row_thr;   // [nr] or null (-inf)
  const int64_t* held_crow;  // [nr + 1] or null
  const int64_t* held_col;   // sorted per row, global columns
  float* row_vals;        // [nr, k]
  int64_t* row_idx;       // [nr, k]
  double* row_exact;      // [nr, k]
  int64_t* row_count;     // [nr]
  float* row_max;         // [nr]
};

// The branch-free loops of the ranking, compiled for AVX-512 and AVX2 beside the baseline (the
// build targets plain x86-64, whose SSE2 left them at a third of the multiply's rate); the loader
// picks the widest the CPU has.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define NAT_WIDE __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NAT_WIDE
#endif

// x[j] = s[j] - ro - co[j] in float (co nullable), s as bfloat16 bits, float or double.
NAT_WIDE void offsets_bf16(const uint16_t* s, const float* co, float ro, float* x, int64_t n) {
  if (co) {
    for (int64_t j = 0; j < n; ++j) {
      x[j] = std::bit_cast<float>(static_cast<uint32_t>(s[j]) << 16) - ro - co[j];
    }
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] = std::bit_cast<float>(static_cast<uint32_t>(s[j]) << 16) - ro;
  }
}
NAT_WIDE void offsets_f32(const float* s, const float* co, float ro, float* x, int64_t n) {
  if (co) {
    for (int64_t j = 0; j < n; ++j) x[j] = s[j] - ro - co[j];
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] = s[j] - ro;
  }
}
NAT_WIDE void offsets_f64(const double* s, const float* co, float ro, float* x, int64_t n) {
  if (co) {
    for (int64_t j = 0; j < n; ++j) x[j] = static_cast<float>(s[j]) - ro - co[j];
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] = static_cast<float>(s[j]) - ro;
  }
}
inline void offsets(const at::BFloat16* s, const float* co, float ro, float* x, int64_t n) {
  offsets_bf16(reinterpret_cast<const uint16_t*>(s), co, ro, x, n);
}
inline void offsets(const float* s, const float* co, float ro, float* x, int64_t n) {
  offsets_f32(s, co, ro, x, n);
}
inline void offsets(const double* s, const float* co, float ro, float* x, int64_t n) {
  offsets_f64(s, co, ro, x, n);
}

// The maximum of x and how many entries exceed thr. Finite-math so that GCC vectorises the
// maximum (a NaN is counted apart, by count_nan: -inf entries, the held pairs, compare as usual).
NAT_WIDE __attribute__((optimize("finite-math-only,no-signed-zeros")))
float max_above(const float* x, int64_t n, float thr, int64_t* above) {
  float best = kNegInf;
  int32_t count = 0;
  for (int64_t j = 0; j < n; ++j) {
    best = x[j] > best ? x[j] : best;
    count += x[j] > thr;
  }
  *above = count;
  return best;
}

NAT_WIDE int64_t count_nan(const float* x, int64_t n) {
  int32_t count = 0;
  for (int64_t j = 0; j < n; ++j) count += x[j] != x[j];
  return count;
}

NAT_WIDE int64_t count_above(const float* x, int64_t n, float cut) {
  int32_t count = 0;
  for (int64_t j = 0; j < n; ++j) count += x[j] > cut;
  return count;
}

// How many x[j] beat last[j] (the columns' current last entries).
NAT_WIDE int64_t count_beating(const float* x, const float* last, int64_t n) {
  int32_t count = 0;
  for (int64_t j = 0; j < n; ++j) count += x[j] > last[j];
  return count;
}

// Ranks one block of scores (rows i0.., columns c0 + [0, cb) of the tile) into the row lists and
// into this thread's column lists (cv/cr: [kc, mt], columns of the tile).
template <typename T>
void rank_block(const ScanArgs& a, const T* s, int64_t i0, int64_t rb, int64_t c0, int64_t cb,
                int64_t* held_pos, float* x, float* cv, int64_t* cr) {
  for (int64_t r = 0; r < rb; ++r) {
    const int64_t i = i0 + r;
    offsets(s + r * cb, a.col_off ? a.col_off + c0 : nullptr, a.row_off ? a.row_off[i] : 0.0f,
            x, cb);
    if (a.held_crow) {  // the row's held columns in this block: out of every ranking
      int64_t& p = held_pos[r];
      const int64_t end = a.held_crow[i + 1], lo = a.col0 + c0, hi = lo + cb;
      while (p < end && a.held_col[p] < lo) ++p;
      for (; p < end && a.held_col[p] < hi; ++p) x[a.held_col[p] - lo] = kNegInf;
    }
    const float thr = a.row_thr ? a.row_thr[i] : kNegInf;
    int64_t above = 0;
    const float bmax = max_above(x, cb, thr, &above);
    // a NaN score (an overflowed product) sticks to the row's maximum: the caller raises on it
    if (count_nan(x, cb)) a.row_max[i] = std::numeric_limits<float>::quiet_NaN();
    else if (bmax > a.row_max[i]) a.row_max[i] = bmax;
    a.row_count[i] += above;
    // the row's list: only values above its threshold and its current last entry
    if (a.k > 0 && above > 0) {
      float* vals = a.row_vals + i * a.k;
      int64_t* idx = a.row_idx + i * a.k;
      double* exact = a.row_exact + i * a.k;
      float cut = std::max(thr, vals[a.k - 1]);
      for (int64_t q0 = 0; q0 < cb && bmax > cut; q0 += kStretch) {
        const int64_t e = std::min(cb, q0 + kStretch);
        if (!count_above(x + q0, e - q0, cut)) continue;  // most stretches, once the list fills
        for (int64_t q = q0; q < e; ++q) {
          if (x[q] > cut) {
            insert_sorted(vals, idx, exact, a.k, 1, x[q], a.col0 + c0 + q);
            cut = std::max(thr, vals[a.k - 1]);
          }
        }
      }
    }
    // the columns' lists: a stretch of kStretch columns is walked only when one beats its last
    // entry (rare after the first rows)
    if (a.kc > 0) {
      const float* last = cv + (a.kc - 1) * a.mt + c0;
      for (int64_t q = 0; q < cb; q += kStretch) {
        const int64_t e = std::min(cb, q + kStretch);
        if (!count_beating(x + q, last + q, e - q)) continue;
        for (int64_t jj = q; jj < e; ++jj) {
          if (x[jj] > last[jj]) {
            insert_sorted(cv + c0 + jj, cr + c0 + jj, nullptr, a.kc, a.mt, x[jj], a.row0 + i);
          }
        }
      }
    }
  }
}

// The exact scores of the entries this call put on rows [i0, i1)'s lists (NaN until now).
template <typename E>
void score_entries(const ScanArgs& a, const E* fe, const E* te, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t q = 0; q < a.k; ++q) {
      double& ex = a.row_exact[i * a.k + q];
      const int64_t j = a.row_idx[i * a.k + q] - a.col0;
      if (!(ex != ex) || j < 0 || j >= a.mt) continue;
      const E* f = fe + i * a.d;
      const E* t = te + j * a.d;
      double acc = 0.0;
      for (int64_t c = 0; c < a.d; ++c) acc += static_cast<double>(f[c]) * static_cast<double>(t[c]);
      ex = acc;
    }
  }
}

template <typename T, typename E>
void scan(const ScanArgs& a, const at::Tensor& feats, const at::Tensor& targets,
          const at::Tensor& fexact, const at::Tensor& texact, float* col_vals, int64_t* col_rows) {
  // One block of scores at a time, multiplied by at::mm on every thread (inside at::parallel_for
  // it ran the generic kernel: 20x slower in bfloat16), then ranked by rows across the threads.
  // The block (kRowBlock x kColBlock) stays in the cache between the two.
  const int64_t threads = at::get_num_threads();
  // each thread ranks into its own copy of the column lists (merged below): no sharing, no locks
  std::vector<std::vector<float>> cvs(threads);
  std::vector<std::vector<int64_t>> crs(threads);
  std::vector<std::vector<float>> xs(threads, std::vector<float>(kColBlock));
  for (int64_t t = 0; t < threads && a.kc > 0; ++t) {
    cvs[t].assign(a.kc * a.mt, kNegInf);
    crs[t].assign(a.kc * a.mt, -1);
  }
  std::vector<int64_t> held_pos(kRowBlock);
  at::Tensor buf =
      at::empty({std::min(kRowBlock, a.nr) * std::min(kColBlock, a.mt)}, feats.options());
  for (int64_t i0 = 0; i0 < a.nr; i0 += kRowBlock) {
    const int64_t rb = std::min(kRowBlock, a.nr - i0);
    for (int64_t r = 0; r < rb; ++r) held_pos[r] = a.held_crow ? a.held_crow[i0 + r] : 0;
    const at::Tensor f = feats.narrow(0, i0, rb);
    for (int64_t c0 = 0; c0 < a.mt; c0 += kColBlock) {
      const int64_t cb = std::min(kColBlock, a.mt - c0);
      at::Tensor s = buf.narrow(0, 0, rb * cb).view({rb, cb});
      at::mm_out(s, f, targets.narrow(0, c0, cb).t());
      const T* sp = s.const_data_ptr<T>();
      at::parallel_for(0, rb, 8, [&](int64_t r0, int64_t r1) {
        const int64_t t = at::get_thread_num();
        rank_block<T>(a, sp + r0 * cb, i0 + r0, r1 - r0, c0, cb, held_pos.data() + r0,
                      xs[t].data(), a.kc ? cvs[t].data() : nullptr,
                      a.kc ? crs[t].data() : nullptr);
      });
    }
    if (a.k > 0) {
      at::parallel_for(i0, i0 + rb, 8, [&](int64_t r0, int64_t r1) {
        score_entries<E>(a, fexact.const_data_ptr<E>(), texact.const_data_ptr<E>(), r0, r1);
      });
    }
  }
  // merge the threads' column lists into the caller's (which may hold earlier rows already)
  for (int64_t t = 0; t < threads && a.kc > 0; ++t) {
    for (int64_t q = 0; q < a.kc; ++q) {
      for (int64_t j = 0; j < a.mt; ++j) {
        const float v = cvs[t][q * a.mt + j];
        if (v >= col_vals[(a.kc - 1) * a.mt + j] && v > kNegInf) {
          insert_sorted(col_vals + j, col_rows + j, nullptr, a.kc, a.mt, v, crs[t][q * a.mt + j]);
        }
      }
    }
  }
}

void check_state(const at::Tensor& t, at::ScalarType type, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == shape, kOp, ": ", name, " should have shape ", shape, ", got ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == type, kOp, ": ", name, " should be ", type, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.is_contiguous(), kOp, ": ", name, " should be contiguous");
}

const float* optional_vector(const std::optional<at::Tensor>& t, int64_t size, const char* name) {
  if (!t.has_value()) return nullptr;
  check_state(*t, at::kFloat, {size}, name);
  return t->const_data_ptr<float>();
}

void full_scan_cpu(const at::Tensor& feats_in, const at::Tensor& targets_in,
                   const std::optional<at::Tensor>& feats_exact_in,
                   const std::optional<at::Tensor>& targets_exact_in,
                   const std::optional<at::Tensor>& row_off,
                   const std::optional<at::Tensor>& col_off,
                   const std::optional<at::Tensor>& row_thr,
                   const std::optional<at::Tensor>& held_crow,
                   const std::optional<at::Tensor>& held_col, int64_t row0, int64_t col0,
                   const at::Tensor& row_vals, const at::Tensor& row_idx,
                   const at::Tensor& row_exact, const at::Tensor& row_count,
                   const at::Tensor& row_max, const at::Tensor& col_vals,
                   const at::Tensor& col_rows) {
  TORCH_CHECK_VALUE(feats_in.dim() == 2 && targets_in.dim() == 2 &&
                        feats_in.size(1) == targets_in.size(1),
                    kOp, ": feats [r, d] and targets [t, d] should be 2-D with the same d, got ",
                    feats_in.sizes(), " and ", targets_in.sizes());
  const auto st = feats_in.scalar_type();
  TORCH_CHECK_TYPE(targets_in.scalar_type() == st &&
                       (st == at::kFloat || st == at::kDouble || st == at::kBFloat16),
                   kOp, ": feats and targets should both be float32, float64 or bfloat16, got ",
                   st, " and ", targets_in.scalar_type());
  const at::Tensor feats = feats_in.contiguous(), targets = targets_in.contiguous();
  const at::Tensor fexact = feats_exact_in.value_or(feats).contiguous();
  const at::Tensor texact = targets_exact_in.value_or(targets).contiguous();
  TORCH_CHECK_VALUE(fexact.sizes() == feats.sizes() && texact.sizes() == targets.sizes() &&
                        fexact.scalar_type() == texact.scalar_type(),
                    kOp, ": feats_exact and targets_exact should match feats and targets");
  ScanArgs a{};
  a.nr = feats.size(0);
  a.mt = targets.size(0);
  a.d = feats.size(1);
  a.k = row_vals.dim() == 2 ? row_vals.size(1) : 0;
  a.kc = col_vals.dim() == 2 ? col_vals.size(0) : 0;
  a.row0 = row0;
  a.col0 = col0;
  check_state(row_vals, at::kFloat, {a.nr, a.k}, "row_vals");
  check_state(row_idx, at::kLong, {a.nr, a.k}, "row_idx");
  check_state(row_exact, at::kDouble, {a.nr, a.k}, "row_exact");
  check_state(row_count, at::kLong, {a.nr}, "row_count");
  check_state(row_max, at::kFloat, {a.nr}, "row_max");
  check_state(col_vals, at::kFloat, {a.kc, a.mt}, "col_vals");
  check_state(col_rows, at::kLong, {a.kc, a.mt}, "col_rows");
  a.row_off = optional_vector(row_off, a.nr, "row_off");
  a.col_off = optional_vector(col_off, a.mt, "col_off");
  a.row_thr = optional_vector(row_thr, a.nr, "row_thr");
  TORCH_CHECK_VALUE(held_crow.has_value() == held_col.has_value(), kOp,
                    ": held_crow and held_col go together");
  if (held_crow.has_value()) {
    check_state(*held_crow, at::kLong, {a.nr + 1}, "held_crow");
    TORCH_CHECK_VALUE(held_col->dim() == 1 && held_col->scalar_type() == at::kLong &&
                          held_col->is_contiguous(),
                      kOp, ": held_col should be a contiguous int64 vector");
    a.held_crow = held_crow->const_data_ptr<int64_t>();
    a.held_col = held_col->const_data_ptr<int64_t>();
  }
  a.row_vals = row_vals.data_ptr<float>();
  a.row_idx = row_idx.data_ptr<int64_t>();
  a.row_exact = row_exact.data_ptr<double>();
  a.row_count = row_count.data_ptr<int64_t>();
  a.row_max = row_max.data_ptr<float>();
  if (a.nr == 0 || a.mt == 0) return;
  float* cv = col_vals.data_ptr<float>();
  int64_t* cr = col_rows.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st, kOp, [&] {
    using T = scalar_t;
    const auto et = fexact.scalar_type();
    if (et == at::kDouble) {
      scan<T, double>(a, feats, targets, fexact, texact, cv, cr);
    } else if (et == at::kFloat) {
      scan<T, float>(a, feats, targets, fexact, texact, cv, cr);
    } else {
      TORCH_CHECK_TYPE(et == at::kBFloat16, kOp, ": feats_exact should be float32 or float64");
      scan<T, at::BFloat16>(a, feats, targets, fexact, texact, cv, cr);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nat, CPU, m) { m.impl("_full_scan", &full_scan_cpu); }

}  // namespace nat
