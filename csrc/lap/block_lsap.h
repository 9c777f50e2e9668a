// Exact linear sum assignment solved by a team of threads that share one problem: a CUDA thread
// block on the GPU, or host threads (or a single one) in the tests. The same source compiles for
// both; only the Team (barrier and reductions, see host_team.h and cuda/team.cuh) differs.
//
// Algorithm: column reduction (square problems), then shortest augmenting paths (Dijkstra) from
// each free row, as in lsap.h, with every sweep over the columns split across the team:
//   - thread r owns the columns j with j % team.size() == r: only it reads or writes v[j], d[j],
//     pred[j] and the saved prices of j, so a Dijkstra step needs no barrier besides the one
//     inside the arg-min reduction;
//   - the reduction carries the winner's price, so no thread reads another thread's column;
//   - row4col and col4row change only in the path flip, done by thread 0 between two barriers.
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

// A column offered to the team-wide arg-min: smallest distance first, then a free column (it
// ends the search), then the lowest index, so every team size picks the same column.
struct Candidate {
  double d;
  double v;  // the column's price, carried so the winner's owner need not be asked
  int64_t j;
  int32_t assigned;
};

NAT_HD inline bool better(const Candidate& a, const Candidate& b) {
  if (a.d != b.d) return a.d < b.d;
  if (a.assigned != b.assigned) return a.assigned < b.assigned;
  return a.j < b.j;
}

NAT_HD inline Candidate no_candidate() {
  return Candidate{std::numeric_limits<double>::infinity(), 0.0, INT64_MAX, 1};
}

// Per-problem state, each array in memory all team threads can reach (global memory on the GPU).
struct BlockState {
  double* v;        // [m] column prices
  double* d;        // [m] Dijkstra distances
  double* saved_v;  // [m] price of a column when it was scanned
  double* saved_d;  // [m] its distance then
  int64_t* pred;    // [m] row that reached column j
  int64_t* row4col; // [m]
  int64_t* col4row; // [n] (the output)
};

template <typename T, bool kMax>
NAT_HD inline double signed_cost(const T* row, int64_t j) {
  const double c = static_cast<double>(row[j]);
  return kMax ? -c : c;
}

// Solves one n x m problem (n <= m). Returns a Status, the same in every thread; for
// kInvalidEntry, *bad_entry is the smallest flat index holding NaN or -inf (+inf when
// maximising). u and v_out (may be null) get the duals of the problem as posed.
template <typename T, bool kMax, class Team>
NAT_HD Status block_lsap(Team& team, int64_t n, int64_t m, const T* cost, BlockState s,
                          double* u, double* v_out, int64_t* bad_entry) {
  const int64_t rank = team.rank(), size = team.size();
  const double inf = std::numeric_limits<double>::infinity();

  // 1. Validate every entry (one strided pass; the smallest bad index wins, for the message).
  int64_t first_bad = INT64_MAX;
  for (int64_t k = rank; k < n * m; k += size) {
    const double c = signed_cost<T, kMax>(cost, k);
    if (c != c || c == -inf) {
      first_bad = k;
      break;
    }
  }
  first_bad = team.min_index(first_bad);
  if (first_bad != INT64_MAX) {
    *bad_entry = first_bad;
    return kInvalidEntry;
  }

  // 2. Initial prices. Square: v[j] = min_i c[i][j] and each column tentatively assigned to its
  // cheapest row. Rectangular: v = 0, which the certificate needs on columns left unassigned.
  for (int64_t j = rank; j < m; j += size) {
    double best = n == m ? inf : 0.0;
    int64_t arg = -1;
    if (n == m) {
      for (int64_t i = 0; i < n; ++i) {
        const double c = signed_cost<T, kMax>(cost + i * m, j);
        if (c < best) {
          best = c;
          arg = i;
        }
      }
    }
    s.v[j] = arg >= 0 || n != m ? best : 0.0;
    s.d[j] = inf;
    s.pred[j] = arg;  // reused as "cheapest row" until the first search overwrites it
    s.row4col[j] = -1;
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

  // 3. Shortest augmenting path from each free row.
  for (int64_t f = 0; f < n; ++f) {
    if (s.col4row[f] >= 0) continue;  // same value in every thread: written before a barrier
    int64_t i = f;
    double base = 0.0;
    Candidate win;
    while (true) {
      const T* row = cost + i * m;
      Candidate local = no_candidate();
      for (int64_t j = rank; j < m; j += size) {
        const double vj = s.v[j];
        if (vj == -inf) continue;  // scanned in this search
        const double h = base + (signed_cost<T, kMax>(row, j) - vj);
        double dj = s.d[j];
        if (h < dj) {
          dj = h;
          s.d[j] = h;
          s.pred[j] = i;
        }
        const Candidate c{dj, vj, j, s.row4col[j] >= 0 ? 1 : 0};
        if (better(c, local)) local = c;
      }
      win = team.argmin(local);
      if (!(win.d < inf)) return kInfeasible;  // nothing reachable: no perfect matching
      if (!win.assigned) break;                      // reached a free column: the sink
      const int64_t jb = win.j;
      if (jb % size == rank) {  // the owner marks it scanned; nobody else touches column jb
        s.saved_v[jb] = win.v;
        s.saved_d[jb] = win.d;
        s.v[jb] = -inf;
      }
      // Row row4col[jb] is reached at distance win.d through its matched column, whose reduced
      // cost is that row's minimum: offset every edge out of it by that.
      i = s.row4col[jb];
      base = win.d - (signed_cost<T, kMax>(cost + i * m, jb) - win.v);
    }
    // Price update of the scanned columns (by their owners) and the path flip (by thread 0).
    for (int64_t j = rank; j < m; j += size) {
      if (s.v[j] == -inf) s.v[j] = s.saved_v[j] + (s.saved_d[j] - win.d);
      s.d[j] = inf;
    }
    if (rank == 0) {
      for (int64_t j = win.j;;) {
        const int64_t r = s.pred[j];
        s.row4col[j] = r;
        const int64_t next = s.col4row[r];
        s.col4row[r] = j;
        if (r == f) break;
        j = next;
      }
    }
    team.sync();
  }

  // 4. Duals of the problem as posed.
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
  return kSolved;
}

}  // namespace lap
}  // namespace nat
