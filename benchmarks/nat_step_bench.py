"""The NAT reassignment step as two public PyTorch NAT codebases write it, reproduced in our own
code, timed as is, with the one-line route (nat_ext.patch_scipy) and with the full route
(nat_ext.assign on the features' device, the permutation update vectorised). See
docs/porting.md.

    python benchmarks/nat_step_bench.py                    # CPU, b = 64/128/256, d = 64/512/2048
    python benchmarks/nat_step_bench.py --device cuda --json step_cuda.json

The step timed is everything NAT adds to a training step: from the batch's features (a tensor on
the device, as the forward pass leaves them) to the batch's targets reassigned in the stored
assignment. The forward and backward passes are not included: they are the same on every route.

Pattern A (squared distances in numpy): features to numpy, a b x b squared-distance matrix built
with a Python loop over the columns, `scipy.optimize.linear_sum_assignment(cost)` called by its
full name, the targets of the batch permuted in the numpy target array.

Pattern B (1 - cosine on the device): 1 - cosine similarity computed with torch on the device,
copied to numpy, `linear_sum_assignment` imported from scipy.optimize, and a Python b x b loop
that turns the column indices into the batch's new target ids.

Routes: "as is" (scipy); "patch_scipy" (the same code, run after nat_ext.patch_scipy(), imported
after it as the porting guide says); "full" (cost building + solve replaced by nat_ext.assign on
the device, the update vectorised in torch). Every route's assignment is checked to reach the
same objective as the as-is route. The routes take turns call by call; the table shows each
route's best call (the least disturbed by other work on the machine), the JSON the medians too. Speedup = as-is time / route time. CPU runs use one torch thread
unless --threads says otherwise (the codebases' numpy and scipy work is single-threaded too).
"""

import argparse
import contextlib
import os
import platform
import statistics
import time

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F

import nat_ext
from _results import write_results


# --- pattern A: squared distances in numpy, scipy by its full name ---------------------------------

def pattern_a_as_is(feats: torch.Tensor, idx: np.ndarray, targets: np.ndarray) -> None:
    """The codebase's step: targets [N, d] numpy, permuted in place for the batch idx."""
    f = feats.detach().cpu().numpy()
    t = targets[idx]
    b = f.shape[0]
    cost = np.zeros((b, b))
    for j in range(b):  # one column of squared distances at a time
        cost[:, j] = np.sum(np.square(f - t[j, :]), axis=1)
    _, col_ind = scipy.optimize.linear_sum_assignment(cost)
    targets[idx] = t[col_ind]


def pattern_a_full(feats: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor) -> None:
    """Full route: targets [N, d] a tensor on the features' device. For a square batch, the most
    dot product is the least squared distance whatever the norms (docs/porting.md)."""
    t = targets[idx]
    targets[idx] = t[nat_ext.assign(feats.detach(), t)]


# --- pattern B: 1 - cosine on the device, `from scipy.optimize import linear_sum_assignment` -------

def import_pattern_b():
    """Pattern B's step function, with linear_sum_assignment bound as its module binds it at
    import: call this after nat_ext.patch_scipy() for the one-line route."""
    from scipy.optimize import linear_sum_assignment

    def step(feats: torch.Tensor, idx: torch.Tensor, assignment: torch.Tensor,
             targets: torch.Tensor) -> None:
        """assignment [N] int64: the target id of each sample; targets [K, d] on the device."""
        ids = assignment[idx]
        cos = F.normalize(feats.detach(), dim=1) @ F.normalize(targets[ids], dim=1).T
        cost = (1 - cos).cpu().numpy()
        row_ind, col_ind = linear_sum_assignment(cost)
        ids_np = ids.cpu().numpy()
        b = len(ids_np)
        new_ids = np.empty(b, dtype=np.int64)
        for i in range(b):  # the codebase's bookkeeping: a b x b loop over pairs
            for j in range(b):
                if col_ind[i] == j:
                    new_ids[row_ind[i]] = ids_np[j]
        assignment[idx] = torch.from_numpy(new_ids).to(assignment.device)

    return step


def pattern_b_full(feats: torch.Tensor, idx: torch.Tensor, assignment: torch.Tensor,
                   targets: torch.Tensor) -> None:
    """Full route: cosine is the dot product of normalised rows, so maximise that."""
    ids = assignment[idx]
    cols = nat_ext.assign(F.normalize(feats.detach(), dim=1), F.normalize(targets[ids], dim=1))
    assignment[idx] = ids[cols]


# --- timing ------------------------------------------------------------------------------------

def time_routes(routes: dict, repeats: int, device: str) -> dict[str, tuple[float, float]]:
    """(best, median) seconds of each route, {name: (context manager factory, step)}. The routes
    take turns, one call each per round, so a burst of other load on the machine hits them
    alike."""
    times: dict[str, list[float]] = {name: [] for name in routes}
    names = list(routes)
    for r in range(repeats + 1):  # round 0 warms up
        # Each round starts with another route, so no route always runs after the same one
        # (pattern A's numpy temporaries cost more or less with the allocator's state).
        for name in names[r % len(names):] + names[:r % len(names)]:
            context, fn = routes[name]
            with context():
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                if r:
                    times[name].append(time.perf_counter() - t0)
    return {name: (min(ts), statistics.median(ts)) for name, ts in times.items()}


def bench_a(b: int, d: int, device: str, repeats: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    N = 4 * b
    feats = torch.randn(b, d, generator=g).to(device)
    targets0 = F.normalize(torch.randn(N, d, generator=g), dim=1)
    idx = torch.randperm(N, generator=g)[:b]
    # The timed runs update their own copy of the targets, as training does (no copy timed).
    tn = targets0.numpy().copy()
    tn_run, idx_np = tn.copy(), idx.numpy()  # one array for both scipy routes: same memory
    tt = targets0.to(device)
    tt_run, idx_dev = tt.clone(), idx.to(device)
    times = time_routes({
        "as is": (contextlib.nullcontext, lambda: pattern_a_as_is(feats, idx_np, tn_run)),
        "patch_scipy": (nat_ext.scipy_patched,
                        lambda: pattern_a_as_is(feats, idx_np, tn_run)),
        "full": (contextlib.nullcontext, lambda: pattern_a_full(feats, idx_dev, tt_run)),
    }, repeats, device)
    # Same objective: sum of squared distances of the batch to its new targets.
    t_np = tn.copy()
    pattern_a_as_is(feats, idx.numpy(), t_np)
    t_full = tt.clone()
    pattern_a_full(feats, idx.to(device), t_full)
    f64 = feats.double().cpu()
    d_ref = ((f64 - torch.from_numpy(t_np[idx.numpy()]).double()) ** 2).sum().item()
    d_full = ((f64 - t_full[idx.to(device)].double().cpu()) ** 2).sum().item()
    assert abs(d_ref - d_full) <= 1e-4 * d_ref, f"pattern A b={b} d={d}: {d_ref} vs {d_full}"
    return times


def bench_b(b: int, d: int, device: str, repeats: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    N = 4 * b
    feats = torch.randn(b, d, generator=g).to(device)
    targets = F.normalize(torch.randn(N, d, generator=g), dim=1).to(device)
    assignment0 = torch.randperm(N, generator=g).to(device)
    idx = torch.randperm(N, generator=g)[:b].to(device)
    step = import_pattern_b()
    with nat_ext.scipy_patched():
        patched_step = import_pattern_b()  # the codebase imported after the patch
    assert any(c.cell_contents is nat_ext.linear_sum_assignment for c in patched_step.__closure__)
    a_run, a_patched, a_full_run = (assignment0.clone() for _ in range(3))
    times = time_routes({
        "as is": (contextlib.nullcontext, lambda: step(feats, idx, a_run, targets)),
        "patch_scipy": (contextlib.nullcontext,
                        lambda: patched_step(feats, idx, a_patched, targets)),
        "full": (contextlib.nullcontext, lambda: pattern_b_full(feats, idx, a_full_run, targets)),
    }, repeats, device)
    # Same objective: total cosine of the batch to its new targets.
    a_ref, a_full = assignment0.clone(), assignment0.clone()
    step(feats, idx, a_ref, targets)
    pattern_b_full(feats, idx, a_full, targets)
    fn = F.normalize(feats.double(), dim=1)
    c_ref = (fn * F.normalize(targets[a_ref[idx]].double(), dim=1)).sum().item()
    c_full = (fn * F.normalize(targets[a_full[idx]].double(), dim=1)).sum().item()
    assert abs(c_ref - c_full) <= 1e-4 * abs(c_ref) + 1e-6, f"pattern B b={b} d={d}"
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--dim", type=int, nargs="+", default=[64, 512, 2048])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per route (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a small shared machine, more "
                             "threads wait on each other; say what you use)")
    parser.add_argument("--runs", type=int, default=1,
                        help="measure the whole grid this many times; best over all runs, and "
                             "the median of the runs' medians")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is present")
    torch.set_num_threads(args.threads)
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                    f"{torch.get_num_threads()} torch threads")
    print(f"NAT reassignment step, {args.device} ({machine}), best of {args.repeats} calls x "
          f"{args.runs} run(s) (medians in the JSON); speedup = as-is time / route time\n")
    header = (f"{'pattern':<8} {'b':>4} {'d':>5} {'as is ms':>9} {'patch_scipy ms':>15} "
              f"{'speedup':>8} {'full ms':>8} {'speedup':>8}")
    print(header)
    print("-" * len(header))
    # Every cell measured in each run; the runs go over the whole grid in turn, so a long burst
    # of other load on the machine spoils one run of a cell, not all of them.
    cells = [(pattern, bench, b, d) for pattern, bench in (("A", bench_a), ("B", bench_b))
             for b in args.batch for d in args.dim]
    measured: dict[tuple, list[dict]] = {}
    for _ in range(args.runs):
        for pattern, bench, b, d in cells:
            t = bench(b, d, args.device, args.repeats, seed=b * 7 + d)
            measured.setdefault((pattern, b, d), []).append(t)
    rows = []
    for (pattern, b, d), runs in measured.items():
        best = {k: min(t[k][0] for t in runs) for k in runs[0]}
        median = {k: statistics.median(t[k][1] for t in runs) for k in runs[0]}
        row = {"pattern": pattern, "b": b, "d": d, "device": args.device,
               "as_is_ms": best["as is"] * 1e3, "patch_scipy_ms": best["patch_scipy"] * 1e3,
               "full_ms": best["full"] * 1e3,
               "patch_scipy_speedup": best["as is"] / best["patch_scipy"],
               "full_speedup": best["as is"] / best["full"],
               "median_ms": {k: v * 1e3 for k, v in median.items()},
               "median_speedup": {k: median["as is"] / v for k, v in median.items()}}
        rows.append(row)
        print(f"{pattern:<8} {b:>4} {d:>5} {row['as_is_ms']:>9.2f} "
              f"{row['patch_scipy_ms']:>15.2f} {row['patch_scipy_speedup']:>7.2f}x "
              f"{row['full_ms']:>8.2f} {row['full_speedup']:>7.2f}x")
    if args.json:
        meta = {"device": args.device, "machine": machine, "torch": torch.__version__,
                "repeats": args.repeats, "runs": args.runs, "threads": args.threads,
                "time": time.strftime("%Y-%m-%d %H:%M")}
        write_results(args.json, meta, rows)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
