// The independent optimality check run after every CUDA solve (and exposed as nat::certify): it
// shares no code with the solvers, reads the cost once, and needs only the assignment and the
// column duals v of the problem as posed. In the minimising form (maximising: c and v negated):
//   - col4row[i] is in [0, m) for every row and no column is used twice;
//   - every assigned entry and every v_j is finite;
//   - each row's assigned column attains its minimum reduced cost within tol:
//       min_j (c_ij - v_j) >= c_i,col4row[i] - v_col4row[i] - tol
//     (a NaN entry fails, a forbidden +inf entry never binds);
//   - when n < m, every unassigned column's v is at least every assigned column's v - tol.
// With u_i = the row minimum, (u, v) is then a feasible dual whose complementary slackness holds
// to tol, which proves the assignment optimal to within about n * tol.
// tol = rel * (1 + max finite |c_ij| + max |v_j|), rel by the dtype of the cost the solver read
// (float16 / bfloat16 inputs are widened exactly to float32 first): see certify_rel().
//
// The work is split so that a CPU loop (lanes = 1) and a CUDA warp per row (32 lanes) use the same
// functions: scan_row over a lane's columns, merged across lanes; then judge_row per row, and
// judge_columns per column, each folded into one Verdict per problem.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "lap/status.h"

#if defined(__CUDACC__)
#define NAT_CERT_HD __host__ __device__
#else
#define NAT_CERT_HD
#endif

namespace nat {
namespace lap {
namespace certify {

// The solvers compute in float64 whatever the input, so their answers are exact to float64
// rounding on paths of up to n steps (~1e-13 relative at n = 4096). float64 costs are checked to
// 1e-9 relative, float32 costs to 1e-6: the data's own resolution (about 8 float32 ulps), so a
// check never fails a correct solve while any swap worth a float32 ulp-sized gain is caught.
NAT_CERT_HD inline double certify_rel(bool cost_is_double) { return cost_is_double ? 1e-9 : 1e-6; }

// One lane's part of a row scan: the smallest reduced cost (NaN poisons it to -inf, which fails)
// and the largest finite |c|.
struct RowScan {
  double min_reduced;
  double max_abs_cost;
};

NAT_CERT_HD inline RowScan empty_row_scan() {
  return RowScan{std::numeric_limits<double>::infinity(), 0.0};
}

NAT_CERT_HD inline RowScan merge(const RowScan& a, const RowScan& b) {
  return RowScan{a.min_reduced < b.min_reduced ? a.min_reduced : b.min_reduced,
                 a.max_abs_cost > b.max_abs_cost ? a.max_abs_cost : b.max_abs_cost};
}

template <typename T, bool kMax>
NAT_CERT_HD inline double posed_as_min(T x) {
  const double c = static_cast<double>(x);
  return kMax ? -c : c;
}

// Columns lane, lane + lanes, ... of one row.
template <typename T, bool kMax>
NAT_CERT_HD inline RowScan scan_row(const T* row, const double* v, int64_t m, int64_t lane,
                                    int64_t lanes) {
  const double inf = std::numeric_limits<double>::infinity();
  RowScan s = empty_row_scan();
  for (int64_t j = lane; j < m; j += lanes) {
    const double c = posed_as_min<T, kMax>(row[j]);
    const double reduced = c - (kMax ? -v[j] : v[j]);
    if (reduced != reduced) {
      s.min_reduced = -inf;  // a NaN entry (or dual): no certificate
    } else if (reduced < s.min_reduced) {
      s.min_reduced = reduced;
    }
    if (std::fabs(c) < inf && std::fabs(c) > s.max_abs_cost) s.max_abs_cost = std::fabs(c);
  }
  return s;
}

// Everything a problem's verdict needs, folded over its rows and columns.
struct Verdict {
  bool broken;            // an index out of range, a column used twice, a non-finite entry or v
  double worst_margin;    // min over rows of (row minimum - assigned reduced cost), <= 0
  double max_abs_cost;    // over finite entries
  double max_abs_v;
  double v_assigned_max;  // minimising form: largest v of an assigned column
  double v_free_min;      // ... and smallest v of an unassigned one
};

NAT_CERT_HD inline Verdict empty_verdict() {
  const double inf = std::numeric_limits<double>::infinity();
  return Verdict{false, inf, 0.0, 0.0, -inf, inf};
}

NAT_CERT_HD inline Verdict merge(const Verdict& a, const Verdict& b) {
  return Verdict{a.broken || b.broken,
                 a.worst_margin < b.worst_margin ? a.worst_margin : b.worst_margin,
                 a.max_abs_cost > b.max_abs_cost ? a.max_abs_cost : b.max_abs_cost,
                 a.max_abs_v > b.max_abs_v ? a.max_abs_v : b.max_abs_v,
                 a.v_assigned_max > b.v_assigned_max ? a.v_assigned_max : b.v_assigned_max,
                 a.v_free_min < b.v_free_min ? a.v_free_min : b.v_free_min};
}

// Folds row i into the verdict, given its whole scan and its assigned column j (whose range
// and uniqueness the caller checked: `unique` is false for a repeated or out-of-range column).
template <typename T, bool kMax>
NAT_CERT_HD inline void judge_row(Verdict& verdict, const T* row, const double* v, int64_t m,
                                  int64_t j, bool unique, const RowScan& scan) {
  verdict.max_abs_cost =
      scan.max_abs_cost > verdict.max_abs_cost ? scan.max_abs_cost : verdict.max_abs_cost;
  if (!unique || j < 0 || j >= m) {
    verdict.broken = true;
    return;
  }
  const double own = posed_as_min<T, kMax>(row[j]) - (kMax ? -v[j] : v[j]);
  if (!(std::fabs(own) < std::numeric_limits<double>::infinity())) {
    verdict.broken = true;  // an infinite (forbidden) or NaN assigned entry, or dual
    return;
  }
  // scan.min_reduced is never NaN (a NaN poisons it to -inf) and own is finite here.
  const double margin = scan.min_reduced - own;
  if (margin < verdict.worst_margin) verdict.worst_margin = margin;
}

// Folds column j (assigned or not) into the verdict.
template <bool kMax>
NAT_CERT_HD inline void judge_column(Verdict& verdict, double v_posed, bool assigned) {
  const double inf = std::numeric_limits<double>::infinity();
  if (!(std::fabs(v_posed) < inf)) {
    verdict.broken = true;
    return;
  }
  const double v = kMax ? -v_posed : v_posed;
  if (std::fabs(v) > verdict.max_abs_v) verdict.max_abs_v = std::fabs(v);
  if (assigned) {
    if (v > verdict.v_assigned_max) verdict.v_assigned_max = v;
  } else if (v < verdict.v_free_min) {
    verdict.v_free_min = v;
  }
}

NAT_CERT_HD inline Status conclude(const Verdict& verdict, double rel) {
  if (verdict.broken) return kCertificateFailed;
  const double tol = rel * (1.0 + verdict.max_abs_cost + verdict.max_abs_v);
  if (!(verdict.worst_margin >= -tol)) return kCertificateFailed;
  // With no free column v_free_min is +inf, and with no row v_assigned_max is -inf: both pass.
  if (!(verdict.v_free_min >= verdict.v_assigned_max - tol)) return kCertificateFailed;
  return kSolved;
}

}  // namespace certify
}  // namespace lap
}  // namespace nat
