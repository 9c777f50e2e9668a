// Calls the torch-free solver cores directly (the CPU solver, and the GPU solver's algorithm on a
// serial and a threaded host team): brute force on tiny problems, dual certificates on larger ones. Built by CMakeLists.txt and run by ctest in CI.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include <thread>

#include "lap/auction_lsap.h"
#include "lap/block_lsap.h"
#include "lap/host_team.h"
#include "lap/lsap.h"

namespace {

int failures = 0;

int solver_index = 0;  // which solver run_case is checking, for the failure message

void expect(bool ok, const char* what, unsigned seed, int n, int m) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s (solver %d, seed %u, n=%d, m=%d)\n", what, solver_index, seed, n, m);
  }
}

// Minimum over all injective maps rows -> columns, by enumerating column permutations.
double brute_force_min(const std::vector<double>& c, int n, int m) {
  std::vector<int> cols(m);
  std::iota(cols.begin(), cols.end(), 0);
  double best = nat::lap::kInf;
  do {
    double s = 0;
    for (int i = 0; i < n; ++i) s += c[i * m + cols[i]];
    best = std::min(best, s);
  } while (std::next_permutation(cols.begin(), cols.end()));
  return best;
}

// u_i + v_j <= c_ij everywhere, equality on the assignment, unassigned columns priced highest.
bool certificate_holds(const std::vector<double>& c, int n, int m, const std::vector<int64_t>& x,
                       const std::vector<double>& u, const std::vector<double>& v) {
  const double tol = 1e-9;
  std::vector<char> used(m, 0);
  double vmax_assigned = -nat::lap::kInf, vmin_free = nat::lap::kInf;
  for (int i = 0; i < n; ++i) {
    if (x[i] < 0 || x[i] >= m || used[x[i]]) return false;
    used[x[i]] = 1;
    if (std::fabs(u[i] + v[x[i]] - c[i * m + x[i]]) > tol) return false;
    for (int j = 0; j < m; ++j) {
      if (std::isfinite(c[i * m + j]) && u[i] + v[j] > c[i * m + j] + tol) return false;
    }
  }
  for (int j = 0; j < m; ++j) {
    if (used[j]) vmax_assigned = std::max(vmax_assigned, v[j]);
    else vmin_free = std::min(vmin_free, v[j]);
  }
  return vmin_free >= vmax_assigned - tol;
}

enum class Solver { kCpu, kTeamSerial, kTeamThreads, kAuctionSerial, kAuctionThreads };

// The GPU algorithm on host threads (or one), with its state in plain vectors.
nat::lap::Status solve_with_team(int n, int m, const std::vector<double>& c, int threads,
                                 std::vector<int64_t>& x, std::vector<double>& u,
                                 std::vector<double>& v) {
  std::vector<double> w(4 * static_cast<size_t>(m));
  std::vector<int64_t> iw(2 * static_cast<size_t>(m) + n);
  const nat::lap::BlockState s{w.data(), w.data() + m, w.data() + 2 * m, w.data() + 3 * m,
                               iw.data(), iw.data() + m, x.data(), iw.data() + 2 * m};
  int64_t bad = -1;
  if (threads == 1) {
    nat::lap::SerialTeam team;
    return nat::lap::block_lsap<double, false>(team, n, m, c.data(), s, u.data(), v.data(), &bad);
  }
  nat::lap::HostTeamShared shared(threads);
  nat::lap::Status status = nat::lap::kSolved;
  std::vector<std::thread> pool;
  for (int r = 0; r < threads; ++r) {
    pool.emplace_back([&, r] {
      nat::lap::HostThreadTeam team(shared, r, threads);
      const auto st = nat::lap::block_lsap<double, false>(team, n, m, c.data(), s, u.data(), v.data(), &bad);
      if (r == 0) status = st;
    });
  }
  for (auto& t : pool) t.join();
  return status;
}

// A SerialTeam that counts its reductions: the Dijkstra steps of the repair.
struct CountingTeam : nat::lap::SerialTeam {
  int64_t steps = 0;
  template <typename V, typename Merge>
  V reduce(const V& x, Merge) {
    ++steps;
    return x;
  }
};

struct AuctionStats {
  uint64_t rounds = 0, sweeps = 0, free_rows = 0;
  int64_t steps = 0;
};

// The large-problem GPU algorithm (auction prepass on a grid, Dijkstra repair on a team) on host
// threads or one; square problems only.
nat::lap::Status solve_with_auction(int n, const std::vector<double>& c, int threads,
                                    std::vector<int64_t>& x, std::vector<double>& u,
                                    std::vector<double>& v, AuctionStats* stats = nullptr) {
  std::vector<double> w(5 * static_cast<size_t>(n));
  std::vector<int64_t> iw(2 * static_cast<size_t>(n));
  std::vector<uint64_t> keys(n), counters(nat::lap::kNumCounters);
  const nat::lap::AuctionState a{w.data(), w.data() + n, x.data(), iw.data(), keys.data(),
                                 counters.data()};
  const nat::lap::BlockState b = nat::lap::repair_state(a, w.data() + 2 * n, w.data() + 3 * n,
                                                        w.data() + 4 * n, iw.data() + n);
  int64_t bad = -1;
  nat::lap::Status status = nat::lap::kSolved;
  if (threads == 1) {
    nat::lap::SerialGrid grid;
    CountingTeam team;
    status = nat::lap::auction_lsap<double, false>(grid, team, n, c.data(), a, b, u.data(), v.data(), &bad);
    if (stats) *stats = {counters[nat::lap::kRounds], counters[nat::lap::kSweeps], counters[nat::lap::kFreeRows], team.steps};
    return status;
  }
  const int lanes = threads % 2 == 0 ? 2 : 1;  // lane-strided scans, as in a warp
  nat::lap::HostTeamShared shared(threads);
  auto group_shares = nat::lap::make_group_shares(threads, lanes);
  std::vector<std::thread> pool;
  for (int r = 0; r < threads; ++r) {
    pool.emplace_back([&, r] {
      nat::lap::HostThreadGrid grid(shared, *group_shares[r / lanes], r, threads, lanes);
      nat::lap::HostThreadTeam team(shared, r, threads);
      const auto st = nat::lap::auction_lsap<double, false>(grid, team, n, c.data(), a, b, u.data(), v.data(), &bad);
      if (r == 0) status = st;
    });
  }
  for (auto& t : pool) t.join();
  return status;
}

void run_case(unsigned seed, int n, int m, bool integer_costs, bool with_inf, Solver solver) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  std::vector<double> c(static_cast<size_t>(n) * m);
  for (auto& x : c) {
    x = integer_costs ? std::floor(uni(rng) * 4) : uni(rng);
    if (with_inf && uni(rng) < 0.2) x = nat::lap::kInf;
  }
  std::vector<int64_t> x(n);
  std::vector<double> u(n), v(m);
  nat::lap::Workspace ws;
  nat::lap::Status status;
  if (solver == Solver::kCpu) {
    status = nat::lap::solve<double>(n, m, c.data(), false, x.data(), u.data(), v.data(), ws);
  } else if (solver == Solver::kTeamSerial || solver == Solver::kTeamThreads) {
    status = solve_with_team(n, m, c, solver == Solver::kTeamSerial ? 1 : 3, x, u, v);
  } else {
    if (n != m) return;  // the auction solver takes square problems only
    status = solve_with_auction(n, c, solver == Solver::kAuctionSerial ? 1 : 4, x, u, v);
  }
  const double expected = m <= 8 ? brute_force_min(c, n, m) : nat::lap::kInf;
  if (status == nat::lap::Status::kInfeasible) {
    expect(m <= 8 && expected == nat::lap::kInf, "reported infeasible", seed, n, m);
    return;
  }
  expect(certificate_holds(c, n, m, x, u, v), "dual certificate", seed, n, m);
  if (m <= 8) {
    double got = 0;
    for (int i = 0; i < n; ++i) got += c[i * m + x[i]];
    expect(std::fabs(got - expected) <= 1e-9, "brute-force optimum", seed, n, m);
  }
}

// A corrupted state must end in kIterationLimit (or be repaired), never in a hang: the path flip
// on a pred cycle that misses the free row and on indices out of range, and the Dijkstra search
// on matching arrays that disagree, by a serial and a threaded team (ctest's TIMEOUT turns a hang
// into a failure). Returns the number of cases.
int corrupt_state_cases() {
  using nat::lap::BlockState;
  int cases = 0;
  const int n = 4, m = 4;
  std::vector<double> w(4 * m);
  std::vector<int64_t> pred(m), row4col(m), col4row(n), free_rows(n);
  const BlockState s{w.data(), w.data() + m, w.data() + 2 * m, w.data() + 3 * m,
                     pred.data(), row4col.data(), col4row.data(), free_rows.data()};
  // From free row 0 the path reaches column 0, but pred cycles 0 -> row 1 -> column 1 -> row 2 ->
  // column 0 -> row 1 ... without ever reaching row 0.
  pred = {1, 2, 0, 0};
  col4row = {-1, 1, 0, 3};
  expect(!nat::lap::flip_path(s, n, m, 0, 0), "flip_path stops on a pred cycle", 0, n, m);
  ++cases;
  pred = {-1, 0, 0, 0};
  col4row = {-1, 1, 0, 3};
  expect(!nat::lap::flip_path(s, n, m, 0, 0), "flip_path stops on pred = -1", 0, n, m);
  ++cases;
  pred = {1, 0, 0, 0};
  col4row = {-1, 7, 0, 3};
  expect(!nat::lap::flip_path(s, n, m, 0, 0), "flip_path stops on a column out of range", 0, n, m);
  ++cases;
  pred = {1, 0, 0, 0};
  col4row = {-1, 1, 2, 3};
  expect(nat::lap::flip_path(s, n, m, 0, 0) && col4row[0] == 1 && col4row[1] == 0 &&
             row4col[0] == 1 && row4col[1] == 0,
         "flip_path flips a sound path", 0, n, m);
  ++cases;

  // block_augment from matching arrays that disagree (row4col says column j belongs to a row
  // whose col4row points elsewhere, or out of range): kIterationLimit or a certified optimum.
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  for (const int threads : {1, 4}) {
    for (int trial = 0; trial < 40; ++trial) {
      const int size = 6 + trial % 5;
      std::vector<double> c(static_cast<size_t>(size) * size);
      for (auto& e : c) e = uni(rng);
      std::vector<double> ww(4 * size, 0.0);
      std::vector<int64_t> ip(size, -1), ir(size, -1), ic(size, -1), fr(size);
      // Rows 1.. matched to the identity, row 0 free; then one lie in row4col.
      for (int i = 1; i < size; ++i) ic[i] = ir[i] = i;
      ir[trial % size] = trial % 3 == 0 ? size + 3 : (trial + 2) % size;
      for (int j = 0; j < size; ++j) {  // prices that make the identity pairs tight
        ww[j] = c[static_cast<size_t>(j) * size + j];
      }
      const BlockState st{ww.data(), ww.data() + size, ww.data() + 2 * size,
                          ww.data() + 3 * size, ip.data(), ir.data(), ic.data(), fr.data()};
      nat::lap::Status code;
      if (threads == 1) {
        nat::lap::SerialTeam team;
        code = nat::lap::block_augment<double, false>(team, size, size, c.data(), st);
      } else {
        nat::lap::HostTeamShared shared(threads);
        std::vector<nat::lap::Status> codes(threads);
        std::vector<std::thread> pool;
        for (int r = 0; r < threads; ++r) {
          pool.emplace_back([&, r] {
            nat::lap::HostThreadTeam team(shared, r, threads);
            codes[r] = nat::lap::block_augment<double, false>(team, size, size, c.data(), st);
          });
        }
        for (auto& t : pool) t.join();
        code = codes[0];
        for (const auto other : codes) {
          expect(other == code, "every thread returns the same status", trial, size, size);
        }
      }
      bool sound = code == nat::lap::kIterationLimit;
      if (code == nat::lap::kSolved) {  // repaired after all: must be a true assignment
        std::vector<char> used(size, 0);
        sound = true;
        for (int i = 0; i < size; ++i) {
          sound = sound && ic[i] >= 0 && ic[i] < size && !used[ic[i]];
          if (sound) used[ic[i]] = 1;
        }
      }
      expect(sound, "a corrupt matching ends in kIterationLimit or a true assignment", trial, size,
             size);
      ++cases;
    }
  }

  // The auction's hand-off releases non-reciprocal pairs, so the repair starts consistent and
  // ends optimal.
  for (int trial = 0; trial < 20; ++trial) {
    const int size = 8;
    std::vector<double> c(size * size);
    for (auto& e : c) e = uni(rng);
    std::vector<double> v(size, 0.0), scratch(size), d(size), sv(size), sd(size);
    std::vector<int64_t> x(size), r4c(size), keys_storage(size), pr(size);
    std::vector<uint64_t> keys(size), counters(nat::lap::kNumCounters);
    for (int i = 0; i < size; ++i) x[i] = r4c[i] = (i + trial) % size;  // a matching, then lies
    r4c[trial % size] = (trial + 3) % size;
    x[(trial + 5) % size] = trial % 2 ? size + 1 : (trial + 6) % size;
    for (int j = 0; j < size; ++j) {  // column minima: tight for whichever row is cheapest
      v[j] = c[j];
      for (int i = 1; i < size; ++i) v[j] = std::min(v[j], c[i * size + j]);
    }
    const nat::lap::AuctionState a{v.data(), scratch.data(), x.data(), r4c.data(), keys.data(),
                                   counters.data()};
    nat::lap::SerialGrid grid;
    nat::lap::release_unsound_pairs<double, false>(grid, size, c.data(), a);
    bool consistent = true;
    for (int i = 0; i < size; ++i) {
      consistent = consistent && (x[i] < 0 || (x[i] < size && r4c[x[i]] == i));
      consistent = consistent && (r4c[i] < 0 || (r4c[i] < size && x[r4c[i]] == i));
    }
    expect(consistent, "release_unsound_pairs leaves a consistent matching", trial, size, size);
    const nat::lap::BlockState b = nat::lap::repair_state(a, d.data(), sv.data(), sd.data(), pr.data());
    nat::lap::SerialTeam team;
    std::vector<double> u(size), vo(size);
    const auto code = nat::lap::block_augment<double, false>(team, size, size, c.data(), b);
    nat::lap::block_duals<double, false>(team, size, size, c.data(), b, u.data(), vo.data());
    expect(code == nat::lap::kSolved && certificate_holds(c, size, size, x, u, vo),
           "the repair after release_unsound_pairs is optimal", trial, size, size);
    cases += 2;
  }
  return cases;
}

}  // namespace

int main() {
  int cases = 0;
  for (const Solver solver : {Solver::kCpu, Solver::kTeamSerial, Solver::kTeamThreads,
                              Solver::kAuctionSerial, Solver::kAuctionThreads}) {
    solver_index = static_cast<int>(solver);
    unsigned seed = 0;
    for (int n = 0; n <= 7; ++n) {
      for (int m = n; m <= 8; ++m) {
        for (int rep = 0; rep < 20; ++rep, ++cases) {
          run_case(++seed, n, m, rep % 2 == 0, rep % 3 == 0, solver);
        }
      }
    }
    // Host threads meet at a barrier every Dijkstra step: keep their problems small.
    const bool threaded = solver == Solver::kTeamThreads || solver == Solver::kAuctionThreads;
    const bool square = solver == Solver::kAuctionSerial || solver == Solver::kAuctionThreads;
    for (int rep = 0; rep < (threaded ? 10 : 40); ++rep, ++cases) {
      const int n = 20 + 13 * rep, m = square ? n : n + (rep % 3) * 17;
      run_case(++seed, n, m, rep % 2 == 0, rep % 5 == 0, solver);
    }
  }
  // What the auction prepass leaves to the repair, on uniform costs (the figures quoted in
  // auction_lsap.h); each result also checked.
  for (const int n : {256, 1024, 4096}) {
    std::mt19937 rng(n);
    std::uniform_real_distribution<double> uni(0.0, 1.0);
    std::vector<double> c(static_cast<size_t>(n) * n);
    for (auto& e : c) e = uni(rng);
    std::vector<int64_t> x(n);
    std::vector<double> u(n), v(n);
    AuctionStats st;
    const auto status = solve_with_auction(n, c, 1, x, u, v, &st);
    expect(status == nat::lap::kSolved && certificate_holds(c, n, n, x, u, v),
           "auction certificate (uniform)", n, n, n);
    ++cases;
    std::printf("auction n=%d: %llu rounds, %llu Bellman-Ford sweeps, %llu rows left free, %lld "
                "Dijkstra steps\n", n, (unsigned long long)st.rounds, (unsigned long long)st.sweeps,
                (unsigned long long)st.free_rows, (long long)st.steps);
  }
  // The team arg-min's order is total even with NaN distances (an overflow): of two different
  // candidates exactly one is better, so every lane of a butterfly reduction picks the same one.
  {
    const double nan = std::numeric_limits<double>::quiet_NaN(), inf = INFINITY;
    const double ds[] = {nan, -1.0, 0.0, 2.5, inf, -inf};
    std::vector<nat::lap::Candidate> all;
    for (const double d : ds) {
      for (int64_t j = 0; j < 2; ++j) {
        for (int64_t r = -1; r < 1; ++r) all.push_back({d, 0.0, j, r});
      }
    }
    for (const auto& a : all) {
      for (const auto& b : all) {
        const bool same = a.j == b.j && a.r == b.r && (a.d == b.d || (a.d != a.d && b.d != b.d));
        const bool ab = nat::lap::better(a, b), ba = nat::lap::better(b, a);
        expect(same ? !ab && !ba : ab != ba, "better() is a total order (NaN last)", 0, 0, 0);
        ++cases;
      }
    }
    nat::lap::Top2 t = nat::lap::no_top2();
    nat::lap::offer(t, nan, 0.0, 0, -1);
    nat::lap::offer(t, 3.0, 0.0, 1, -1);
    // NaN ranks after everything, even the empty slot's +inf: it is never offered as a column.
    expect(t.j1 == 1 && t.j2 == INT64_MAX, "Top2 ranks a NaN reduced cost last", 0, 0, 0);
    ++cases;
  }
  cases += corrupt_state_cases();
  std::printf("%d passed, %d failed\n", cases - failures, failures);
  return failures == 0 ? 0 : 1;
}
