"""What the certificate that follows every CUDA solve costs, against the solve it checks.

    python benchmarks/certify_bench.py                     # CPU: the twin of the GPU check
    python benchmarks/certify_bench.py --device cuda       # the GPU check itself, when a GPU is here
    python benchmarks/certify_bench.py --json certify_cpu.json

Cases: B=1 x 256^2, B=256 x 256^2 and 1 x 4096^2 (the cost model's in docs/benchmarks.md), NAT
scores (normalised feature-target dot products, d = 128, float32, maximised). Per case the best
of --repeats runs of the solve (linear_sum_assignment_with_duals, which on CUDA already includes
its own certificate) and of nat::certify on its answer, in one process; ratio = certify / solve.
On CUDA times come from CUDA events around each call.
"""

import argparse
import os
import platform
import time

import torch

import nat_ext
from _results import write_results

CASES = ((1, 256), (256, 256), (1, 4096))


def nat_scores(B: int, n: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(n + B)
    f = torch.nn.functional.normalize(torch.randn(B, n, 128, generator=g), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(B, n, 128, generator=g), dim=-1)
    return (f @ t.transpose(1, 2)).to(device)


def best_time(fn, repeats: int, device: str) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    rows = []
    print(f"{'case':>14} {'solve s':>10} {'certify s':>10} {'ratio':>7}")
    for B, n in CASES:
        cost = nat_scores(B, n, args.device)
        x, _, v = nat_ext.solve_with_duals(cost, True)
        assert nat_ext.certify(cost, x, v, True).eq(0).all(), f"B={B}, n={n}: certificate failed"
        repeats = 1 if n >= 4096 and args.device == "cpu" else args.repeats  # a CPU solve takes seconds
        solve = best_time(lambda: nat_ext.solve_with_duals(cost, True), repeats, args.device)
        check = best_time(lambda: nat_ext.certify(cost, x, v, True), args.repeats, args.device)
        rows.append({"B": B, "n": n, "solve_s": solve, "certify_s": check, "ratio": check / solve})
        print(f"{f'{B} x {n}^2':>14} {solve:10.4g} {check:10.4g} {check / solve:7.2%}")
    if args.json:
        meta = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "load_average": os.getloadavg()}
        write_results(args.json, meta, rows)


if __name__ == "__main__":
    main()
