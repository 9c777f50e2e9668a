// Exact solver for one large square problem on a whole grid of threads (all SMs of a GPU), in
// two parts:
//   1. auction_prepass, on a Grid (every thread of a cooperative launch; host threads in the
//      tests): an epsilon-scaled Jacobi auction (Bertsekas) finds near-optimal prices v and an
//      almost complete matching; Bellman-Ford sweeps then lower v until the matching's pairs are
//      tight (each matched column is its row's minimum of c[i][j] - v[j]); rows that stay
//      untight are unmatched. Nothing here needs to be exact: it only prepares a warm start.
//   2. block_augment (block_lsap.h), on one Team: exact shortest augmenting paths for the rows
//      left free. Dijkstra is exact from any state whose matched pairs are tight, and that is
//      checked with the same double arithmetic Dijkstra uses, so the result is optimal whatever
//      the auction did, and the duals certify it.
// Why this split: measured on the host (tests/cpp/test_lsap.cpp prints it), at n = 4096 the
// auction needs about 700 rounds (two grid barriers each, all rows' scans in parallel) and
// leaves about ten free rows needing a few hundred Dijkstra steps, where the one-block solver
// needs about 79k dependent steps.
//
// A Grid provides rank()/size() over all threads, group()/groups() and lane()/lanes() (a group
// of lanes scans one row: a warp on the GPU), sync() (grid barrier with memory ordering),
// group_reduce(x, merge), atomic_min / atomic_add on uint64_t, and load() of a uint64_t that
// other threads update atomically.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "lap/block_lsap.h"

namespace nat {
namespace lap {

// Doubles mapped to uint64 so that integer order is numeric order (for atomic min).
NAT_HD inline uint64_t order_key(double x) {
  uint64_t b;
  memcpy(&b, &x, sizeof b);
  return (b >> 63) ? ~b : b | (uint64_t{1} << 63);
}

NAT_HD inline double from_order_key(uint64_t k) {
  const uint64_t b = (k >> 63) ? k & ~(uint64_t{1} << 63) : ~k;
  double x;
  memcpy(&x, &b, sizeof x);
  return x;
}

// Shared counters of the prepass (uint64 for the atomics), and its statistics.
enum AuctionCounter : int {
  kMatched,       // rows matched in the current auction phase
  kBadEntry,      // smallest flat index of a NaN / -inf entry (UINT64_MAX: none)
  kEmptyRow,      // a row with no finite entry (UINT64_MAX: none)
  kCostMin,       // order_key of the smallest finite (signed) cost
  kCostMax,       // ... and of the largest
  kChanged,       // three flags, by Bellman-Ford sweep mod 3 (one is reset while no thread
  kChanged1,      // can still be reading it)
  kChanged2,
  kRounds,        // statistics: auction rounds, Bellman-Ford sweeps, rows unmatched at the end
  kSweeps,
  kFreeRows,
  kNumCounters
};

struct AuctionState {
  double* v;           // [n] prices, in block_lsap's convention (reduced cost c[i][j] - v[j])
  double* u;           // [n] scratch: each matched row's c[i][col] - v[col]
  int64_t* col4row;    // [n]
  int64_t* row4col;    // [n]
  uint64_t* keys;      // [n] the best bid a column got this round; column minima when sweeping
  uint64_t* counters;  // [kNumCounters]
};

constexpr uint64_t kNoKey = UINT64_MAX;

struct MinDouble {
  NAT_HD double operator()(double a, double b) const { return a < b ? a : b; }
};
struct MaxDouble {
  NAT_HD double operator()(double a, double b) const { return a > b ? a : b; }
};
// Epsilon goes from range/64 down by a factor of 4 each phase, to range / (n * 2^22). Starting at
// range/64 rather than range/4 took 20-40% fewer rounds on the host (n = 1024, 2048, 4096, 4
// seeds, uniform and dot-product costs); range/1024 left longer repairs on dot-product costs.
constexpr double kFirstEpsilonDivisor = 64.0;
constexpr double kEpsilonFactor = 4.0;
constexpr int kFinalEpsilonLog2 = 22;
// A phase ends once at most n / kStopDivisor rows are unmatched: the long tail of a Jacobi
// auction is a price war among few rows, which Dijkstra settles in fewer steps. 256 was chosen
// on the host over 128 and 512 (n = 2048 and 4096, 4-6 seeds, uniform and dot-product costs)
// by a latency model of 4 us a round, 1.5 us a Dijkstra step and 40 us a sweep: means 3.3 ms
// against 4.1 ms (128) and 5.1 ms (512) at n = 4096 (docs/benchmarks.md has the table). The
// model is a guess until a GPU measures.
constexpr int64_t kStopDivisor = 256;
constexpr int kMaxSweeps = 64;

// The hand-off to the repair: keeps a matched pair only if it is reciprocal (col4row and row4col
// point at each other, indices in range) and tight by Dijkstra's own arithmetic, so block_augment
// starts from a consistent matching whatever the auction's stores did. Rows first (each row's
// group decides its row), then columns (a column whose row does not point back is freed).
template <typename T, bool kMax, class Grid>
NAT_HD void release_unsound_pairs(Grid& g, int64_t n, const T* cost, const AuctionState& s) {
  const int64_t rank = g.rank(), size = g.size();
  const int64_t group = g.group(), groups = g.groups(), lane = g.lane(), lanes = g.lanes();
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t i = group; i < n; i += groups) {
    const int64_t j = s.col4row[i];
    if (j < 0) continue;  // the same in every lane of the group
    if (j >= n || s.row4col[j] != i) {
      if (lane == 0) s.col4row[i] = -1;
      continue;
    }
    const T* row = cost + i * n;
    const double own = signed_cost<T, kMax>(row, j) - s.v[j];
    double lowest = inf;
    for (int64_t k = lane; k < n; k += lanes) {
      const double c = signed_cost<T, kMax>(row, k) - s.v[k];
      lowest = c < lowest ? c : lowest;
    }
    lowest = g.group_reduce(lowest, MinDouble{});
    if (lane == 0 && (lowest < own || !(own < inf))) s.col4row[i] = -1;
  }
  g.sync();
  for (int64_t j = rank; j < n; j += size) {
    const int64_t i = s.row4col[j];
    if (i >= 0 && (i >= n || s.col4row[i] != j)) s.row4col[j] = -1;
  }
  g.sync();
}

// The prepass for a square n x n problem. Returns kInvalidEntry (with *bad_entry), kInfeasible
// for a row without a finite entry, else kSolved with the state ready for block_augment: v set,
// matched pairs tight, the rest free. The same value in every thread.
template <typename T, bool kMax, class Grid>
NAT_HD Status auction_prepass(Grid& g, int64_t n, const T* cost, AuctionState s,
                              int64_t* bad_entry) {
  const int64_t rank = g.rank(), size = g.size();
  const int64_t group = g.group(), groups = g.groups(), lane = g.lane(), lanes = g.lanes();
  const double inf = std::numeric_limits<double>::infinity();
  uint64_t* counter = s.counters;
  if (n == 0) return kSolved;

  for (int64_t j = rank; j < n; j += size) {
    s.v[j] = 0.0;
    s.keys[j] = kNoKey;
    s.row4col[j] = -1;
    s.col4row[j] = -1;
  }
  if (rank == 0) {
    for (int k = 0; k < kNumCounters; ++k) counter[k] = 0;
    counter[kBadEntry] = counter[kEmptyRow] = kNoKey;
    counter[kCostMin] = order_key(inf);
    counter[kCostMax] = ~order_key(-inf);
  }
  g.sync();

  // Validation, a row per group: NaN / -inf entries, rows with no finite entry, cost range.
  for (int64_t i = group; i < n; i += groups) {
    const T* row = cost + i * n;
    int64_t bad = INT64_MAX;
    double lo = inf, hi = -inf;
    for (int64_t j = lane; j < n; j += lanes) {
      const double c = signed_cost<T, kMax>(row, j);
      if (c != c || c == -inf) {
        bad = bad < j ? bad : j;
      } else if (c != inf) {
        lo = c < lo ? c : lo;
        hi = c > hi ? c : hi;
      }
    }
    bad = g.group_reduce(bad, MinIndex{});
    lo = g.group_reduce(lo, MinDouble{});
    hi = g.group_reduce(hi, MaxDouble{});
    if (lane == 0) {
      if (bad != INT64_MAX) g.atomic_min(&counter[kBadEntry], uint64_t(i * n + bad));
      if (!(lo < inf)) g.atomic_min(&counter[kEmptyRow], uint64_t(i));
      g.atomic_min(&counter[kCostMin], order_key(lo));
      g.atomic_min(&counter[kCostMax], ~order_key(hi));  // min of the complement: the max
    }
  }
  g.sync();
  if (g.load(&counter[kBadEntry]) != kNoKey) {
    *bad_entry = static_cast<int64_t>(g.load(&counter[kBadEntry]));
    return kInvalidEntry;
  }
  if (g.load(&counter[kEmptyRow]) != kNoKey) return kInfeasible;
  const double lowest_cost = from_order_key(g.load(&counter[kCostMin]));
  const double highest_cost = from_order_key(~g.load(&counter[kCostMax]));
  const double range = highest_cost - lowest_cost;
  // Prices move by a few times the range, so away from the limits of double the auction's
  // arithmetic neither overflows nor underflows. Near them, or when all finite costs are equal
  // (any matching is optimal), it is skipped: the repair alone is exact from v = 0.
  const bool run_auction = range > 0x1p-900 && fmax(fabs(lowest_cost), fabs(highest_cost)) <= 0x1p900;

  // The bid key: the new price rounded up (in key order) to clear the low bits, which hold the
  // bidder's row, so one atomic min picks the lowest price and its bidder together.
  int index_bits = 1;
  while ((int64_t{1} << index_bits) < n) ++index_bits;
  const uint64_t index_mask = (uint64_t{1} << index_bits) - 1;

  const double final_eps = ldexp(range, -kFinalEpsilonLog2) / static_cast<double>(n);
  double eps = range / kFirstEpsilonDivisor;
  const int64_t stop_free = n / kStopDivisor;
  // Ends price wars (infeasible problems, heavy ties); what is matched then goes to the repair.
  const int64_t round_budget = n + 2000;
  int64_t rounds = 0;
  int sweeps = 0;
  for (bool last = !run_auction; !last; eps = fmax(eps / kEpsilonFactor, final_eps)) {
    if (rounds >= round_budget) break;
    last = eps <= final_eps;
    // Each phase starts unmatched, keeping the prices.
    for (int64_t j = rank; j < n; j += size) {
      s.row4col[j] = -1;
      s.col4row[j] = -1;
    }
    g.sync();
    if (rank == 0) counter[kMatched] = 0;
    g.sync();
    while (static_cast<int64_t>(g.load(&counter[kMatched])) < n - stop_free &&
           rounds < round_budget) {
      ++rounds;
      // Bids: every free row offers its cheapest column the price that makes it as cheap as the
      // row's second choice, minus eps.
      for (int64_t i = group; i < n; i += groups) {
        if (s.col4row[i] >= 0) continue;
        const T* row = cost + i * n;
        Top2 t = no_top2();
        for (int64_t j = lane; j < n; j += lanes) {
          offer(t, signed_cost<T, kMax>(row, j) - s.v[j], 0.0, j, -1);
        }
        t = g.group_reduce(t, MergeTop2{});
        if (lane == 0 && t.u1 < inf) {
          const double v1 = s.v[t.j1];
          // eps at least a few ulps of the price, so the rounded bid still lowers it.
          const double step = fmax(eps, ldexp(fabs(v1), index_bits + 3 - 52));
          const double gap = t.u2 < inf ? t.u2 - t.u1 : 0.0;
          const uint64_t price = (order_key(v1 - gap - step) + index_mask) & ~index_mask;
          g.atomic_min(&s.keys[t.j1], price | uint64_t(i));
        }
      }
      g.sync();
      // Each column with bids goes to the lowest price; its previous row becomes free.
      for (int64_t j = rank; j < n; j += size) {
        const uint64_t key = s.keys[j];
        if (key == kNoKey) continue;
        s.keys[j] = kNoKey;
        const int64_t i = static_cast<int64_t>(key & index_mask);
        const int64_t old = s.row4col[j];
        if (old >= 0) {
          s.col4row[old] = -1;
        } else {
          g.atomic_add(&counter[kMatched], 1);
        }
        s.row4col[j] = i;
        s.col4row[i] = j;
        s.v[j] = from_order_key(key & ~index_mask);
      }
      g.sync();
    }
  }

  // Bellman-Ford: v[j] = min(v[j], min over matched rows i of c[i][j] - u[i]) until nothing
  // moves (the matched pairs are then tight if the matching is optimal among its rows). A column
  // minimum is split over row chunks so that every thread has work.
  const int64_t chunks = size / n > 0 ? size / n : 1;
  const int64_t chunk_rows = (n + chunks - 1) / chunks;
  for (int sweep = 0; run_auction && sweep < kMaxSweeps; ++sweep) {
    ++sweeps;
    uint64_t* changed = &counter[kChanged + sweep % 3];
    for (int64_t i = rank; i < n; i += size) {
      const int64_t j = s.col4row[i];
      s.u[i] = j >= 0 ? signed_cost<T, kMax>(cost + i * n, j) - s.v[j] : inf;
      s.keys[i] = order_key(s.v[i]);
    }
    if (rank == 0) counter[kChanged + (sweep + 1) % 3] = 0;  // the next sweep's flag
    g.sync();
    for (int64_t w = rank; w < n * chunks; w += size) {
      const int64_t j = w % n, first = (w / n) * chunk_rows;
      const int64_t end = first + chunk_rows < n ? first + chunk_rows : n;
      double lowest = inf;
      for (int64_t i = first; i < end; ++i) {
        if (s.u[i] == inf) continue;  // a free row bounds nothing
        const double c = signed_cost<T, kMax>(cost + i * n, j) - s.u[i];
        lowest = c < lowest ? c : lowest;
      }
      if (lowest < s.v[j] && lowest > -inf) g.atomic_min(&s.keys[j], order_key(lowest));
    }
    g.sync();
    for (int64_t j = rank; j < n; j += size) {
      const double lowered = from_order_key(s.keys[j]);
      if (lowered < s.v[j]) {
        s.v[j] = lowered;
        g.atomic_add(changed, 1);
      }
    }
    g.sync();
    if (g.load(changed) == 0) break;
  }

  release_unsound_pairs<T, kMax>(g, n, cost, s);
  if (rank == 0) {
    int64_t free_rows = 0;
    for (int64_t i = 0; i < n; ++i) free_rows += s.col4row[i] < 0;
    counter[kRounds] = static_cast<uint64_t>(rounds);
    counter[kSweeps] = static_cast<uint64_t>(sweeps);
    counter[kFreeRows] = static_cast<uint64_t>(free_rows);
  }
  return kSolved;
}

// The Dijkstra state of the repair, on the auction's arrays plus its own (free_rows unused).
NAT_HD inline BlockState repair_state(const AuctionState& a, double* d, double* saved_v, double* saved_d,
                               int64_t* pred) {
  return BlockState{a.v, d, saved_v, saved_d, pred, a.row4col, a.col4row, nullptr};
}

// Both parts on threads that form a Grid and a Team at once (the host runs; the GPU launches
// the two parts as separate kernels). u and v_out as in block_lsap.
template <typename T, bool kMax, class Grid, class Team>
NAT_HD Status auction_lsap(Grid& g, Team& team, int64_t n, const T* cost, const AuctionState& a,
                           const BlockState& b, double* u, double* v_out, int64_t* bad_entry) {
  Status code = auction_prepass<T, kMax>(g, n, cost, a, bad_entry);
  if (code != kSolved) return code;
  code = block_augment<T, kMax>(team, n, n, cost, b);
  if (code == kSolved) block_duals<T, kMax>(team, n, n, cost, b, u, v_out);
  return code;
}

}  // namespace lap
}  // namespace nat
