"""Takes every CUDA kernel path once and checks each answer three ways: a dual certificate, the
op's own `certify` where present, and bit for bit against the host team run of the same solver
source (`torch.ops.nat._linear_sum_assignment_team(cost.cpu(), maximize, 1, solver)`), which
gives identical col4row, u and v for any number of threads. The cases are grouped by solver path
(jv, block auction, cooperative auction) so scripts/gpu_check.sh runs one process a path, each
under its own timeout: a hang then costs only that path.

    python scripts/gpu_smoke.py --path jv            # the jv cases (also: block_auction, coop_auction)
    python scripts/gpu_smoke.py --small              # the cases small enough for compute-sanitizer
    python scripts/gpu_smoke.py --case nat_b1        # one case (ncu profiles it)
    python scripts/gpu_smoke.py --device cpu --small # without a GPU: the CPU ops are checked, and
                                                     # the team run at 4 threads against 1 thread

Prints one PASS/FAIL line a case (and a `WRONG ANSWER [stage] case: ...` line where a check or
the op's own certificate failed) and exits 1 if any failed; a failure does not stop the rest,
except a hang (an error matching --hang-pattern, e.g. the op's NAT_CUDA_TIMEOUT_S deadline):
the kernel still runs and every later launch would queue behind it, so the script prints HANG
and exits 3 at once. Before the cases it prints start-up times (from NAT_STAGE_T0, the epoch
second the caller started the stage, to Python's first line, the imports and the first CUDA
call), so a run under compute-sanitizer shows what the tool's start-up costs. Under
scripts/gpu_check.sh (NAT_STAGE_LIMIT set) it runs the prefix of its cases that fits the stage's
limit by scripts/gpu_plan.py's model, and says so (`select:`). Imports only torch, nat_ext and
gpu_plan (beside it) besides the standard library.
"""

import time

T_PYTHON = time.time()  # first: the start-up figures measure up to here

import argparse  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

import gpu_plan  # noqa: E402  (scripts/: the cases' modelled costs)
import nat_ext  # noqa: E402
from nat_ext.faults import SolverFaultError  # noqa: E402

T_IMPORTED = time.time()

DEVICE = "cuda"
CHECK = True  # False (--profile): run the kernels only, for ncu
HOST_THREADS = 4  # --device cpu: the team run at this many threads is the result under test
# The dry run's injections (scripts/gpu_check.sh --dry-run, --device cpu only): NAT_SMOKE_INJECT
# "hang=CASE wrong=CASE": CASE's deadline fires (a sleep of NAT_CUDA_TIMEOUT_S, then the op's
# error), or its answer has two columns swapped before the checks.
INJECT: dict[str, str] = {}
CURRENT = ""  # the case running

# The CUDA op's solver="auto" rule (csrc/cuda/linear_sum_assignment_kernel.cu, use_auction),
# mirrored to pick the host reference; a mismatch names the other solver if that one matches.
AUCTION_MIN_SIZE, AUCTION_MAX_BATCH = 2048, 8


def cuda_solver(solver: str, cost: torch.Tensor) -> str:
    if solver != "auto":
        return solver
    B = cost.shape[0] if cost.dim() == 3 else 1
    n, m = cost.shape[-2:]
    return "auction" if n == m and n >= AUCTION_MIN_SIZE and B <= AUCTION_MAX_BATCH else "jv"


def same_bits(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


def certified(cost: torch.Tensor, maximize: bool = False, solver: str = "auto") -> None:
    got = nat_ext.solve_with_duals(cost, maximize=maximize, solver=solver)
    if not CHECK:
        return
    if INJECT.get("wrong") == CURRENT:
        x = got[0].clone()
        flat = x.view(-1, x.shape[-1])
        flat[0, [0, 1]] = flat[0, [1, 0]]
        got = (x, got[1], got[2])
    x, u, v = got
    what = f"shape {tuple(cost.shape)} {cost.dtype}, solver={solver}, maximize={maximize}"
    assert x.device.type == u.device.type == v.device.type == DEVICE, "outputs should stay put"
    assert nat_ext.check_optimality(cost.cpu(), x.cpu(), u.cpu(), v.cpu(), maximize=maximize), \
        f"certificate fails for {what}"
    if hasattr(torch.ops.nat, "certify"):  # the op's own check (0 ok, 4 failed)
        flags = torch.ops.nat.certify(cost, x, v, maximize)
        assert not flags.any(), f"nat.certify flags {flags.cpu().tolist()} for {what}"
    cols = torch.ops.nat.linear_sum_assignment(cost, maximize, solver)
    assert torch.equal(cols, x), f"the plain op and the duals op disagree for {what}"
    # Bit for bit against the host team run of the same source at 1 thread. Without a GPU the
    # result under test is the team run at HOST_THREADS threads (the determinism claim).
    ref_solver = cuda_solver(solver, cost)
    team = torch.ops.nat._linear_sum_assignment_team
    ref = team(cost.cpu(), maximize, 1, ref_solver)
    under_test = got if DEVICE == "cuda" else team(cost, maximize, HOST_THREADS, ref_solver)
    if not same_bits(under_test, ref):
        diff = [name for name, a, b in zip("xuv", under_test, ref) if not torch.equal(a.cpu(), b)]
        other = {"jv": "auction", "auction": "jv"}[ref_solver]
        hint = ""
        if solver == "auto" and cost.shape[-1] == cost.shape[-2] and \
                same_bits(under_test, team(cost.cpu(), maximize, 1, other)):
            hint = f" (it matches the host {other}: has the auto rule changed?)"
        raise AssertionError(f"{'/'.join(diff)} differ from the host team run "
                             f"(solver={ref_solver}, 1 thread) for {what}{hint}")


def rand(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.rand(*shape, generator=g, device=DEVICE, dtype=dtype)


def unit(*shape, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, device=DEVICE), dim=-1)


# --- path jv: one block a problem (lap/block_lsap.h)

def jv_one_warp():  # m <= 256: one warp a problem, warp-shuffle reductions only
    certified(rand(64, 64, seed=1))
    certified(rand(3, 40, 200, seed=2, dtype=torch.float64), maximize=True)


def jv_multi_warp():  # several warps a problem: block-wide reductions
    certified(rand(2, 300, 300, seed=3))
    certified(rand(20, 1000, seed=4), maximize=True)


def jv_multi_warp_small():  # the same reductions, small enough for the sanitizers
    certified(rand(300, 300, seed=3))
    certified(rand(2, 12, 600, seed=4, dtype=torch.float64), maximize=True)


def jv_global_by_size():  # state above the shared-memory cap: global workspace
    certified(rand(1, 1800, 1800, seed=5), solver="jv")


def jv_global_by_batch():  # more problems than one wave (~19 blocks an SM): global workspace
    certified(rand(5000, 16, 16, seed=6))


def jv_global_by_batch_small():  # the same path on smaller problems, for the sanitizers
    certified(rand(4300, 4, 4, seed=6))


def nat_b1():  # the NAT step: scores by cuBLAS, then the jv kernel (no bit-for-bit reference:
    feats, targets = unit(256, 2048, seed=10), unit(256, 2048, seed=11)  # cuBLAS makes the scores)
    idx = nat_ext.assign(feats, targets)
    if not CHECK:
        return
    scores = (feats.double() @ targets.double().T).cpu()
    x, u, v = nat_ext.solve_with_duals(scores, maximize=True)
    got = scores[torch.arange(256), idx.cpu()].sum()
    best = scores[torch.arange(256), x].sum()
    assert got >= best - 1e-4, f"assign total {got} below the optimum {best}"


def nat_small():
    feats, targets = unit(4, 32, 16, seed=12), unit(4, 48, 16, seed=13)
    idx = nat_ext.assign(feats, targets)
    for b in range(4):
        s = (feats[b].double() @ targets[b].double().T).cpu()
        x, _, _ = nat_ext.solve_with_duals(s, maximize=True)
        assert s[torch.arange(32), idx[b].cpu()].sum() >= s[torch.arange(32), x].sum() - 1e-4


def bad_problems(B: int, n: int, seed: int) -> torch.Tensor:
    """B problems of n x n, float64; problem 1 holds a NaN, problem 2 has no finite assignment."""
    cost = rand(B, n, n, seed=seed, dtype=torch.float64)
    cost[1, 3, 4] = float("nan")
    cost[2, :3, 2:] = float("inf")
    return cost


def ex_checked(cost: torch.Tensor, solver: str, want: list[int]) -> None:
    """The _ex op gives per-problem info instead of errors, -1 rows where a problem failed."""
    cols, info = nat_ext.linear_sum_assignment_ex(cost, solver=solver)
    assert info.tolist() == want, f"{solver}: info {info.tolist()}, expected {want}"
    for b, status in enumerate(want):
        if status:
            assert (cols[b] == -1).all(), f"{solver}: failed problem {b} should have -1 rows"
        else:
            certified(cost[b], solver=solver)


def ex_jv():
    ex_checked(bad_problems(4, 30, seed=14), "jv", [0, 2, 1, 0])
    feats, targets = unit(2, 30, 8, seed=15), unit(2, 30, 8, seed=16)
    feats[0, 5, 1] = float("nan")
    idx, info = nat_ext.assign_ex(feats, targets)
    assert info.tolist() == [2, 0] and (idx[0] == -1).all(), f"assign_ex info {info.tolist()}"


# --- path block_auction: solver="auction", n <= 1024, one block a problem

def auction_small():
    certified(rand(64, 64, seed=7), solver="auction")
    certified(torch.floor(rand(2, 200, 200, seed=8) * 4), maximize=True, solver="auction")


def ex_auction():
    ex_checked(bad_problems(4, 30, seed=14), "auction", [0, 2, 1, 0])


# --- path coop_auction: solver="auction", n > 1024, a cooperative kernel on the whole GPU, then
# one block repairs (NAT_CUDA_VERBOSE=1 prints the launch's blocks per SM)

def auction_1100():
    certified(rand(1100, 1100, seed=17), solver="auction")


def auction_4096():
    certified(rand(4096, 4096, seed=9), solver="auction")


def ex_coop():
    ex_checked(bad_problems(3, 1100, seed=18), "auction", [0, 2, 1])


PATHS = {
    "jv": [jv_one_warp, jv_multi_warp, jv_global_by_size, jv_global_by_batch, nat_b1, ex_jv],
    "block_auction": [auction_small, ex_auction],
    "coop_auction": [auction_1100, auction_4096, ex_coop],
}
# Small enough to run under compute-sanitizer (which slows kernels 10-100x) in seconds: every
# path, multi-warp jv included, the cooperative auction last (the slowest under the tools).
SMALL = {
    "jv": [jv_one_warp, jv_multi_warp_small, jv_global_by_batch_small, nat_small, ex_jv],
    "block_auction": [auction_small, ex_auction],
    "coop_auction": [auction_1100],
}
CASES = {f.__name__: f for group in (PATHS, SMALL) for fs in group.values() for f in fs}
PATH_OF = {f.__name__: path for group in (PATHS, SMALL) for path, fs in group.items() for f in fs}


def check_costs() -> None:
    """Every case has its modelled cost in gpu_plan.py, in the same order and path."""
    for mine, costed, what in ((PATHS, gpu_plan.SMOKE, "SMOKE"), (SMALL, gpu_plan.SMALL, "SMALL")):
        names = {path: [f.__name__ for f in fs] for path, fs in mine.items()}
        listed = {path: list(cases) for path, cases in costed.items()}
        if names != listed:
            raise SystemExit(f"scripts/gpu_plan.py's {what} {listed} does not match gpu_smoke.py's {names}")


def select(names: list[str], small: bool, limit: float) -> list[str]:
    """The cases, in order, that fit the stage's limit by gpu_plan.py's model (at least one)."""
    stage = os.environ.get("NAT_STAGE", "")
    tool = stage if stage in gpu_plan.SLOWDOWN else "plain"
    table = {k: v for path in (gpu_plan.SMALL if small else gpu_plan.SMOKE).values() for k, v in path.items()}
    costs = [gpu_plan.case_seconds(table[n], tool) for n in names]
    work = gpu_plan.allowance(limit, tool)
    k = gpu_plan.fit(costs, work)
    print(f"select: {k} of {len(names)} cases fit the {stage or 'stage'} limit ({limit:g} s: {work:.1f} s of "
          f"modelled work, {sum(costs[:k]):.1f} s selected); left out: {', '.join(names[k:]) or 'none'}",
          flush=True)
    return names[:k]


def inject_hang(name: str) -> None:
    limit = float(os.environ.get("NAT_CUDA_TIMEOUT_S", "2"))
    time.sleep(limit)
    raise RuntimeError(f"{name}: the GPU did not finish within NAT_CUDA_TIMEOUT_S = {limit:g} s "
                       "(injected by gpu_check.sh --dry-run)")


def main() -> int:
    global DEVICE, CHECK, HOST_THREADS, CURRENT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", action="append", choices=list(PATHS), help="only this path's cases (repeatable)")
    p.add_argument("--skip-path", action="append", default=[], choices=list(PATHS),
                   help="leave out this path's cases (one that hung earlier)")
    p.add_argument("--small", action="store_true", help="only the cases for compute-sanitizer")
    p.add_argument("--case", action="append", choices=sorted(CASES), help="run only this case (repeatable)")
    p.add_argument("--profile", action="store_true", help="run the kernels only, no checks (for ncu)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--host-threads", type=int, default=HOST_THREADS,
                   help="--device cpu: the team run at this many threads is compared with 1 thread")
    p.add_argument("--hang-pattern", default=os.environ.get(
        "NAT_HANG_RE", r"did not finish within NAT_CUDA_TIMEOUT_S"),
        help="an error matching this regex is a hang: stop at once (default: $NAT_HANG_RE)")
    args = p.parse_args()
    DEVICE, CHECK, HOST_THREADS = args.device, not args.profile, args.host_threads
    check_costs()
    if os.environ.get("NAT_SMOKE_INJECT"):
        if DEVICE != "cpu":
            p.error("NAT_SMOKE_INJECT is for the dry run's CPU stand-ins only")
        INJECT.update(kv.split("=", 1) for kv in os.environ["NAT_SMOKE_INJECT"].split())
    if DEVICE == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA GPU; none is present")
    if args.case:
        names = args.case
    else:
        group = SMALL if args.small else PATHS
        names = [f.__name__ for path in (args.path or list(PATHS)) if path not in args.skip_path
                 for f in group[path]]
        if os.environ.get("NAT_STAGE_LIMIT"):  # under scripts/gpu_check.sh: fit the stage's limit
            names = select(names, args.small, float(os.environ["NAT_STAGE_LIMIT"]))

    t0 = os.environ.get("NAT_STAGE_T0")
    t_init = time.time()
    if DEVICE == "cuda":
        torch.zeros(1, device="cuda")  # the context, and the sanitizer's attach to it
        torch.cuda.synchronize()
    t_ready = time.time()
    launch = f"launch to python {T_PYTHON - float(t0):.1f} s, " if t0 else ""
    ready = f", ready {t_ready - float(t0):.1f} s after launch" if t0 else ""
    print(f"startup: {launch}imports {T_IMPORTED - T_PYTHON:.1f} s, "
          f"first CUDA call {t_ready - t_init:.1f} s{ready}", flush=True)
    hang = re.compile(args.hang_pattern) if args.hang_pattern else None
    stage = os.environ.get("NAT_STAGE", "smoke")
    failed = 0
    for name in names:
        print(f"START {name} (path {PATH_OF[name]})", flush=True)  # a hang or a cut names its case
        t = time.perf_counter()
        CURRENT = name
        try:
            if INJECT.get("hang") == name:
                inject_hang(name)
            CASES[name]()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            print(f"PASS {name:<24} {1e3 * (time.perf_counter() - t):9.1f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 -- report every case, then fail at the end
            if hang and hang.search(str(e)):
                print(f"HANG {name:<24} {type(e).__name__}: {e}", flush=True)
                print(f"smoke: stopped at a hang in {name}; not run: "
                      f"{', '.join(names[names.index(name) + 1:]) or 'none'}", flush=True)
                os._exit(3)  # exiting normally would wait on the running kernel
            failed += 1
            print(f"FAIL {name:<24} {type(e).__name__}: {e}", flush=True)
            if isinstance(e, (AssertionError, SolverFaultError)):  # a check failed, or the op's own certificate
                print(f"WRONG ANSWER [{stage}] {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3)
    if hasattr(nat_ext, "cuda_fallback_count"):  # GPU answers re-solved on the CPU (cpu fallback mode)
        fallbacks = nat_ext.cuda_fallback_count()
        print(f"cuda fallbacks: {fallbacks}")
        if fallbacks:
            failed += 1
            print(f"FAIL {'cuda_fallbacks':<24} {fallbacks} GPU answers were re-solved on the CPU", flush=True)
    print(f"smoke: {len(names) - failed}/{len(names)} passed, {time.time() - T_PYTHON:.1f} s in python")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
