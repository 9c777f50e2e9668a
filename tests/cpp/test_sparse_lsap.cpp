// The sparse solver core (lap/sparse_lsap.h) on its own, no torch: random sparse problems against
// the dense solver (lap/lsap.h, missing edges as +inf), cold and warm from random matchings and
// prices, with the certificate checked over the edges (and, without given prices, the least
// prices against Bellman-Ford); the auction's bids on three threads give
// the same matching as on one; and infeasibility. Built by CMakeLists.txt
// and run by ctest.
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <thread>
#include <vector>

#include "lap/lsap.h"
#include "lap/sparse_lsap.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, unsigned seed, bool warm) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s (seed %u, %s)\n", what, seed, warm ? "warm" : "cold");
  }
}

// The kernel's at::parallel_for, on plain threads (as there, short ranges run inline).
const nat::lap::detail::ParallelFor three_threads =
    [](int64_t count, const std::function<void(int64_t, int64_t)>& body) {
      if (count < 64) return body(0, count);
      std::vector<std::thread> pool;
      for (int64_t k = 0; k < 3; ++k) {
        const int64_t b = count * k / 3, e = count * (k + 1) / 3;
        if (b < e) pool.emplace_back(body, b, e);
      }
      for (std::thread& t : pool) t.join();
    };

struct Csr {
  int64_t n, m;
  std::vector<int64_t> crow, col;
  std::vector<double> cost;
};

// Row i gets a hidden perfect matching's edge (so it is feasible) and `degree` random ones;
// costs small integers (many ties) or, with `real`, uniform doubles.
Csr random_csr(std::mt19937& rng, int64_t n, int64_t m, int degree, bool real = false) {
  Csr p{n, m, {0}, {}, {}};
  std::vector<int64_t> perm(m);
  for (int64_t j = 0; j < m; ++j) perm[j] = j;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::uniform_int_distribution<int64_t> pick(0, m - 1);
  std::uniform_int_distribution<int> small(0, 9);
  std::uniform_real_distribution<double> uniform(-1.0, 1.0);
  auto draw = [&]() { return real ? uniform(rng) : static_cast<double>(small(rng)); };
  for (int64_t i = 0; i < n; ++i) {
    p.col.push_back(perm[i]);
    p.cost.push_back(draw());
    for (int e = 0; e < degree; ++e) {
      p.col.push_back(pick(rng));
      p.cost.push_back(draw());
    }
    p.crow.push_back(static_cast<int64_t>(p.col.size()));
  }
  return p;
}

// u_i + v_j <= c on every edge, equality on the pairs; free columns at 0, the others <= 0 (not
// checked for square problems warm from given prices, which keep their offset).
bool certificate_holds(const Csr& p, const std::vector<int64_t>& x, const std::vector<double>& u,
                       const std::vector<double>& v, bool priced) {
  const double tol = 1e-9;
  std::vector<char> used(p.m, 0);
  for (int64_t i = 0; i < p.n; ++i) {
    if (x[i] < 0 || x[i] >= p.m || used[x[i]]) return false;
    used[x[i]] = 1;
    bool tight = false;
    for (int64_t e = p.crow[i]; e < p.crow[i + 1]; ++e) {
      if (u[i] + v[p.col[e]] > p.cost[e] + tol) return false;
      tight |= p.col[e] == x[i] && std::fabs(u[i] + v[x[i]] - p.cost[e]) <= tol;
    }
    if (!tight) return false;
  }
  for (int64_t j = 0; priced && j < p.m; ++j) {
    if (v[j] > tol || (!used[j] && std::fabs(v[j]) > tol)) return false;
  }
  return true;
}

// Small cases (5-44 rows, integer costs); from seed 300 on, 1,500-2,500 rows with real costs, where
// the auction runs several phases and leaves rows to Dijkstra.
// The greatest prices v <= 0 under which every matched pair stays its row's minimum, by
// Bellman-Ford from v = 0 (a cold solve starts with the auction and must return these, whichever
// path found its matching).
std::vector<double> least_prices_reference(const Csr& p, const std::vector<int64_t>& x) {
  std::vector<double> v(p.m, 0.0), own(p.n);
  for (bool changed = true; changed;) {
    changed = false;
    for (int64_t i = 0; i < p.n; ++i) {
      double pair = nat::lap::kInf;  // the cheapest edge (i, x[i])
      for (int64_t e = p.crow[i]; e < p.crow[i + 1]; ++e) {
        if (p.col[e] == x[i]) pair = std::min(pair, p.cost[e]);
      }
      for (int64_t e = p.crow[i]; e < p.crow[i + 1]; ++e) {
        const double bound = p.cost[e] - pair + v[x[i]];
        if (bound < v[p.col[e]] - 1e-12) {
          v[p.col[e]] = bound;
          changed = true;
        }
      }
    }
  }
  return v;
}

void run_case(unsigned seed) {
  std::mt19937 rng(seed);
  const bool large = seed >= 300;
  const int64_t n = large ? 1500 + 100 * (seed % 11) : 5 + seed % 40;
  const int64_t m = n + (seed % 3) * (seed % 7) * (large ? 20 : 1);
  const Csr p = random_csr(rng, n, m, large ? 4 + seed % 9 : 1 + seed % 4, large);
  std::vector<double> dense(n * m, nat::lap::kInf);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t e = p.crow[i]; e < p.crow[i + 1]; ++e) {
      double& c = dense[i * m + p.col[e]];
      c = std::min(c, p.cost[e]);
    }
  }
  std::vector<int64_t> xd(n);
  nat::lap::Workspace dws;
  nat::lap::solve(n, m, dense.data(), false, xd.data(), nullptr, nullptr, dws);
  double optimum = 0;
  for (int64_t i = 0; i < n; ++i) optimum += dense[i * m + xd[i]];

  const nat::lap::SparseProblem sp{n, m, p.crow.data(), p.col.data(), p.cost.data()};
  for (const bool warm : {false, true}) {
    std::vector<int64_t> x(n, -1);
    std::vector<double> u(n), v(m), v0(m);
    if (warm) {  // a random partial matching and random prices
      std::vector<int64_t> perm(m);
      for (int64_t j = 0; j < m; ++j) perm[j] = j;
      std::shuffle(perm.begin(), perm.end(), rng);
      std::normal_distribution<double> normal;
      for (int64_t i = 0; i < n; ++i) x[i] = i % 3 ? perm[i] : -1;
      for (int64_t j = 0; j < m; ++j) v0[j] = normal(rng);
    }
    const std::vector<int64_t> x_start = x;
    nat::lap::SparseWorkspace ws;
    // even seeds warm from a matching alone (the auction runs), odd ones with prices too
    const double* prices = warm && seed % 2 ? v0.data() : nullptr;
    const nat::lap::Status st = nat::lap::sparse_solve(sp, false, warm, prices, x.data(), u.data(),
                                                       v.data(), ws);
    expect(st == nat::lap::kSolved, "solved", seed, warm);
    if (st != nat::lap::kSolved) continue;
    double got = 0;
    for (int64_t i = 0; i < n; ++i) got += dense[i * m + x[i]];
    expect(std::fabs(got - optimum) <= 1e-9, "same optimum as the dense solver", seed, warm);
    expect(certificate_holds(p, x, u, v, m > n || !prices), "certificate", seed, warm);
    if (!prices) {
      const std::vector<double> least = least_prices_reference(p, x);
      bool same = true;
      for (int64_t j = 0; j < m; ++j) same &= std::fabs(least[j] - v[j]) <= 1e-9;
      expect(same, "a solve without prices returns the least prices", seed, warm);
    }
    std::vector<int64_t> x3 = x;
    if (warm) {
      for (int64_t i = 0; i < n; ++i) x3[i] = x_start[i];
    }
    std::vector<double> u3(n), v3(m);
    nat::lap::SparseWorkspace ws3;
    nat::lap::sparse_solve(sp, false, warm, prices, x3.data(), u3.data(), v3.data(), ws3, nullptr,
                           nullptr, three_threads);
    expect(x3 == x && u3 == u && v3 == v, "three threads give the one-thread solve", seed, warm);
  }
}

void infeasible_case() {
  // rows 0 and 1 can only take column 0
  const std::vector<int64_t> crow{0, 1, 2, 4}, col{0, 0, 1, 2};
  const std::vector<double> cost{1, 2, 3, 4};
  const nat::lap::SparseProblem sp{3, 3, crow.data(), col.data(), cost.data()};
  std::vector<int64_t> x(3);
  std::vector<double> u(3), v(3);
  nat::lap::SparseWorkspace ws;
  expect(nat::lap::sparse_solve(sp, false, false, nullptr, x.data(), u.data(), v.data(), ws) ==
             nat::lap::kInfeasible,
         "infeasible detected", 0, false);
}

}  // namespace

int main() {
  for (unsigned seed = 0; seed < 330; ++seed) run_case(seed);
  infeasible_case();
  std::printf("%s: %d failures\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
