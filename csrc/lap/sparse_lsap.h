// Exact rectangular linear sum assignment on a sparse graph: n rows <= m columns, row i may take
// only the columns of its candidate list (CSR: crow[n + 1], col[nnz], cost[nnz]); minimise
// sum_i cost(i, col4row[i]) (or maximise, by negating every cost as it is read).
//
// Shortest augmenting paths (the Dijkstra phase of lsap.h's Jonker-Volgenant) over the edge
// lists, with a binary heap instead of the dense sweep, so a step costs O(deg log) instead of
// O(m). Where many rows start free an epsilon-scaled Jacobi auction (auction_lsap.h's prepass,
// on edge lists, its bids in parallel) first finds near-optimal prices: from a random start the
// Dijkstra searches had to cross most of the graph (about 4,000 columns each at n = 131,072).
// It can start warm from a previous matching and column prices (nat_ext.assign_full
// re-solves after adding edges): the matched pairs that are still tight are kept, the other
// rows start free.
//
// The output carries the certificate of lsap.h, over the candidate edges: u[i] + v[j] <= c[i][j]
// on every edge (to within kTightSlack of the magnitudes), equality on assigned pairs, v[j] == 0
// on unassigned columns and v[j] <= 0 elsewhere. Columns without an edge stay unassigned at v = 0.
//
// Plain C++ on pointers and sizes: no torch, so the CPU kernel and a C++ test share it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstddef>
#include <cmath>
#include <functional>
#include <vector>

#include "lap/auction_lsap.h"  // order_key, the dense prepass this one follows
#include "lap/lsap.h"  // kInf
#include "lap/status.h"

namespace nat {
namespace lap {

// A sparse problem as the solver reads it. Entries must be finite; duplicates are allowed (the
// solver takes the cheapest of them when it matters: an edge is just a way to reach a column).
struct SparseProblem {
  int64_t n, m;
  const int64_t* crow;  // [n + 1], crow[0] == 0, non-decreasing
  const int64_t* col;   // [nnz], in [0, m)
  const double* cost;   // [nnz]
};

// Heap entry of the Dijkstra search: smaller label first; at equal labels a free column first (it
// ends the search, which matters when many scores tie), then the lower column index.
struct SparseHeapEntry {
  double d;
  int64_t matched;  // 0 for a free column, 1 for a matched one
  int64_t j;
  bool operator>(const SparseHeapEntry& o) const {
    if (d != o.d) return d > o.d;
    if (matched != o.matched) return matched > o.matched;
    return j > o.j;
  }
};

// Scratch memory; reusable across problems.
struct SparseWorkspace {
  std::vector<double> v, d, c;          // prices, Dijkstra labels, signed costs
  std::vector<int64_t> row4col, edge4row, pred_edge, pred_row, scanned, touched;
  std::vector<int64_t> ccol, cedge;     // the transpose (column -> edges), built on demand
  std::vector<char> done;
  std::vector<SparseHeapEntry> heap;

  void resize(int64_t n, int64_t m, int64_t nnz) {
    d.assign(m, kInf);
    c.resize(nnz);
    row4col.assign(m, -1);
    edge4row.assign(n, -1);
    pred_edge.resize(m);
    pred_row.resize(m);
    done.assign(m, 0);
    scanned.clear();
    touched.clear();
  }
};

// A solve starts with the auction (sparse_auction) when more than n / kAuctionFreeDivisor rows
// are free. At n = 131,072 (crowded features) 4,796 free rows took
// 2.4 s of Dijkstra alone and 1.1 s with the auction first; 1,692 rows took 0.5 s either way.
constexpr int64_t kAuctionFreeDivisor = 64;

namespace detail {

// u_i of a row under prices v: its smallest reduced cost over its edges (kInf for no edge).
inline double row_min(const SparseProblem& p, const double* c, const double* v, int64_t i) {
  double best = kInf;
  for (int64_t e = p.crow[i]; e < p.crow[i + 1]; ++e) best = std::min(best, c[e] - v[p.col[e]]);
  return best;
}

// A pair counts as tight when its reduced cost is within kTightSlack x (|c| + |v|) of its row's
// minimum: least_prices sums its rises along paths of thousands of columns, and the rounding
// (1e-14 at most at n = 262,144) would otherwise free thousands of optimal pairs at every re-solve
// (7,000 at n = 262,144 spread). Dijkstra from such a start is exact up to that slack.
constexpr double kTightSlack = 0x1p-42;

// Warm start: keeps the pairs of col4row (-1: free row) that are edges, one-to-one and tight
// under the prices ws.v (their reduced cost is the row's minimum); frees the other rows.
// Rectangular problems need every unassigned column at the top price: the prices are shifted to
// a maximum of 0 and a column left free below 0 is raised to 0, which
// can make an edge into it cheaper than the pair its row holds; that row is freed in turn (a
// worklist over the transposed graph, each column raised at most once).
// Returns the free rows.
inline std::vector<int64_t> warm_start(const SparseProblem& p, int64_t* col4row,
                                       SparseWorkspace& ws) {
  const int64_t n = p.n, m = p.m, nnz = p.crow[n];
  double* v = ws.v.data();
  const double* c = ws.c.data();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = col4row[i];
    col4row[i] = -1;
    if (j < 0 || j >= m || ws.row4col[j] >= 0) continue;
    int64_t edge = -1;  // the cheapest edge (i, j)
    for (int64_t e = p.crow[i]; e < p.crow[i + 1]; ++e) {
      if (p.col[e] == j && (edge < 0 || c[e] < c[edge])) edge = e;
    }
    if (edge < 0) continue;
    const double slack = kTightSlack * (std::fabs(c[edge]) + std::fabs(v[j]));
    if (c[edge] - v[j] > row_min(p, c, v, i) + slack) continue;
    col4row[i] = j;
    ws.row4col[j] = i;
    ws.edge4row[i] = edge;
  }
  if (m > n) {
    // A uniform shift of the prices changes no reduced cost ordering: top price 0. (Square
    // problems keep their prices as they come, so that a caller comparing prices across warm
    // solves sees only real moves.)
    double vmax = -kInf;
    for (int64_t j = 0; j < m; ++j) vmax = std::max(vmax, v[j]);
    for (int64_t j = 0; j < m; ++j) v[j] -= vmax;
    // The transpose, for the rows that have an edge into a raised column.
    ws.ccol.assign(m + 1, 0);
    ws.cedge.resize(nnz);
    for (int64_t e = 0; e < nnz; ++e) ++ws.ccol[p.col[e] + 1];
    for (int64_t j = 0; j < m; ++j) ws.ccol[j + 1] += ws.ccol[j];
    std::vector<int64_t> fill(ws.ccol.begin(), ws.ccol.end() - 1), edge_row(nnz);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t e = p.crow[i]; e < p.crow[i + 1]; ++e) {
        ws.cedge[fill[p.col[e]]++] = e;
        edge_row[e] = i;
      }
    }
    std::vector<int64_t> raise;
    for (int64_t j = 0; j < m; ++j) {
      if (ws.row4col[j] < 0 && v[j] < 0.0) raise.push_back(j);
    }
    while (!raise.empty()) {
      const int64_t j = raise.back();
      raise.pop_back();
      v[j] = 0.0;
      for (int64_t k = ws.ccol[j]; k < ws.ccol[j + 1]; ++k) {
        const int64_t i = edge_row[ws.cedge[k]];
        const int64_t ji = col4row[i];
        if (ji < 0 || c[ws.edge4row[i]] - v[ji] <= c[ws.cedge[k]] - v[j]) continue;
        col4row[i] = -1;  // an edge into j is now cheaper than row i's pair: not tight
        ws.row4col[ji] = -1;
        ws.edge4row[i] = -1;
        if (v[ji] < 0.0) raise.push_back(ji);
      }
    }
  }
  std::vector<int64_t> free_rows;
  for (int64_t i = 0; i < n; ++i) {
    if (col4row[i] < 0) free_rows.push_back(i);
  }
  return free_rows;
}

// Runs body(begin, end) over [0, count), possibly on several threads (the kernel passes
// at::parallel_for); null: one call on this thread.
using ParallelFor = std::function<void(int64_t count, const std::function<void(int64_t, int64_t)>& body)>;

inline void run_parallel(const ParallelFor& parallel_for, int64_t count,
                         const std::function<void(int64_t, int64_t)>& body) {
  if (count <= 0) return;
  if (parallel_for) {
    parallel_for(count, body);
  } else {
    body(0, count);
  }
}

inline void atomic_min_key(uint64_t* slot, uint64_t key) {
  uint64_t seen = __atomic_load_n(slot, __ATOMIC_RELAXED);
  while (key < seen &&
         !__atomic_compare_exchange_n(slot, &seen, key, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

// Bellman-Ford over the matched pairs: v[j] = min(v[j], c(i, j) - u[i]) for matched rows i and
// matched columns j, until nothing moves (at most kMaxSweeps): then each matched pair is its row's
// minimum by the same arithmetic that warm_start and Dijkstra use, where the matching allows it.
inline void lower_to_tight(const SparseProblem& p, const int64_t* col4row, SparseWorkspace& ws,
                           const ParallelFor& parallel_for) {
  const int64_t n = p.n, m = p.m;
  double* v = ws.v.data();
  const double* c = ws.c.data();
  const int64_t* row4col = ws.row4col.data();
  const int64_t* edge4row = ws.edge4row.data();
  std::vector<uint64_t> keys(m, kNoKey);
  std::vector<double> u(n);
  for (int sweep = 0; sweep < kMaxSweeps; ++sweep) {
    run_parallel(parallel_for, n, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) u[i] = col4row[i] >= 0 ? c[edge4row[i]] - v[col4row[i]] : kInf;
    });
    run_parallel(parallel_for, n, [&](int64_t b, int64_t end) {
      for (int64_t i = b; i < end; ++i) {
        if (u[i] == kInf) continue;
        for (int64_t e = p.crow[i]; e < p.crow[i + 1]; ++e) {
          const int64_t j = p.col[e];
          if (row4col[j] >= 0 && c[e] - v[j] < u[i]) atomic_min_key(&keys[j], order_key(c[e] - u[i]));
        }
      }
    });
    bool changed = false;
    for (int64_t j = 0; j < m; ++j) {
      if (keys[j] == kNoKey) continue;
      const double lowered = from_order_key(keys[j]);
      keys[j] = kNoKey;
      if (lowered < v[j]) {
        v[j] = lowered;
        changed = true;
      }
    }
    if (!changed) break;
  }
}

// The epsilon-scaled Jacobi auction of auction_lsap.h's prepass, on edge lists, as the start of a
// solve with many free rows: every free row bids for its cheapest column at once (in parallel),
// each column goes to its lowest price (ties to the lower row: the result does not depend on
// threads), and Bellman-Ford sweeps over the edges then lower the matched columns' prices until
// their pairs are tight. Nothing here needs to be exact: the caller keeps only the pairs that are
// tight by Dijkstra's own arithmetic (warm_start) and the Dijkstra phase finishes. Returns the
// rows left free by the auction (warm_start decides the rest).
inline std::vector<int64_t> sparse_auction(const SparseProblem& p, std::vector<int64_t> free_rows,
                                           int64_t* col4row, SparseWorkspace& ws,
                                           const ParallelFor& parallel_for, const int32_t* abort) {
  const int64_t n = p.n, m = p.m, nnz = p.crow[n];
  double* v = ws.v.data();
  const double* c = ws.c.data();
  int64_t* row4col = ws.row4col.data();
  int64_t* edge4row = ws.edge4row.data();
  double lo = kInf, hi = -kInf;
  for (int64_t e = 0; e < nnz; ++e) {
    lo = std::min(lo, c[e]);
    hi = std::max(hi, c[e]);
  }
  const double range = hi - lo;
  if (!(range > 0x1p-900 && std::max(std::fabs(lo), std::fabs(hi)) <= 0x1p900)) return free_rows;
  std::vector<int64_t> no_edge;  // left to Dijkstra, which reports them infeasible
  {
    std::vector<int64_t> bidders;
    for (const int64_t i : free_rows) (p.crow[i + 1] > p.crow[i] ? bidders : no_edge).push_back(i);
    free_rows.swap(bidders);
  }
  int index_bits = 1;
  while ((int64_t{1} << index_bits) < n) ++index_bits;
  const uint64_t index_mask = (uint64_t{1} << index_bits) - 1;
  std::vector<uint64_t> keys(m, kNoKey);
  std::vector<int64_t> bid_col, bid_edge(n, -1), next, evicted;
  std::vector<char> slack;
  const double final_eps = std::ldexp(range, -kFinalEpsilonLog2) / static_cast<double>(n);
  const int64_t stop_free = n / kStopDivisor;
  const int64_t round_budget = n + 2000;
  int64_t rounds = 0;
  bool stopped = false;
  double eps = range / kFirstEpsilonDivisor;
  for (bool first = true, last = false; !last && !stopped; first = false) {
    last = eps <= final_eps;
    if (!first) {
      // A new phase keeps the pairs that meet its smaller eps and frees the others.
      slack.assign(n, 0);
      run_parallel(parallel_for, n, [&](int64_t b, int64_t end) {
        for (int64_t i = b; i < end; ++i) {
          if (col4row[i] >= 0) slack[i] = c[edge4row[i]] - v[col4row[i]] > row_min(p, c, v, i) + eps;
        }
      });
      for (int64_t i = 0; i < n; ++i) {
        if (!slack[i]) continue;
        row4col[col4row[i]] = -1;
        col4row[i] = -1;
        edge4row[i] = -1;
        free_rows.push_back(i);
      }
    }
    while (static_cast<int64_t>(free_rows.size()) > stop_free && rounds < round_budget) {
      if (abort && __atomic_load_n(abort, __ATOMIC_RELAXED) != 0) {
        stopped = true;
        break;
      }
      ++rounds;
      const int64_t nf = static_cast<int64_t>(free_rows.size());
      bid_col.resize(nf);
      run_parallel(parallel_for, nf, [&](int64_t b, int64_t end) {
        for (int64_t k = b; k < end; ++k) {
          const int64_t i = free_rows[k];
          double u1 = kInf, u2 = kInf;
          int64_t j1 = -1, e1 = -1;
          for (int64_t e = p.crow[i]; e < p.crow[i + 1]; ++e) {
            const int64_t j = p.col[e];
            const double h = c[e] - v[j];
            if (h < u1) {
              if (j != j1) u2 = u1;
              u1 = h;
              j1 = j;
              e1 = e;
            } else if (h < u2 && j != j1) {
              u2 = h;
            }
          }
          // eps at least a few ulps of the price, so the rounded bid still lowers it
          const double step = std::max(eps, std::ldexp(std::fabs(v[j1]), index_bits + 3 - 52));
          const double gap = u2 < kInf ? u2 - u1 : 0.0;
          const uint64_t price = (order_key(v[j1] - gap - step) + index_mask) & ~index_mask;
          atomic_min_key(&keys[j1], price | static_cast<uint64_t>(i));
          bid_col[k] = j1;
          bid_edge[i] = e1;
        }
      });
      evicted.clear();
      for (int64_t k = 0; k < nf; ++k) {
        const int64_t j = bid_col[k];
        const uint64_t key = keys[j];
        if (key == kNoKey) continue;  // settled by an earlier bid of this round
        keys[j] = kNoKey;
        const int64_t i = static_cast<int64_t>(key & index_mask);
        const int64_t old = row4col[j];
        if (old >= 0) {
          col4row[old] = -1;
          edge4row[old] = -1;
          evicted.push_back(old);
        }
        row4col[j] = i;
        col4row[i] = j;
        edge4row[i] = bid_edge[i];
        v[j] = from_order_key(key & ~index_mask);
      }
      next.clear();
      for (const int64_t i : free_rows) {
        if (col4row[i] < 0) next.push_back(i);
      }
      next.insert(next.end(), evicted.begin(), evicted.end());
      free_rows.swap(next);
    }
    if (rounds >= round_budget) break;
    eps = std::max(eps / kEpsilonFactor, final_eps);
  }
  if (!stopped) lower_to_tight(p, col4row, ws, parallel_for);
  free_rows.insert(free_rows.end(), no_edge.begin(), no_edge.end());
  return free_rows;
}

// Dijkstra from free row f over reduced costs, then augment along the path found. Labels are
// distances minus the reached row's u, as in lsap.h's augment: edges out of a matched row are
// offset by its pair's reduced cost, so every step adds a non-negative amount.
// Returns false when no free column is reachable from f.
inline bool sparse_augment(const SparseProblem& p, int64_t f, int64_t* col4row,
                           SparseWorkspace& ws) {
  double* v = ws.v.data();
  double* d = ws.d.data();
  const double* c = ws.c.data();
  int64_t* row4col = ws.row4col.data();
  std::vector<SparseHeapEntry>& heap = ws.heap;
  const std::greater<SparseHeapEntry> later;
  heap.clear();
  int64_t i = f, sink = -1;
  double base = 0.0, best = kInf;
  while (true) {
    for (int64_t e = p.crow[i]; e < p.crow[i + 1]; ++e) {
      const int64_t j = p.col[e];
      if (ws.done[j]) continue;
      const double h = base + (c[e] - v[j]);
      if (h < d[j]) {
        if (d[j] == kInf) ws.touched.push_back(j);
        d[j] = h;
        ws.pred_row[j] = i;
        ws.pred_edge[j] = e;
        heap.push_back({h, row4col[j] >= 0 ? 1 : 0, j});
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
    int64_t j = -1;
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), later);
      const SparseHeapEntry top = heap.back();
      heap.pop_back();
      if (!ws.done[top.j] && top.d == d[top.j]) {
        j = top.j;
        break;
      }
    }
    if (j < 0) break;  // nothing left to reach: infeasible
    best = d[j];
    if (row4col[j] < 0) {
      sink = j;
      break;
    }
    ws.done[j] = 1;
    ws.scanned.push_back(j);
    i = row4col[j];
    base = best - (c[ws.edge4row[i]] - v[j]);
  }
  if (sink >= 0) {
    for (const int64_t j : ws.scanned) v[j] += d[j] - best;
    for (int64_t j = sink;;) {
      const int64_t r = ws.pred_row[j];
      row4col[j] = r;
      const int64_t next = col4row[r];
      col4row[r] = j;
      ws.edge4row[r] = ws.pred_edge[j];
      if (r == f) break;
      j = next;
    }
  }
  for (const int64_t j : ws.touched) d[j] = kInf;
  for (const int64_t j : ws.scanned) ws.done[j] = 0;
  ws.touched.clear();
  ws.scanned.clear();
  return sink >= 0;
}

// The least prices of an optimal matching, given the prices `top` the search started from (cost
// convention: the greatest v <= top under which every matched pair stays its row's minimum): each
// column rises by its shortest distance from its top, over arcs k -> j of length
// (c(i, j) - v[j]) - (c(i, k) - v[k]) for the row i matched to k (non-negative under the
// optimal v). Applied after the auction, whose bids raise prices by up to eps where Dijkstra moves
// only the columns it must: at n = 131,072 crowded, 10% of the rows' u came out lower by 1e-3 or
// more, and assign_full certifies a row by a bound on its u (so a lower u means a rescan).
inline void least_prices(const SparseProblem& p, const std::vector<double>& top, SparseWorkspace& ws) {
  const int64_t m = p.m;
  double* v = ws.v.data();
  const double* c = ws.c.data();
  const int64_t* row4col = ws.row4col.data();
  std::vector<double> delta(m);
  std::vector<char> settled(m, 0);
  std::vector<SparseHeapEntry>& heap = ws.heap;
  const std::greater<SparseHeapEntry> later;
  heap.clear();
  for (int64_t j = 0; j < m; ++j) {
    delta[j] = std::max(0.0, top[j] - v[j]);
    heap.push_back({delta[j], 0, j});
  }
  std::make_heap(heap.begin(), heap.end(), later);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const SparseHeapEntry entry = heap.back();
    heap.pop_back();
    const int64_t k = entry.j;
    if (settled[k] || entry.d != delta[k]) continue;
    settled[k] = 1;
    const int64_t i = row4col[k];
    if (i < 0) continue;
    const double own = c[ws.edge4row[i]] - v[k];
    for (int64_t e = p.crow[i]; e < p.crow[i + 1]; ++e) {
      const int64_t j = p.col[e];
      const double reach = delta[k] + std::max(0.0, (c[e] - v[j]) - own);
      if (!settled[j] && reach < delta[j]) {
        delta[j] = reach;
        heap.push_back({reach, 0, j});
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
  }
  for (int64_t j = 0; j < m; ++j) v[j] += delta[j];
}

}  // namespace detail

// Solves one sparse problem (n <= m; entries finite, see SparseProblem). Warm start, optional:
// col4row holds each row's previous column or -1 (read when `warm`), v_init (nullable) the
// previous prices of the problem as posed. On kSolved, col4row[i] is row i's column and u, v
// (either may be null) the duals of the problem as posed: u[i] + v[j] <= cost on every edge
// (>= when maximising), equality on assigned pairs, and, when m > n or solving cold, unassigned
// columns priced at 0 and every other column at most 0 (at least 0 when maximising); square
// problems warm from v_init keep its offset. kInfeasible: no matching of every row.
// `abort` (nullable): read between augmentations; once non-zero the solve returns kSolved early
// with the rows it had not reached free (col4row -1) and *interrupted set: the caller's way to
// honour a deadline or a stop request from another thread.
inline Status sparse_solve(const SparseProblem& p, bool maximize, bool warm, const double* v_init,
                           int64_t* col4row, double* u, double* v_out, SparseWorkspace& ws,
                           const int32_t* abort = nullptr, bool* interrupted = nullptr,
                           const detail::ParallelFor& parallel_for = nullptr) {
  const int64_t n = p.n, m = p.m, nnz = p.crow[n];
  const double sign = maximize ? -1.0 : 1.0;
  ws.resize(n, m, nnz);
  for (int64_t e = 0; e < nnz; ++e) ws.c[e] = sign * p.cost[e];
  ws.v.assign(m, 0.0);
  if (v_init) {
    for (int64_t j = 0; j < m; ++j) ws.v[j] = sign * v_init[j];
  }
  if (!warm) {
    for (int64_t i = 0; i < n; ++i) col4row[i] = -1;
  }
  std::vector<int64_t> free_rows = detail::warm_start(p, col4row, ws);
  // Where many rows start free (a first solve, or a re-solve after many edges came in) the
  // auction prices them in near-linear time; from its prices the Dijkstra searches are short. A
  // few free rows cost less than the auction's fixed cost (a pass over the edges per phase).
  const bool auction = static_cast<int64_t>(free_rows.size()) * kAuctionFreeDivisor > n;
  std::vector<double> top;
  if (auction) {
    top = ws.v;
    detail::sparse_auction(p, std::move(free_rows), col4row, ws, parallel_for, abort);
    std::fill(ws.row4col.begin(), ws.row4col.end(), -1);
    free_rows = detail::warm_start(p, col4row, ws);  // only the pairs tight by Dijkstra's arithmetic
  }
  if (interrupted) *interrupted = false;
  for (size_t q = 0; q < free_rows.size(); ++q) {
    if (abort && q % 64 == 0 && __atomic_load_n(abort, __ATOMIC_RELAXED) != 0) {
      if (interrupted) *interrupted = true;
      break;
    }
    if (!detail::sparse_augment(p, free_rows[q], col4row, ws)) return kInfeasible;
  }
  if (auction && !(interrupted && *interrupted)) detail::least_prices(p, top, ws);
  for (int64_t i = 0; i < n; ++i) {
    if (u) u[i] = col4row[i] < 0 ? 0.0 : sign * (ws.c[ws.edge4row[i]] - ws.v[col4row[i]]);
  }
  if (v_out) {
    for (int64_t j = 0; j < m; ++j) v_out[j] = sign * ws.v[j];
  }
  return kSolved;
}

}  // namespace lap
}  // namespace nat
