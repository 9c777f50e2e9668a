"""The GPU check's budget, in one place: the timing model of each stage, the stage table that
scripts/gpu_check.sh runs under (the same code for a real run and for --dry-run), each stage's
NAT_CUDA_TIMEOUT_S deadline, and the fitting of a stage's selection to its limit (gpu_smoke.py's
cases, the tests stage's pytest items). Imports nothing heavy: the shell calls it in 0.05 s.

    python3 scripts/gpu_plan.py plan                      # every stage, a current wheel carried
    python3 scripts/gpu_plan.py plan --stages "env install build smoke-jv summary"
    python3 scripts/gpu_plan.py deadline racecheck 71     # the stage's NAT_CUDA_TIMEOUT_S
    python3 scripts/gpu_plan.py bench-skip 40 block_auction   # assign_bench.py's --skip

Every figure below is an estimate for one H100 or H200 (no GPU has run this project yet), except
the build's, which come from this project's CPU machine; the first GPU run prints the start-up
and case times that replace them (summary.txt: `startup:` lines, smoke's per-case ms, pytest's
--durations). A stage is given what its selection is modelled to need (its want), in the order
of value, and a stage given less than its want selects less (gpu_smoke.py: a prefix of its cases;
the tests: the smallest case of each test first).
"""

import argparse
import math
import sys

BUDGET_S = 500  # of a task's 900 s: a machine start (60-120 s), then a rerun with a new start (120 s,
# env and install 50 s, about 100 s of stages) still fit
GRACE_S = 5  # stage(): the signal this long before the limit, the kill at it (1 s under 15 s)
SAFETY = 1.5  # on every modelled work time: the figures are guesses until a GPU measures them
# Start-up before the first case: python3, import torch and nat_ext, the CUDA context on a fresh
# machine (the review behind issue 28 warns a cold one may pass 15 s); under a tool, the tool's
# attach and its instrumentation of torch's modules on top.
COLD_S = {"plain": 15, "synccheck": 30, "racecheck": 30, "memcheck": 30, "ncu": 25}
# How much slower a kernel runs under each tool (the host references do not slow down).
SLOWDOWN = {"synccheck": 10, "racecheck": 30, "memcheck": 15}
DEADLINE_CAP_S = 20  # a legitimate wait is well under a second on the GPU (4096x4096: ~0.1 s)

# gpu_smoke.py's cases by path: (host seconds, GPU seconds) each, the host part being the
# reference runs a case checks against (certificate, host team run). gpu_smoke.py checks at start
# that its case lists and these agree, so a case added there must be costed here.
SMOKE = {
    "jv": {"jv_one_warp": (0.3, 0.05), "jv_multi_warp": (0.8, 0.1), "jv_global_by_size": (2.5, 0.3),
           "jv_global_by_batch": (0.8, 0.1), "nat_b1": (0.5, 0.05), "ex_jv": (0.4, 0.05)},
    "block_auction": {"auction_small": (0.8, 0.1), "ex_auction": (0.4, 0.05)},
    "coop_auction": {"auction_1100": (1.5, 0.2), "auction_4096": (14.0, 0.5), "ex_coop": (3.0, 0.3)},
}
SMALL = {  # gpu_smoke.py --small: for the sanitizers, the cooperative auction last
    "jv": {"jv_one_warp": (0.3, 0.05), "jv_multi_warp_small": (0.3, 0.1),
           "jv_global_by_batch_small": (0.5, 0.05), "nat_small": (0.2, 0.05), "ex_jv": (0.4, 0.05)},
    "block_auction": {"auction_small": (0.8, 0.1), "ex_auction": (0.4, 0.05)},
    "coop_auction": {"auction_1100": (1.5, 0.2)},
}
PROFILE = {"nat_b1": 3.0, "auction_4096": 8.0}  # ncu: each profiled kernel replayed per section

# benchmarks/assign_bench.py --device cuda, seconds a row group (GPU rows 10 repeats, CPU rows
# once); the rows a reduced bench leaves out first come last (see bench_skip).
BENCH_S = {"nat step (assign cases)": 6.0, "batch 256x256x256": 8.0, "batch 64x1024x1024": 20.0,
           "4096x4096": 15.0}
BENCH_DROP = [("4096x4096", r"^4096x4096 .*: (nat cpu|scipy)"),  # its CPU rows: 1 call, ~15 s
              ("batch 64x1024x1024", r"^batch 64x1024x1024")]

# The tests stage (pytest -m cuda on the op tests): about 420 CUDA cases, 18 opcheck calls and 3
# torch.compile calls when issue 28 was written; the plugin fits the real selection to the limit.
TEST_CASE_S = 0.15  # a small CUDA case: a few launches, the CPU op or scipy as the reference
TEST_PER_MCELL_S = 0.25  # plus this per million cost cells (the CPU reference dominates)
TEST_OPCHECK_S = 2.0
TEST_COMPILE_S, TEST_COMPILE_COLD_S = 5.0, 30.0  # the first compile starts Inductor's workers
TESTS_EXPECTED = (420, 18, 3, 40)  # cases, opchecks, compiles, million cells in all

# The build from source when no current wheel is carried: a model of a 16-job build from what
# this project's 2-core machine measured (docs/gpu_check.md, 2026-12-03): the wheel in 687 s at
# MAX_JOBS=1, 11 compile units, the .cu file alone about 65 s. 16 jobs hold all 11 units in one
# wave, so the build takes its longest unit: taken as 1.5x the mean unit (62 s), above the
# .cu's 65 s, for the spread between units and the device's unknown CPU. Then the link, the
# setup.py start, and check_build.py's cold start.
BUILD_SERIAL_S, BUILD_UNITS, BUILD_JOBS, BUILD_LONGEST_UNIT_S = 687, 11, 16, 65
BUILD_SETUP_S, BUILD_LINK_S = 10, 5


def build_seconds() -> int:
    mean = BUILD_SERIAL_S / BUILD_UNITS
    waves = math.ceil(BUILD_UNITS / BUILD_JOBS)
    compile_s = waves * max(BUILD_LONGEST_UNIT_S, 1.5 * mean)
    return math.ceil(BUILD_SETUP_S + compile_s + BUILD_LINK_S + COLD_S["plain"] + 5 + GRACE_S)


def case_seconds(cost: tuple[float, float], tool: str = "plain") -> float:
    host, gpu = cost
    return host + gpu * SLOWDOWN.get(tool, 1)


def stage_cases(stage: str) -> tuple[dict, str]:
    """The cases a smoke-style stage runs (all paths for the tools), and its tool."""
    if stage.startswith("smoke-"):
        return SMOKE[stage[len("smoke-"):].replace("-", "_")], "plain"
    if stage in SLOWDOWN:
        return {k: v for path in SMALL.values() for k, v in path.items()}, stage
    raise KeyError(stage)


def need(work_s: float, cold: str = "plain") -> int:
    """A stage limit that holds `work_s` of modelled work after the start-up and the grace."""
    return math.ceil(GRACE_S + COLD_S[cold] + SAFETY * work_s)


def allowance(limit: float, cold: str = "plain") -> float:
    """The inverse of need(): the modelled work a stage limit holds."""
    return max(0.0, (limit - GRACE_S - COLD_S[cold]) / SAFETY)


def tests_work(cases: int, opchecks: int, compiles: int, mcells: float) -> float:
    return (cases * TEST_CASE_S + mcells * TEST_PER_MCELL_S + opchecks * TEST_OPCHECK_S
            + compiles * TEST_COMPILE_S + (TEST_COMPILE_COLD_S if compiles else 0))


def wants() -> dict[str, tuple[int, int]]:
    """Every stage's (want, least useful limit), in seconds: the want runs its whole selection,
    the least a reduced one (the first case; the NAT step rows; a tenth of the tests)."""
    w = {"env": (10, 10), "peers": (10, 10), "install": (need(5), need(5)), "build": (build_seconds(),) * 2,
         "summary": (5, 5)}
    for path in SMOKE:
        stage = "smoke-" + path.replace("_", "-")
        costs = [case_seconds(c) for c in SMOKE[path].values()]
        w[stage] = (need(sum(costs)), need(costs[0]))
    for tool in SLOWDOWN:
        costs = [case_seconds(c, tool) for c in stage_cases(tool)[0].values()]
        w[tool] = (need(sum(costs), tool), need(sum(costs[:2]), tool))
    w["bench"] = (need(sum(BENCH_S.values())), need(BENCH_S["nat step (assign cases)"]))
    cases, opchecks, compiles, mcells = TESTS_EXPECTED
    w["tests"] = (need(tests_work(cases, opchecks, compiles, mcells)), need(tests_work(cases // 10, 0, 0, 1)))
    w["ncu"] = (need(sum(PROFILE.values()), "ncu"), need(PROFILE["nat_b1"], "ncu"))
    return w


RUN_ORDER = ["env", "peers", "install", "build", "smoke-jv", "smoke-block-auction", "smoke-coop-auction",
             "synccheck", "racecheck", "memcheck", "bench", "tests", "ncu", "summary"]
FIXED = ["env", "peers", "install", "build", "summary"]  # these get their want or the run cannot start
# The rest by value: every path's smoke and the sanitizers before the benchmark, the benchmark
# before the full tests, the profile last.
VALUE_ORDER = ["smoke-jv", "smoke-block-auction", "smoke-coop-auction", "synccheck", "racecheck",
               "memcheck", "bench", "tests", "ncu"]


def plan(budget: int, stages: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Limits for `stages` within `budget`: the fixed stages their want, then the others in the
    order of value, each its want or what is left if that still holds its least useful limit (a
    reduced selection), else nothing (left out). Raises ValueError when the fixed stages alone
    are over the budget."""
    w = wants()
    limits, notes = {}, {}
    left = budget
    for s in (s for s in FIXED if s in stages):
        limits[s] = w[s][0]
        left -= limits[s]
    if left < 0:
        raise ValueError(f"the fixed stages ({', '.join(s for s in FIXED if s in stages)}) need "
                         f"{budget - left} s, over the {budget} s budget")
    for s in (s for s in VALUE_ORDER if s in stages):
        want, least = w[s]
        limits[s] = min(want, left) if left >= least else 0
        left -= limits[s]
    for s in stages:
        want = w[s][0]
        notes[s] = (f"want {want}" + ("" if limits[s] >= want else
                                      (", reduced selection" if limits[s] else ", left out: budget spent")))
    return {s: limits[s] for s in RUN_ORDER if s in stages}, notes


def deadline(stage: str, limit: int) -> int:
    """NAT_CUDA_TIMEOUT_S for a stage: under half of what its limit leaves after the start-up and
    the grace, so the deadline fires (a HANG line, the path named) before the stage is cut, and at
    least 2 s; at most DEADLINE_CAP_S, or that times the tool's slow-down under a sanitizer."""
    cold = stage if stage in COLD_S else "plain"
    cap = DEADLINE_CAP_S * (2 if stage in SLOWDOWN else 1)
    grace = GRACE_S if limit >= 15 else 1
    return max(2, min(cap, int((limit - grace - COLD_S[cold]) / 2)))


def fit(costs: list[float], work_s: float) -> int:
    """How many of `costs`, taken in order, fit in `work_s` (at least one)."""
    total, k = 0.0, 0
    for c in costs:
        if total + c > work_s and k:
            break
        total, k = total + c, k + 1
    return k


def bench_skip(limit: int, hung: list[str]) -> str:
    """assign_bench.py's --skip regex: the rows of each hung path (solver="auto" takes jv except on
    the 4096x4096 case), then the least valuable rows while the rest does not fit `limit`."""
    rows = {"jv": r"solver=jv|^(batch|assign).*nat (assign )?cuda$",
            "block_auction": r"^(batch|assign).*solver=auction",
            "coop_auction": r"^4096x4096.*(nat cuda$|solver=auction)"}
    parts = [rows[p] for p in hung]
    work = sum(BENCH_S.values())
    for case, regex in BENCH_DROP:
        if work <= allowance(limit):
            break
        parts.append(regex)
        work -= BENCH_S[case] * (0.5 if "cpu" in regex else 1)
    return "|".join(f"({p})" for p in parts)


def test_seconds(name: str, size: int) -> float:
    """A pytest item's modelled time: `name` its node id, `size` its largest cost (cells)."""
    s = TEST_CASE_S + size / 1e6 * TEST_PER_MCELL_S
    if "opcheck" in name:
        s += TEST_OPCHECK_S
    if "compile" in name:
        s += TEST_COMPILE_S
    return s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("plan", help="print 'stage limit note' lines (budget_begin reads them)")
    q.add_argument("--budget", type=int, default=BUDGET_S)
    q.add_argument("--stages", help="the stages to plan, in any order (default: all but build)")
    sub.add_parser("budget", help="print the default budget (GPU_CHECK_BUDGET overrides it)")
    q = sub.add_parser("deadline", help="a stage's NAT_CUDA_TIMEOUT_S")
    q.add_argument("stage")
    q.add_argument("limit", type=int)
    q = sub.add_parser("bench-skip", help="assign_bench.py's --skip regex")
    q.add_argument("limit", type=int)
    q.add_argument("hung", nargs="*", help=f"the paths that hung: {', '.join(SMOKE)}")
    args = p.parse_args()
    if args.cmd == "budget":
        print(BUDGET_S)
        return 0
    if args.cmd == "deadline":
        print(deadline(args.stage, args.limit))
        return 0
    if args.cmd == "bench-skip":
        if set(args.hung) - set(SMOKE):
            p.error(f"unknown paths {sorted(set(args.hung) - set(SMOKE))}")
        print(bench_skip(args.limit, args.hung))
        return 0
    named = args.stages.split() if args.stages else [s for s in RUN_ORDER if s != "build"]
    unknown = set(named) - set(RUN_ORDER)
    if unknown:
        print(f"budget: unknown stages {sorted(unknown)}; known: {RUN_ORDER}", file=sys.stderr)
        return 2
    try:
        limits, notes = plan(args.budget, [s for s in RUN_ORDER if s in named])
    except ValueError as e:
        print(f"budget: {e}", file=sys.stderr)
        return 2
    for s, lim in limits.items():
        print(s, lim, notes[s])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
