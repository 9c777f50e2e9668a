// Exact rectangular linear sum assignment on the host: n rows <= m columns,
// minimise sum_i c[i][col4row[i]] (or maximise, by negating every entry as it is read).
//
// Jonker-Volgenant (1987) family, as in scipy's rectangular_lsap.cpp and the lap packages:
//   1. square problems: column reduction and reduction transfer;
//   2. augmenting row reduction (an auction with zero epsilon), two bounded passes;
//   3. Dijkstra shortest augmenting paths for the rows still free.
// All dual arithmetic is in double whatever T is, so float32 inputs lose nothing.
//
// The output carries an optimality certificate: u[i] + v[j] <= c[i][j] for all finite entries,
// equality on assigned pairs, v[j] == 0 on unassigned columns and v[j] <= 0 elsewhere (the
// rectangular case; see nat_ext.check_optimality).
//
// Ties: the answer is a function of the cost matrix alone. Among the optimal assignments, col4row
// is the lexicographically smallest (row 0's column as small as it can be, then row 1's, ...): a
// last pass (canonicalize) moves each row, in order, to its smallest column that an optimal
// assignment keeping the earlier rows can give it. Optimal here means every pair tight for the
// solver's duals in double arithmetic, which is exact for integer costs (below 2^53); a constant
// matrix gives the identity, as scipy does.
//
// Plain C++ on pointers and sizes: no torch, so the CPU kernel, a C++ test and the CUDA
// host-side core can share it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "lap/status.h"

namespace nat {
namespace lap {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Scratch memory; one per thread, reused across the problems it solves.
struct Workspace {
  std::vector<double> v, d, scanned_v, scanned_d;
  std::vector<int64_t> row4col, pred, free_rows, scanned, colmin_row, free_cols;
  std::vector<char> unique;
  std::vector<int64_t> seen, parent, via_col, stack, stack_pos, adj_start, adj;  // canonicalize
  int64_t nfree_cols = 0;

  void resize(int64_t n, int64_t m) {
    v.assign(m, 0.0);
    d.resize(m);
    scanned_v.resize(m);
    scanned_d.resize(m);
    row4col.assign(m, -1);
    pred.resize(m);
    free_rows.resize(n);
    scanned.resize(m);
    colmin_row.resize(m);
    free_cols.resize(m);
    unique.resize(n);
  }
};

// Returns the flat index of the first entry that the solver cannot take (NaN, or -inf once the
// sign for maximisation is applied), or -1 when every entry is valid.
template <typename T>
int64_t find_invalid_entry(const T* cost, int64_t count, bool maximize) {
  // Valid means c > -inf (c < +inf when maximising): false for NaN too. A branch-free pass in
  // blocks (which the compiler vectorises), then the index searched only in a bad block.
  constexpr int64_t kBlock = 256;
  const T lim = static_cast<T>(maximize ? kInf : -kInf);
  for (int64_t b = 0; b < count; b += kBlock) {
    const int64_t e = b + kBlock < count ? b + kBlock : count;
    bool bad = false;
    for (int64_t k = b; k < e; ++k) bad |= maximize ? !(cost[k] < lim) : !(cost[k] > lim);
    if (!bad) continue;
    for (int64_t k = b; k < e; ++k) {
      if (maximize ? !(cost[k] < lim) : !(cost[k] > lim)) return k;
    }
  }
  return -1;
}

namespace detail {

// Augmenting row reduction is an auction with zero epsilon: cheap per step but prone to long
// price wars. Past this many steps per row processed, the rows left are deferred to the exact
// Dijkstra phase (measured on uniform costs, n = 256..4096: 2..16 all within noise of each other,
// unbounded was 4x slower at n = 4096).
constexpr int64_t kArrStepsPerRow = 8;

// Row i of the cost matrix with the sign for maximisation applied on read.
template <typename T, bool kMaximize>
struct Rows {
  const T* data;
  int64_t m;
  const T* row(int64_t i) const { return data + i * m; }
  static double at(const T* row, int64_t j) {
    const double c = static_cast<double>(row[j]);
    return kMaximize ? -c : c;
  }
};

// Column reduction and reduction transfer (square problems only: they leave v != 0 on columns
// that may stay unassigned, which a rectangular certificate does not allow).
// Returns the number of free rows written to free_rows, or -1 if a column has no finite entry.
template <typename T, bool kMax>
int64_t column_reduction(const Rows<T, kMax>& c, int64_t n, int64_t* col4row, Workspace& ws) {
  double* v = ws.v.data();
  int64_t* row4col = ws.row4col.data();
  int64_t* colmin_row = ws.colmin_row.data();
  for (int64_t j = 0; j < n; ++j) {
    v[j] = kInf;
    colmin_row[j] = -1;
  }
  // Row-major sweep: v[j] = min_i c[i][j], reading the matrix in memory order.
  for (int64_t i = 0; i < n; ++i) {
    const T* row = c.row(i);
    for (int64_t j = 0; j < n; ++j) {
      const double cij = c.at(row, j);
      if (cij < v[j]) {
        v[j] = cij;
        colmin_row[j] = i;
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    col4row[i] = -1;
    ws.unique[i] = 1;
  }
  for (int64_t j = n - 1; j >= 0; --j) {
    const int64_t i = colmin_row[j];
    if (i < 0) return -1;  // column j is all +inf: no perfect matching exists
    if (col4row[i] < 0) {
      col4row[i] = j;
      row4col[j] = i;
    } else {
      ws.unique[i] = 0;
      row4col[j] = -1;
    }
  }
  int64_t nfree = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j1 = col4row[i];
    if (j1 < 0) {
      ws.free_rows[nfree++] = i;
    } else if (ws.unique[i]) {
      // Reduction transfer: lower v[j1] so that j1 ties with row i's second best column.
      const T* row = c.row(i);
      double second = kInf;
      for (int64_t j = 0; j < n; ++j) {
        if (j == j1) continue;
        const double h = c.at(row, j) - v[j];
        if (h < second) second = h;
      }
      if (second < kInf) v[j1] -= second;
    }
  }
  return nfree;
}

// One pass of augmenting row reduction over free_rows[0, nfree). Each free row takes its
// cheapest column (reduced cost), lowering that column's price to its second best; the row it
// evicts is retried at once when the price moved, else deferred to the next pass. The step
// budget bounds price wars, so the pass always ends.
// Returns the number of rows still free, or -1 if a row has no finite entry.
template <typename T, bool kMax>
int64_t augmenting_row_reduction(const Rows<T, kMax>& c, int64_t m, int64_t nfree,
                                 int64_t* col4row, Workspace& ws) {
  double* v = ws.v.data();
  int64_t* row4col = ws.row4col.data();
  int64_t* free_rows = ws.free_rows.data();
  int64_t k = 0, nnew = 0, steps = 0;
  while (k < nfree) {
    ++steps;
    const int64_t i = free_rows[k++];
    const T* row = c.row(i);
    double u1 = kInf, u2 = kInf;
    int64_t j1 = -1, j2 = -1;
    for (int64_t j = 0; j < m; ++j) {
      const double h = c.at(row, j) - v[j];
      if (h < u2) {
        if (h < u1) {
          u2 = u1;
          j2 = j1;
          u1 = h;
          j1 = j;
        } else {
          u2 = h;
          j2 = j;
        }
      }
    }
    if (j1 < 0) return -1;
    int64_t i0 = row4col[j1];
    const double v1_new = v[j1] - (u2 - u1);
    // j2 < 0 means u2 is +inf: lowering the price by an infinite amount is not a move.
    const bool lowers = j2 >= 0 && v1_new < v[j1];
    if (steps < kArrStepsPerRow * k) {
      if (lowers) {
        v[j1] = v1_new;
      } else if (i0 >= 0 && j2 >= 0) {
        j1 = j2;  // tie: take the equally cheap second column instead of evicting
        i0 = row4col[j2];
      }
      if (i0 >= 0) {
        if (lowers) {
          free_rows[--k] = i0;
        } else {
          free_rows[nnew++] = i0;
        }
      }
    } else if (i0 >= 0) {
      free_rows[nnew++] = i0;
    }
    col4row[i] = j1;
    row4col[j1] = i;
    if (i0 >= 0) col4row[i0] = -1;
  }
  return nnew;
}


struct ScanResult {
  double best;
  int64_t j;
};

// One Dijkstra step's sweep over the columns: relax d[j] through row i (distance base to
// row i) and return the first column of smallest d. Written with GCC vector extensions, four
// columns a lane group, so it vectorises on any target (and uses AVX2 where the CPU has it).
template <typename T, bool kMax>
__attribute__((always_inline)) inline ScanResult scan_row_impl(const T* row, const double* v,
                                                               double* d, int64_t* pred,
                                                               int64_t m, double base,
                                                               int64_t i) {
  typedef double v4d __attribute__((vector_size(32)));
  typedef int64_t v4l __attribute__((vector_size(32)));
  typedef T v4t __attribute__((vector_size(4 * sizeof(T))));
  const v4d base4 = {base, base, base, base};
  const v4l i4 = {i, i, i, i}, step4 = {4, 4, 4, 4};
  v4d min4 = {kInf, kInf, kInf, kInf};
  v4l argmin4 = {-1, -1, -1, -1}, j4 = {0, 1, 2, 3};
  int64_t j = 0;
  for (; j + 4 <= m; j += 4) {
    v4t ct;
    v4d vv, dd;
    v4l pp;
    std::memcpy(&ct, row + j, sizeof ct);
    std::memcpy(&vv, v + j, sizeof vv);
    std::memcpy(&dd, d + j, sizeof dd);
    std::memcpy(&pp, pred + j, sizeof pp);
    v4d cc = __builtin_convertvector(ct, v4d);
    if (kMax) cc = -cc;
    const v4d h = base4 + (cc - vv);
    const v4l lower = h < dd;
    dd = lower ? h : dd;
    pp = lower ? i4 : pp;
    std::memcpy(d + j, &dd, sizeof dd);
    std::memcpy(pred + j, &pp, sizeof pp);
    const v4l better = dd < min4;
    min4 = better ? dd : min4;
    argmin4 = better ? j4 : argmin4;
    j4 += step4;
  }
  ScanResult r{kInf, -1};
  for (int l = 0; l < 4; ++l) {
    if (argmin4[l] >= 0 && (min4[l] < r.best || (min4[l] == r.best && argmin4[l] < r.j))) {
      r.best = min4[l];
      r.j = argmin4[l];
    }
  }
  for (; j < m; ++j) {
    const double h = base + (Rows<T, kMax>::at(row, j) - v[j]);
    if (h < d[j]) {
      d[j] = h;
      pred[j] = i;
    }
    if (d[j] < r.best) {
      r.best = d[j];
      r.j = j;
    }
  }
  return r;
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T, bool kMax>
__attribute__((target("avx2"))) ScanResult scan_row_avx2(const T* row, const double* v, double* d,
                                                        int64_t* pred, int64_t m, double base,
                                                        int64_t i) {
  return scan_row_impl<T, kMax>(row, v, d, pred, m, base, i);
}
#endif

template <typename T, bool kMax>
ScanResult scan_row(const T* row, const double* v, double* d, int64_t* pred, int64_t m,
                    double base, int64_t i) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2) return scan_row_avx2<T, kMax>(row, v, d, pred, m, base, i);
#endif
  return scan_row_impl<T, kMax>(row, v, d, pred, m, base, i);
}

// The tie preference for free columns scans the free-column list; past this size (wide
// rectangular problems) it is skipped, which costs steps on ties, never optimality.
constexpr int64_t kFreeColumnTieScan = 256;

// Dijkstra from free row f over reduced costs, then augment along the path found.
// Scanned columns get v = -inf while the search runs, which makes the fused update-and-argmin
// loop skip them without a branch; their true prices are restored (and updated) at the end.
template <typename T, bool kMax>
bool augment(const Rows<T, kMax>& c, int64_t m, int64_t f, int64_t* col4row, Workspace& ws) {
  double* v = ws.v.data();
  double* d = ws.d.data();
  int64_t* pred = ws.pred.data();
  int64_t* row4col = ws.row4col.data();
  int64_t* scanned = ws.scanned.data();
  double* scanned_v = ws.scanned_v.data();
  double* scanned_d = ws.scanned_d.data();
  int64_t* free_cols = ws.free_cols.data();
  const int64_t nfree_cols = ws.nfree_cols;
  for (int64_t j = 0; j < m; ++j) d[j] = kInf;

  int64_t nscan = 0, i = f, sink = -1;
  double base = 0.0, best = kInf;
  while (true) {
    const ScanResult r = scan_row<T, kMax>(c.row(i), v, d, pred, m, base, i);
    best = r.best;
    int64_t jbest = r.j;
    if (jbest >= 0 && row4col[jbest] >= 0 && nfree_cols <= kFreeColumnTieScan) {
      // Among equal distances prefer a free column: it ends the search (matters with ties).
      for (int64_t k = 0; k < nfree_cols; ++k) {
        if (d[free_cols[k]] == best) {
          jbest = free_cols[k];
          break;
        }
      }
    }
    if (jbest < 0 || best == kInf) {
      for (int64_t k = 0; k < nscan; ++k) v[scanned[k]] = scanned_v[k];
      return false;  // every unscanned column is unreachable: infeasible
    }
    if (row4col[jbest] < 0) {
      sink = jbest;
      break;
    }
    i = row4col[jbest];
    scanned[nscan] = jbest;
    scanned_v[nscan] = v[jbest];
    scanned_d[nscan] = best;
    ++nscan;
    // Row i is reached at distance best through its matched column, whose reduced cost is
    // row i's minimum: offset every edge out of row i by that.
    base = best - (c.at(c.row(i), jbest) - v[jbest]);
    v[jbest] = -kInf;
    d[jbest] = kInf;
  }
  for (int64_t k = 0; k < nscan; ++k) {
    v[scanned[k]] = scanned_v[k] + (scanned_d[k] - best);
  }
  for (int64_t k = 0; k < nfree_cols; ++k) {
    if (free_cols[k] == sink) {
      free_cols[k] = free_cols[--ws.nfree_cols];
      break;
    }
  }
  for (int64_t j = sink;;) {
    const int64_t r = pred[j];
    row4col[j] = r;
    const int64_t next = col4row[r];
    col4row[r] = j;
    if (r == f) break;
    j = next;
  }
  return true;
}

// The tie rule (see the top of this file). The optimal assignments are exactly the matchings
// that use tight pairs only (reduced cost c_ij - v_j equal to the row's, u_i) and, when m > n,
// cover every column whose price is below the highest: complementary slackness with the duals
// the solver found, whichever optimal assignment it returned. Modelling the m - n surplus
// columns as held by interchangeable dummy rows (tight wherever v_j == vmax) makes that a
// perfect matching problem, so row i can move to column j < col4row[i] exactly when an
// alternating path of tight pairs leads from j's holder, through rows > i (rows < i are fixed)
// or the dummies, to row i's old column c0. Row i takes the first column that has one: a
// depth-first search per candidate; nodes found dead stay dead for the rest of row i's
// candidates.
//
// Cost: one sweep of the matrix collects the tight pairs. Augmenting row reduction leaves many
// rows tight on two columns, so most problems have some; but when the graph "node -> holder of
// another of its tight columns" has no cycle, the optimum is unique and nothing moves (the
// usual case for real-valued costs). Only with a cycle (true ties) do the searches run, on the
// stored pairs, or, past kTightPairsPerNode of them a node on average (dense ties: constant or
// small-integer costs), by scanning rows, where paths are short.
constexpr int64_t kTightPairsPerNode = 8;

// Collects the tight pairs of rows 0..n-1 (|c_ij - v_j - u_i| <= tol, u_i from the row's own
// column), own columns included, ascending per row: row x's in adj[start[x], start[x + 1]).
// Returns false (adj partly filled) once adj would pass cap. Sets *extra when some row is
// tight on a column other than its own. Four columns a step with GCC vector extensions: tight
// pairs are rare, so the loop is a compare and one test a step (AVX2 where the CPU has it).
template <typename T, bool kMax>
__attribute__((always_inline)) inline bool tight_pairs_impl(const T* cost, int64_t n, int64_t m,
                                                            const double* v,
                                                            const int64_t* col4row, double tol,
                                                            std::vector<int64_t>& start,
                                                            std::vector<int64_t>& adj,
                                                            size_t cap, bool* extra) {
  typedef double v4d __attribute__((vector_size(32)));
  typedef int64_t v4l __attribute__((vector_size(32)));
  typedef T v4t __attribute__((vector_size(4 * sizeof(T))));
  const v4d tol4 = {tol, tol, tol, tol};
  for (int64_t x = 0; x < n; ++x) {
    start[x] = static_cast<int64_t>(adj.size());
    const T* row = cost + x * m;
    const double u = Rows<T, kMax>::at(row, col4row[x]) - v[col4row[x]];
    const v4d u4 = {u, u, u, u};
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
      v4t ct;
      v4d vv;
      std::memcpy(&ct, row + j, sizeof ct);
      std::memcpy(&vv, v + j, sizeof vv);
      v4d cc = __builtin_convertvector(ct, v4d);
      if (kMax) cc = -cc;
      const v4d h = (cc - vv) - u4;
      const v4l tight = (h <= tol4) & (h >= -tol4);
      if (!(tight[0] | tight[1] | tight[2] | tight[3])) continue;
      for (int l = 0; l < 4; ++l) {
        if (!tight[l]) continue;
        if (adj.size() == cap) return false;
        adj.push_back(j + l);
      }
    }
    for (; j < m; ++j) {
      const double h = Rows<T, kMax>::at(row, j) - v[j] - u;
      if (!(h <= tol && h >= -tol)) continue;
      if (adj.size() == cap) return false;
      adj.push_back(j);
    }
    if (static_cast<int64_t>(adj.size()) - start[x] > 1) *extra = true;
  }
  return true;
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T, bool kMax>
__attribute__((target("avx2"))) bool tight_pairs_avx2(const T* cost, int64_t n, int64_t m,
                                                      const double* v, const int64_t* col4row,
                                                      double tol, std::vector<int64_t>& start,
                                                      std::vector<int64_t>& adj, size_t cap,
                                                      bool* extra) {
  return tight_pairs_impl<T, kMax>(cost, n, m, v, col4row, tol, start, adj, cap, extra);
}
#endif

template <typename T, bool kMax>
bool tight_pairs(const T* cost, int64_t n, int64_t m, const double* v, const int64_t* col4row,
                 double tol, std::vector<int64_t>& start, std::vector<int64_t>& adj, size_t cap,
                 bool* extra) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2) return tight_pairs_avx2<T, kMax>(cost, n, m, v, col4row, tol, start, adj, cap, extra);
#endif
  return tight_pairs_impl<T, kMax>(cost, n, m, v, col4row, tol, start, adj, cap, extra);
}

// tol: how far from tight a pair may be and still count as tight; 0 for lap::solve's own
// duals (exact equality), a rounding margin for duals from other arithmetic (the auction).
template <typename T, bool kMax>
void canonicalize(const Rows<T, kMax>& c, int64_t n, int64_t m, int64_t* col4row,
                  const double* v, Workspace& ws, double tol = 0.0) {
  int64_t* row4col = ws.row4col.data();
  const int64_t dummy = n;  // the node of the m - n dummy rows
  double vmax = -kInf;
  for (int64_t j = 0; j < m; ++j) vmax = v[j] > vmax ? v[j] : vmax;
  auto holder = [&](int64_t k) { return row4col[k] < 0 ? dummy : row4col[k]; };
  auto row_u = [&](int64_t x) { return c.at(c.row(x), col4row[x]) - v[col4row[x]]; };
  auto is_tight = [&](int64_t x, double ux, int64_t k) {
    if (x == dummy) return v[k] >= vmax - tol;
    const double h = c.at(c.row(x), k) - v[k] - ux;
    return h <= tol && h >= -tol;
  };

  // The tight pairs of each node, own column included (ascending), while few enough.
  std::vector<int64_t>& start = ws.adj_start;
  std::vector<int64_t>& adj = ws.adj;
  start.resize(n + 2);
  adj.clear();
  const size_t cap = static_cast<size_t>(kTightPairsPerNode * (n + 1));
  // Every cycle passes through a row with a tight pair off its own column: without one, the
  // optimum is unique.
  bool extra = false;
  bool stored = tight_pairs<T, kMax>(c.data, n, m, v, col4row, tol, start, adj, cap, &extra);
  start[n] = static_cast<int64_t>(adj.size());
  for (int64_t k = 0; k < m && stored && m > n; ++k) {
    if (v[k] < vmax - tol) continue;
    stored = adj.size() < cap;
    if (stored) adj.push_back(k);
  }
  start[n + 1] = static_cast<int64_t>(adj.size());
  if (stored && !extra) return;

  ws.seen.assign(n + 1, -1);
  ws.parent.resize(n + 1);
  ws.via_col.resize(n + 1);
  ws.stack.resize(n + 1);
  ws.stack_pos.resize(n + 1);
  int64_t* seen = ws.seen.data();
  int64_t* parent = ws.parent.data();
  int64_t* via_col = ws.via_col.data();
  int64_t* stack = ws.stack.data();
  int64_t* stack_pos = ws.stack_pos.data();
  // The next tight column of node x (not its own) from position pos on, or -1; pos advances.
  auto next_tight = [&](int64_t x, double ux, int64_t& pos) -> int64_t {
    if (stored) {
      while (pos < start[x + 1] - start[x]) {
        const int64_t k = adj[start[x] + pos++];
        if (holder(k) != x) return k;
      }
      return -1;
    }
    while (pos < m) {
      const int64_t k = pos++;
      if (holder(k) != x && is_tight(x, ux, k)) return k;
    }
    return -1;
  };

  if (stored) {
    // Unique optimum unless the graph x -> holder(k) over tight k has a cycle (3-colour DFS;
    // seen: -1 new, 0 on the stack, 1 done).
    bool cycle = false;
    for (int64_t root = 0; root <= n && !cycle; ++root) {
      if (seen[root] >= 0) continue;
      int64_t depth = 0;
      stack[depth] = root;
      stack_pos[depth++] = 0;
      seen[root] = 0;
      while (depth > 0 && !cycle) {
        const int64_t x = stack[depth - 1];
        const int64_t k = next_tight(x, 0.0, stack_pos[depth - 1]);
        if (k < 0) {
          seen[x] = 1;
          --depth;
          continue;
        }
        const int64_t h = holder(k);
        if (seen[h] == 0) {
          cycle = true;
        } else if (seen[h] < 0) {
          seen[h] = 0;
          stack[depth] = h;
          stack_pos[depth++] = 0;
        }
      }
    }
    if (!cycle) return;
    ws.seen.assign(n + 1, -1);
  }

  for (int64_t i = 0; i < n; ++i) {
    const int64_t c0 = col4row[i];
    const double ui = row_u(i);
    for (int64_t pos_i = 0;;) {
      const int64_t j = next_tight(i, ui, pos_i);
      if (j < 0 || j > c0) break;  // columns come in ascending order
      const int64_t first = holder(j);
      if ((first != dummy && first < i) || seen[first] == i) continue;  // fixed, or dead
      // Depth-first search from first for a node that can take c0.
      seen[first] = i;
      parent[first] = -1;
      via_col[first] = j;
      int64_t depth = 0, found = -1;
      stack[depth] = first;
      stack_pos[depth++] = -1;
      while (depth > 0) {
        const int64_t x = stack[depth - 1];
        const double ux = x == dummy ? 0.0 : row_u(x);
        if (stack_pos[depth - 1] < 0) {
          if (is_tight(x, ux, c0)) {
            found = x;
            break;
          }
          stack_pos[depth - 1] = 0;
        }
        int64_t next = -1;
        for (int64_t k; next < 0 && (k = next_tight(x, ux, stack_pos[depth - 1])) >= 0;) {
          const int64_t h = holder(k);
          if (k == c0 || (h != dummy && h < i) || seen[h] == i) continue;
          next = h;
          seen[h] = i;
          parent[h] = x;
          via_col[h] = k;
        }
        if (next >= 0) {
          stack[depth] = next;
          stack_pos[depth++] = -1;
        } else {
          --depth;
        }
      }
      if (found < 0) continue;
      // Shift along the path: found takes c0, each node's parent takes the node's column.
      for (int64_t y = found, take = c0;;) {
        const int64_t old = via_col[y];
        if (y == dummy) {
          row4col[take] = -1;
        } else {
          col4row[y] = take;
          row4col[take] = y;
        }
        if (y == first) break;
        take = old;
        y = parent[y];
      }
      col4row[i] = j;
      row4col[j] = i;
      break;
    }
  }
}

template <typename T, bool kMax>
Status solve_signed(int64_t n, int64_t m, const T* cost, int64_t* col4row, double* u, double* v_out,
                    Workspace& ws) {
  ws.resize(n, m);
  const Rows<T, kMax> c{cost, m};
  int64_t nfree;
  if (n == m) {
    nfree = column_reduction(c, n, col4row, ws);
    if (nfree < 0) return kInfeasible;
  } else {
    for (int64_t i = 0; i < n; ++i) {
      col4row[i] = -1;
      ws.free_rows[i] = i;
    }
    nfree = n;
  }
  for (int pass = 0; pass < 2 && nfree > 0; ++pass) {
    nfree = augmenting_row_reduction(c, m, nfree, col4row, ws);
    if (nfree < 0) return kInfeasible;
  }
  ws.nfree_cols = 0;
  for (int64_t j = 0; j < m; ++j) {
    if (ws.row4col[j] < 0) ws.free_cols[ws.nfree_cols++] = j;
  }
  for (int64_t k = 0; k < nfree; ++k) {
    if (!augment(c, m, ws.free_rows[k], col4row, ws)) return kInfeasible;
  }
  canonicalize(c, n, m, col4row, ws.v.data(), ws);
  const double sign = kMax ? -1.0 : 1.0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = col4row[i];
    if (u) u[i] = sign * (c.at(c.row(i), j) - ws.v[j]);
  }
  if (v_out) {
    for (int64_t j = 0; j < m; ++j) v_out[j] = sign * ws.v[j];
  }
  return kSolved;
}

}  // namespace detail

// Solves one n x m problem (n <= m, row-major, contiguous). Entries must be valid (see
// find_invalid_entry); +inf (-inf when maximising) marks a forbidden pair. On kOk, col4row[i]
// is row i's column; u and v (either may be null) get the duals of the problem as posed:
// u[i] + v[j] <= c[i][j] when minimising, >= when maximising.
template <typename T>
Status solve(int64_t n, int64_t m, const T* cost, bool maximize, int64_t* col4row, double* u,
             double* v, Workspace& ws) {
  if (n == 0) {
    for (int64_t j = 0; j < m; ++j) {
      if (v) v[j] = 0.0;
    }
    return kSolved;
  }
  return maximize ? detail::solve_signed<T, true>(n, m, cost, col4row, u, v, ws)
                  : detail::solve_signed<T, false>(n, m, cost, col4row, u, v, ws);
}

// The tie rule for a square problem solved elsewhere (the auction): col4row optimal, v the
// column duals as posed (u_i + v_j <= c_ij, >= when maximising, tight on assigned pairs). Those
// duals are not the integers lap::solve keeps on integer costs, so a pair counts as tight up to
// a rounding margin, 1e-12 of the largest finite |c_ij| or |v_j| (plus 1e-12).
template <typename T>
void canonicalize_square(int64_t n, const T* cost, bool maximize, int64_t* col4row,
                         const double* v_posed, Workspace& ws) {
  ws.resize(n, n);
  double scale = 1.0;
  for (int64_t k = 0; k < n * n; ++k) {
    const double a = std::abs(static_cast<double>(cost[k]));
    if (a < kInf && a > scale) scale = a;
  }
  for (int64_t j = 0; j < n; ++j) {
    ws.v[j] = maximize ? -v_posed[j] : v_posed[j];
    scale = std::abs(ws.v[j]) > scale ? std::abs(ws.v[j]) : scale;
  }
  for (int64_t i = 0; i < n; ++i) ws.row4col[col4row[i]] = i;
  const double tol = 1e-12 * scale;
  if (maximize) {
    detail::canonicalize(detail::Rows<T, true>{cost, n}, n, n, col4row, ws.v.data(), ws, tol);
  } else {
    detail::canonicalize(detail::Rows<T, false>{cost, n}, n, n, col4row, ws.v.data(), ws, tol);
  }
}

}  // namespace lap
}  // namespace nat
