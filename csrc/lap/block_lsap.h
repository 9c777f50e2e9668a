// Exact linear sum assignment solved by a team of threads that share one problem: a CUDA thread
// block on the GPU, or host threads (or a single one) in the tests. The same source compiles for
// both; only the Team differs (see host_team.h and cuda/team.cuh). A Team provides rank(),
// size(), sync() (a barrier with memory ordering) and reduce(x, merge): merge() folded over every
// thread's x, the result returned to all of them, which also acts as a barrier.
//
// Algorithm, as in lsap.h: column reduction (square problems), augmenting row reduction (two
// bounded passes), then shortest augmenting paths (Dijkstra) from each row still free; every sweep
// over the columns is split across the team:
//   - thread r owns the columns j with j % team.size() == r: only it reads or writes v[j], d[j],
//     pred[j] and the saved prices of j, so a Dijkstra step needs no barrier besides the one
//     inside the arg-min reduction;
//   - the reduction carries the winner's price, so no thread reads another thread's column;
//   - row4col and col4row change only in thread 0's writes (end of a row-reduction step, path
//     flip), followed by a barrier; what the others need of them travels in the reductions.
// Prices and distances are double whatever T is. Duals and status as in lsap.h.
#pragma once

#include <cstdint>
#include <limits>

#include "lap/status.h"

#if defined(__CUDACC__)
#define NAT_HD __host__ __device__
#else
#define NAT_HD
#endif

namespace nat {
namespace lap {

// Distance order with NaN last: a total order, so that every lane of a butterfly reduction picks
// the same winner even if an overflow (finite costs near +-DBL_MAX) made a distance NaN; with
// plain `<` two lanes could disagree and wait on each other forever.
NAT_HD inline bool less_nan_last(double a, double b) { return a < b || (b != b && a == a); }

// A column offered to the team-wide arg-min: smallest distance first, then a free column (it
// ends the search), then the lowest index, so every team size picks the same column.
struct Candidate {
  double d;
  double v;   // the column's price, carried so the winner's owner need not be asked
  int64_t j;
  int64_t r;  // the row the column is assigned to, -1 if free
};

NAT_HD inline bool better(const Candidate& a, const Candidate& b) {
  if (less_nan_last(a.d, b.d)) return true;
  if (less_nan_last(b.d, a.d)) return false;
  if ((a.r < 0) != (b.r < 0)) return a.r < 0;
  return a.j < b.j;
}

NAT_HD inline Candidate no_candidate() {
  return Candidate{std::numeric_limits<double>::infinity(), 0.0, INT64_MAX, 0};
}

// Merge functions for Team::reduce.
struct ArgMin {
  NAT_HD Candidate operator()(const Candidate& a, const Candidate& b) const {
    return better(a, b) ? a : b;
  }
};
struct MinIndex {
  NAT_HD int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};
struct MaxIndex {
  NAT_HD int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

// The two cheapest columns of a row (by reduced cost, then index), for augmenting row reduction,
// with what their owners know of them (read before the reduction's barrier, so no thread reads
// state that thread 0 is about to change).
struct Top2 {
  double u1, v1;  // cheapest reduced cost, and that column's price
  int64_t j1, r1; // the column, and the row it is assigned to (-1: free)
  double u2;
  int64_t j2, r2;
};

NAT_HD inline Top2 no_top2() {
  const double inf = std::numeric_limits<double>::infinity();
  return Top2{inf, 0.0, INT64_MAX, -1, inf, INT64_MAX, -1};
}

NAT_HD inline bool cheaper(double ua, int64_t ja, double ub, int64_t jb) {
  if (less_nan_last(ua, ub)) return true;
  if (less_nan_last(ub, ua)) return false;
  return ja < jb;
}

// Adds column j (reduced cost u, price v, assigned to row r) to a Top2.
NAT_HD inline void offer(Top2& t, double u, double v, int64_t j, int64_t r) {
  if (cheaper(u, j, t.u1, t.j1)) {
    t.u2 = t.u1;
    t.j2 = t.j1;
    t.r2 = t.r1;
    t.u1 = u;
    t.v1 = v;
    t.j1 = j;
    t.r1 = r;
  } else if (cheaper(u, j, t.u2, t.j2)) {
    t.u2 = u;
    t.j2 = j;
    t.r2 = r;
  }
}

struct MergeTop2 {
  NAT_HD Top2 operator()(Top2 a, const Top2& b) const {
    offer(a, b.u1, b.v1, b.j1, b.r1);
    offer(a, b.u2, 0.0, b.j2, b.r2);
    return a;
  }
};

// Per-problem state, each array in memory all team threads can reach (global memory on the GPU).
struct BlockState {
  double* v;        // [m] column prices
  double* d;        // [m] Dijkstra distances
  double* saved_v;  // [m] price of a column when it was scanned
  double* saved_d;  // [m] its distance then
  int64_t* pred;    // [m] row that reached column j
  int64_t* row4col; // [m]
  int64_t* col4row; // [n] (the output)
  int64_t* free_rows; // [n] rows left for augmenting row reduction
};

// Bounds price wars in augmenting row reduction, as kArrStepsPerRow in lsap.h.
constexpr int64_t kTeamArrStepsPerRow = 8;

template <typename T, bool kMax>
NAT_HD inline double signed_cost(const T* row, int64_t j) {
  const double c = static_cast<double>(row[j]);
  return kMax ? -c : c;
}

// Column sweeps take a thread's columns kSweepUnroll at a time, loading all of them before using
// any: a step's latency is then about one round of loads, not one per column (the loads cannot
// be hoisted by the compiler past the stores of the previous column, which might alias).
constexpr int kSweepUnroll = 4;

// What a sweep reads of column j (its distance only with kDist: Dijkstra's sweeps).
struct ColumnView {
  double c, v, d;
  int64_t r;
};

// Calls visit(j, view) for each column j of this thread (j = rank mod size), loading
// kSweepUnroll columns before visiting any of them.
template <typename T, bool kMax, bool kDist, class Visit>
NAT_HD inline void sweep_columns(const T* row, const BlockState& s, int64_t m, int64_t rank,
                                 int64_t size, Visit visit) {
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t j0 = rank; j0 < m; j0 += kSweepUnroll * size) {
    ColumnView cols[kSweepUnroll];
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int k = 0; k < kSweepUnroll; ++k) {
      const int64_t j = j0 + k * size;
      const bool in = j < m;
      cols[k].c = in ? signed_cost<T, kMax>(row, j) : 0.0;
      cols[k].v = in ? s.v[j] : -inf;
      cols[k].d = kDist && in ? s.d[j] : inf;
      cols[k].r = in ? s.row4col[j] : -1;
    }
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int k = 0; k < kSweepUnroll; ++k) {
      if (j0 + k * size < m) visit(j0 + k * size, cols[k]);
    }
  }
}

// Flips the augmenting path that ends at column j (reached from free row f): each column on it
// goes to the row that reached it (pred), each row to its new column. Returns false instead of
// walking on when the arrays disagree: more than n + 1 hops (a pred cycle that misses f) or an
// index out of range. Serial: one thread runs it.
NAT_HD inline bool flip_path(const BlockState& s, int64_t n, int64_t m, int64_t f, int64_t j) {
  for (int64_t hops = 0; hops <= n; ++hops) {
    if (j < 0 || j >= m) return false;
    const int64_t r = s.pred[j];
    if (r < 0 || r >= n) return false;
    s.row4col[j] = r;
    const int64_t next = s.col4row[r];
    s.col4row[r] = j;
    if (r == f) return true;
    j = next;
  }
  return false;
}

// Shortest augmenting paths (Dijkstra) from every row left free, on a state whose matched pairs
// are tight: for a matched row i, c[i][col4row[i]] - v[col4row[i]] is the row's minimum of
// c[i][j] - v[j]. block_lsap reaches that state by row reduction; auction_lsap.h by an auction.
// Every loop is bounded, and every thread takes the same exit: a search that would scan more
// than m columns or reach a row whose column does not point back at it, or a path flip that
// fails, returns
// kIterationLimit from the whole team (the decisions come from reduced values).
template <typename T, bool kMax, class Team>
NAT_HD Status block_augment(Team& team, int64_t n, int64_t m, const T* cost, BlockState s) {
  const int64_t rank = team.rank(), size = team.size();
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t j = rank; j < m; j += size) s.d[j] = inf;
  team.sync();
  for (int64_t f = 0; f < n; ++f) {
    if (s.col4row[f] >= 0) continue;  // same value in every thread: written before a barrier
    int64_t i = f;
    double base = 0.0;
    Candidate win;
    for (int64_t scans = 0;; ++scans) {
      if (scans > m) return kIterationLimit;  // every column scanned, yet no free one reached
      const T* row = cost + i * m;
      Candidate local = no_candidate();
      sweep_columns<T, kMax, true>(row, s, m, rank, size, [&](int64_t j, ColumnView col) {
        if (col.v == -inf) return;  // scanned in this search
        const double h = base + (col.c - col.v);
        if (h < col.d) {
          col.d = h;
          s.d[j] = h;
          s.pred[j] = i;
        }
        const Candidate c{col.d, col.v, j, col.r};
        if (better(c, local)) local = c;
      });
      win = team.reduce(local, ArgMin{});
      if (!(win.d < inf)) return kInfeasible;  // nothing reachable: no perfect matching
      if (win.r < 0) break;                          // reached a free column: the sink
      // row4col and col4row disagree (or point out of range): a corrupt state. col4row is read
      // by every thread alike: only thread 0 writes it, in the flip, before a barrier.
      if (win.r >= n || s.col4row[win.r] != win.j) return kIterationLimit;
      const int64_t jb = win.j;
      if (jb % size == rank) {  // the owner marks it scanned; nobody else touches column jb
        s.saved_v[jb] = win.v;
        s.saved_d[jb] = win.d;
        s.v[jb] = -inf;
      }
      // Row win.r is reached at distance win.d through its matched column, whose reduced cost is
      // that row's minimum: offset every edge out of it by that.
      i = win.r;
      base = win.d - (signed_cost<T, kMax>(cost + i * m, jb) - win.v);
    }
    // Price update of the scanned columns (by their owners) and the path flip (by thread 0).
    for (int64_t j = rank; j < m; j += size) {
      if (s.v[j] == -inf) s.v[j] = s.saved_v[j] + (s.saved_d[j] - win.d);
      s.d[j] = inf;
    }
    const int64_t flip_failed = rank == 0 && !flip_path(s, n, m, f, win.j) ? 1 : 0;
    // Thread 0's verdict to everyone; the reduction is also the barrier after the flip.
    if (team.reduce(flip_failed, MaxIndex{}) != 0) return kIterationLimit;
  }

  return kSolved;
}

// Writes the duals of the problem as posed (either pointer may be null) from a solved state.
template <typename T, bool kMax, class Team>
NAT_HD void block_duals(Team& team, int64_t n, int64_t m, const T* cost, const BlockState& s,
                        double* u, double* v_out) {
  const int64_t rank = team.rank(), size = team.size();
  const double sign = kMax ? -1.0 : 1.0;
  if (u) {
    for (int64_t i = rank; i < n; i += size) {
      const int64_t j = s.col4row[i];
      u[i] = sign * (signed_cost<T, kMax>(cost + i * m, j) - s.v[j]);
    }
  }
  if (v_out) {
    for (int64_t j = rank; j < m; j += size) v_out[j] = sign * s.v[j];
  }
}

// Solves one n x m problem (n <= m). Returns a Status, the same in every thread; for
// kInvalidEntry, *bad_entry is the smallest flat index holding NaN or -inf (+inf when
// maximising). u and v_out (may be null) get the duals of the problem as posed.
template <typename T, bool kMax, class Team>
NAT_HD Status block_lsap(Team& team, int64_t n, int64_t m, const T* cost, BlockState s,
                          double* u, double* v_out, int64_t* bad_entry) {
  const int64_t rank = team.rank(), size = team.size();
  const double inf = std::numeric_limits<double>::infinity();

  // 1. Initial prices, and every entry validated on the way (the smallest bad flat index wins,
  // for the message). Square: v[j] = min_i c[i][j] and each column tentatively assigned to its
  // cheapest row, a pass that reads every entry anyway. Rectangular: v = 0, which the
  // certificate needs on columns left unassigned, and a strided validation pass.
  int64_t first_bad = INT64_MAX;
  for (int64_t j = rank; j < m; j += size) {
    double best = inf;
    int64_t arg = -1;
    for (int64_t i = 0; i < n && n == m; ++i) {
      const double c = signed_cost<T, kMax>(cost + i * m, j);
      if (c != c || c == -inf) {
        first_bad = first_bad < i * m + j ? first_bad : i * m + j;
        break;
      }
      if (c < best) {
        best = c;
        arg = i;
      }
    }
    s.v[j] = arg >= 0 ? best : 0.0;
    s.pred[j] = arg;  // reused as "cheapest row" until the first search overwrites it
    s.row4col[j] = -1;
  }
  for (int64_t k = rank; k < n * m && n != m; k += size) {
    const double c = signed_cost<T, kMax>(cost, k);
    if (c != c || c == -inf) {
      first_bad = k;
      break;
    }
  }
  first_bad = team.reduce(first_bad, MinIndex{});  // also the barrier after the prices
  if (first_bad != INT64_MAX) {
    *bad_entry = first_bad;
    return kInvalidEntry;
  }
  for (int64_t i = rank; i < n; i += size) s.col4row[i] = -1;
  team.sync();
  if (rank == 0 && n == m) {
    // Conflicts go sequentially: a row keeps the first column that chose it.
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = s.pred[j];
      if (i >= 0 && s.col4row[i] < 0) {
        s.col4row[i] = j;
        s.row4col[j] = i;
      }
    }
  }
  team.sync();

  // 2. Augmenting row reduction: each free row takes its cheapest column and lowers that
  // column's price to its second best, evicting the previous owner (retried at once when the
  // price moved, else in the next pass). One barrier a step, the reduction's: every thread knows
  // the evicted row from it, the column's owner updates that column's price and row, and thread 0
  // writes col4row and the deferred rows, which nobody reads before the pass ends.
  int64_t nfree = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (s.col4row[i] < 0) {
      if (rank == 0) s.free_rows[nfree] = i;
      ++nfree;
    }
  }
  team.sync();
  for (int pass = 0; pass < 2 && nfree > 0; ++pass) {
    int64_t k = 0, nnew = 0, steps = 0, retry = -1;
    while (retry >= 0 || k < nfree) {
      ++steps;
      const int64_t i = retry >= 0 ? retry : s.free_rows[k++];
      retry = -1;
      const T* row = cost + i * m;
      Top2 local = no_top2();
      sweep_columns<T, kMax, false>(row, s, m, rank, size, [&](int64_t j, const ColumnView& col) {
        offer(local, col.c - col.v, col.v, j, col.r);
      });
      const Top2 t = team.reduce(local, MergeTop2{});
      if (!(t.u1 < inf)) return kInfeasible;  // row i has no finite entry
      int64_t j1 = t.j1, i0 = t.r1;
      const double v1_new = t.v1 - (t.u2 - t.u1);
      const bool lowers = t.u2 < inf && v1_new < t.v1;  // a move by an infinite amount is none
      bool retry_evicted = false;
      if (steps < kTeamArrStepsPerRow * k) {
        if (lowers) {
          if (j1 % size == rank) s.v[j1] = v1_new;
          retry_evicted = true;
        } else if (i0 >= 0 && t.u2 < inf) {
          j1 = t.j2;  // tie: take the equally cheap second column instead of evicting
          i0 = t.r2;
        }
      }
      if (j1 % size == rank) s.row4col[j1] = i;
      if (rank == 0) {
        s.col4row[i] = j1;
        if (i0 >= 0) s.col4row[i0] = -1;
        if (i0 >= 0 && !retry_evicted) s.free_rows[nnew] = i0;  // a slot already read
      }
      if (i0 >= 0) {
        if (retry_evicted) {
          retry = i0;
        } else {
          ++nnew;
        }
      }
    }
    team.sync();
    nfree = nnew;
  }

  // 3. Shortest augmenting paths, 4. duals.
  const Status code = block_augment<T, kMax>(team, n, m, cost, s);
  if (code == kSolved) block_duals<T, kMax>(team, n, m, cost, s, u, v_out);
  return code;
}


}  // namespace lap
}  // namespace nat
