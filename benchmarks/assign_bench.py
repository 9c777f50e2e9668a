"""Times our assignment solvers against the peers, side by side, in one process, on the same inputs.

    python benchmarks/assign_bench.py                  # CPU: ours vs scipy and lapx
    python benchmarks/assign_bench.py --device cuda    # adds our CUDA op and torch-linear-assignment
    python benchmarks/assign_bench.py --quick --json out.json
    python benchmarks/assign_bench.py --max-n 256 --json out.json   # only the small cases

With --device cuda every GPU solver of every case is timed first, then our CPU op, then scipy,
the CPU ones called once each: a run cut short keeps the GPU figures. On the CPU, peers on problems of
4096x4096 and up are timed once too. The JSON is rewritten after each solver.

Every solver's total is checked against ours (which carries a dual certificate); a peer that
returns a worse total is flagged in the "gap" column rather than silently timed. Ratios are
peer time / our time: above 1 means we are faster. Missing peers are skipped with a message.
"""

import argparse
import os
import platform
import re
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import nat_ext
from _results import write_results

try:
    from scipy.optimize import linear_sum_assignment as scipy_lsa
except ImportError:
    scipy_lsa = None
try:
    import lap  # the lapx package installs its module under this name
except ImportError:
    lap = None
try:
    import torch_linear_assignment as tla
except ImportError:
    tla = None


def median_seconds(fn: Callable[[], object], repeats: int, sync: bool) -> tuple[float, object]:
    """Median time of fn() after one warm-up call; with sync (GPU work), timed by CUDA events on
    the current stream, which also count host work in between (a .cpu() copy, a CPU solver).
    repeats=0: one call, timed, and no warm-up (the one-shot rule for slow CPU peers)."""
    if repeats == 0:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out
    out = fn()  # warm-up (and the result checked for optimality)
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def totals(cost: np.ndarray, rows, cols) -> np.ndarray:
    """Per-problem total cost of an assignment given as (rows, cols), batched or not."""
    cost = cost.reshape((-1,) + cost.shape[-2:]).astype(np.float64)
    rows = np.asarray(rows).reshape(cost.shape[0], -1)
    cols = np.asarray(cols).reshape(cost.shape[0], -1)
    return np.array([cost[b][rows[b], cols[b]].sum() for b in range(cost.shape[0])])


class Case:
    """One benchmark row group: a cost batch, our solver, and the peers that can take it."""

    def __init__(self, name: str, cost: np.ndarray, maximize: bool = False):
        self.name, self.cost, self.maximize = name, cost, maximize
        self.solvers: list[tuple[str, Callable[[], object], Callable[[object], np.ndarray], bool]] = []

    def add(self, label, fn, to_totals, sync=False):
        self.solvers.append((label, fn, to_totals, sync))


def rows_cols_from_col4row(col4row: torch.Tensor):
    col4row = col4row.cpu().numpy()
    return np.broadcast_to(np.arange(col4row.shape[-1]), col4row.shape), col4row


def cpu_cases(quick: bool, threads: int, max_n: int) -> list[Case]:
    rng = np.random.default_rng(0)
    cases = []
    for n in [n for n in (64, 256, 1024, 4096) if n <= max_n]:
        for dtype in (np.float32, np.float64):
            cost = rng.random((n, n)).astype(dtype)
            case = Case(f"{n}x{n} {np.dtype(dtype).name}", cost)
            t = torch.from_numpy(cost)
            case.add("nat cpu", lambda t=t: torch.ops.nat.linear_sum_assignment(t),
                     lambda out, c=cost: totals(c, *rows_cols_from_col4row(out)))
            if scipy_lsa:
                case.add("scipy", lambda c=cost: scipy_lsa(c), lambda out, c=cost: totals(c, *out))
            if lap:
                case.add("lapx lapjvs", lambda c=cost: lap.lapjvs(c, return_cost=False),
                         lambda out, c=cost: totals(c, *out))
                case.add("lapx lapjv", lambda c=cost: lap.lapjv(c, return_cost=False),
                         lambda out, c=cost: totals(c, np.arange(len(out[0])), out[0]))
            cases.append(case)
    for dtype in (np.float32, np.float64) if max_n >= 256 else ():
        cost = rng.random((64, 256, 256)).astype(dtype)
        case = Case(f"batch 64x256x256 {np.dtype(dtype).name}", cost)
        t = torch.from_numpy(cost)
        case.add(f"nat cpu ({threads} threads)", lambda t=t: torch.ops.nat.linear_sum_assignment(t),
                 lambda out, c=cost: totals(c, *rows_cols_from_col4row(out)))
        if scipy_lsa:
            case.add("scipy loop", lambda c=cost: [scipy_lsa(x) for x in c],
                     lambda out, c=cost: totals(c, [r for r, _ in out], [k for _, k in out]))
        if lap:
            case.add(f"lapx lapjvs_batch ({threads} threads)",
                     lambda c=cost: lap.lapjvs_batch(c, return_cost=False, n_threads=threads),
                     lambda out, c=cost: totals(c, np.stack(out[0]), np.stack(out[1])))
        cases.append(case)
    return cases + assign_cases("cpu", torch.Generator().manual_seed(0), max_n)


def assign_cases(device: str, g: torch.Generator, max_n: int) -> list[Case]:
    """The NAT step itself: n=256 features against their batch's targets, d=2048."""
    cases = []
    sync = device == "cuda"
    for B in (1, 64) if max_n >= 256 else ():
        feats = torch.nn.functional.normalize(torch.randn(B, 256, 2048, generator=g, device=device), dim=-1)
        targets = torch.nn.functional.normalize(torch.randn(B, 256, 2048, generator=g, device=device), dim=-1)
        scores = (feats.double() @ targets.double().transpose(1, 2)).cpu().numpy()
        case = Case(f"assign n=256 d=2048 B={B}", scores, maximize=True)
        case.add(f"nat assign {device}", lambda f=feats, t=targets: nat_ext.assign(f, t),
                 lambda out, c=scores: totals(c, *rows_cols_from_col4row(out)), sync=sync)
        if device == "cuda":  # each GPU solver by name, to place "auto"'s thresholds
            for solver in ("jv", "auction"):
                case.add(f"nat assign cuda solver={solver}",
                         lambda f=feats, t=targets, s=solver: torch.ops.nat.assign(f, t, s),
                         lambda out, c=scores: totals(c, *rows_cols_from_col4row(out)), sync=True)
        if scipy_lsa:
            # The NAT step as codebases do it today: scores with torch, copy to numpy, scipy.
            def today(f=feats, t=targets):
                s = torch.bmm(f, t.transpose(1, 2)).cpu().numpy()
                return [scipy_lsa(x, maximize=True) for x in s]
            case.add(f"{device} scores + .cpu() + scipy", today,
                     lambda out, c=scores: totals(c, [r for r, _ in out], [k for _, k in out]), sync=sync)
        cases.append(case)
    return cases


def cuda_cases(quick: bool, max_n: int) -> list[Case]:
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = []
    for name, shape in [("batch 256x256x256", (256, 256, 256)), ("batch 64x1024x1024", (64, 1024, 1024)),
                        ("4096x4096", (4096, 4096))]:
        if shape[-1] > max_n:
            continue
        t = torch.rand(shape, generator=g, device="cuda")
        cost = t.cpu().numpy()
        case = Case(name + " float32", cost)
        case.add("nat cuda", lambda t=t: torch.ops.nat.linear_sum_assignment(t),
                 lambda out, c=cost: totals(c, *rows_cols_from_col4row(out)), sync=True)
        # Each GPU solver by name, to place "auto"'s thresholds (as a function of B and n).
        for solver in ("jv", "auction"):
            case.add(f"nat cuda solver={solver}",
                     lambda t=t, s=solver: torch.ops.nat.linear_sum_assignment(t, False, s),
                     lambda out, c=cost: totals(c, *rows_cols_from_col4row(out)), sync=True)
        tc = t.cpu()
        case.add("nat cpu", lambda tc=tc: torch.ops.nat.linear_sum_assignment(tc),
                 lambda out, c=cost: totals(c, *rows_cols_from_col4row(out)))
        if scipy_lsa and not (quick and cost.ndim == 3 and cost.shape[-1] >= 1024):
            batch = cost.reshape((-1,) + cost.shape[-2:])
            case.add("scipy loop", lambda b=batch: [scipy_lsa(x) for x in b],
                     lambda out, c=cost: totals(c, [r for r, _ in out], [k for _, k in out]))
        if tla and t.dim() == 3:  # one warp a problem: a single 4096x4096 would take minutes
            tb = t
            case.add("torch-linear-assignment", lambda tb=tb: tla.batch_linear_assignment(tb),
                     lambda out, c=cost: totals(c, *rows_cols_from_col4row(out)), sync=True)
        cases.append(case)
    return assign_cases("cuda", g, max_n) + cases  # the NAT step first: the headline target


def run(cases: list[Case], repeats: int, save: Callable[[list[dict]], None], gpu_first: bool = False,
        skip: str | None = None, hang: str | None = None) -> tuple[list[dict], bool]:
    """Times every solver of every case; `save` gets the rows after each solver, so a run cut
    short keeps what it measured. A solver that raises is reported and skipped. gpu_first: every
    GPU solver of every case first, then our CPU op on every case, then the CPU peers; the CPU
    ones timed once. skip: a regex; solvers
    whose "case: solver" matches are left out. hang: a regex; an error matching it (the op's
    NAT_CUDA_TIMEOUT_S deadline) ends the run, since every later launch would queue behind the
    hung kernel. Returns the rows and whether it ended at a hang."""
    results = []
    header = f"{'case':<28} {'solver':<32} {'median ms':>11} {'ratio':>8} {'gap':>10}"
    print(header)
    print("-" * len(header))
    order = [(case, s) for case in cases for s in case.solvers]
    if gpu_first:  # GPU rows, then our CPU op's, then the CPU peers' (stable within each)
        order.sort(key=lambda o: (not o[1][3], not o[1][0].startswith("nat")))
    ours: dict[str, tuple[float, np.ndarray]] = {}  # case -> our time and totals: its first row
    for i, (case, (label, fn, to_totals, sync)) in enumerate(order):
        if skip and re.search(skip, f"{case.name}: {label}"):
            print(f"{case.name:<28} {label:<32} skipped (--skip)")
            continue
        if gpu_first and not sync:
            reps = 0  # one call, timed: the CPU peers beside GPU solvers
        elif case.cost.size >= 4096 * 4096 and not label.startswith("nat"):
            reps = 0  # one-shot rule: peers on 4096x4096 and up
        else:
            reps = repeats
        try:
            seconds, out = median_seconds(fn, reps, sync)
            total = to_totals(out)
        except Exception as e:  # noqa: BLE001 -- one failing solver must not end the run
            print(f"{case.name:<28} {label:<32} FAILED: {type(e).__name__}: {e}", flush=True)
            results.append({"case": case.name, "solver": label, "error": f"{type(e).__name__}: {e}"})
            save(results)
            if hang and re.search(hang, str(e)):
                print(f"HANG {case.name}: {label}; not run: {len(order) - i - 1} solver rows", flush=True)
                return results, True
            continue
        ours_time, ours_total = ours.setdefault(case.name, (seconds, total))  # ours come first
        # Relative gap of this solver's totals to ours: > 0 means a worse assignment.
        sign = -1.0 if case.maximize else 1.0
        gap = float(np.max(sign * (total - ours_total) / (1.0 + np.abs(ours_total))))
        ratio = seconds / ours_time
        flag = "  WORSE THAN OURS" if gap > 1e-9 else ""
        print(f"{case.name:<28} {label:<32} {seconds * 1e3:>11.3f} {ratio:>7.2f}x {gap:>10.1e}{flag}",
              flush=True)
        results.append({"case": case.name, "solver": label, "median_ms": seconds * 1e3,
                        "ratio_vs_ours": ratio, "relative_gap_vs_ours": gap, "repeats": max(reps, 1),
                        "warmup": reps > 0})
        save(results)
    return results, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats; finishes in about a minute")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per solver (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads for batched CPU solvers (ours and lapx)")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON (after each solver)")
    parser.add_argument("--max-n", type=int, default=4096, help="leave out cases with more columns")
    parser.add_argument("--skip", metavar="REGEX", help='leave out solvers whose "case: solver" matches')
    parser.add_argument("--hang-pattern", default=os.environ.get("NAT_HANG_RE"), metavar="REGEX",
                        help="an error matching this ends the run, exit 3 (default: $NAT_HANG_RE)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 15)
    torch.set_num_threads(args.threads)
    for name, mod in [("scipy", scipy_lsa), ("lapx", lap)] + ([("torch-linear-assignment", tla)]
                                                                 if args.device == "cuda" else []):
        if mod is None:
            print(f"note: {name} is not installed; its rows are skipped (pip install {name})")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda needs a CUDA GPU; none is present")
        cases = cuda_cases(args.quick, args.max_n)
    else:
        cases = cpu_cases(args.quick, args.threads, args.max_n)
    once = "CPU solvers" if args.device == "cuda" else "peers at 4096x4096 and up"
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, median of {repeats} after a warm-up ({once}: one call, no "
          f"warm-up); uniform random costs\n")
    meta = {"torch": torch.__version__, "device": args.device, "threads": args.threads,
            "repeats": repeats, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}

    def save(rows: list[dict]) -> None:
        if args.json:
            write_results(args.json, meta, rows)

    _, hung = run(cases, repeats, save, gpu_first=args.device == "cuda", skip=args.skip,
                  hang=args.hang_pattern)
    if args.json:
        print(f"wrote {args.json}")
    if hung:
        os._exit(3)  # exiting normally would wait on the hung kernel
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
