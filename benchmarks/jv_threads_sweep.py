"""How many threads the CUDA "jv" kernel should give a problem: times the NAT step (B=1 and a
batch) and uniform batches with NAT_CUDA_COLS_PER_THREAD set to each value, one process a value
(the kernel launcher reads it once). Prints a table of median milliseconds (CUDA events).

    python benchmarks/jv_threads_sweep.py                 # 2 4 8 16 32 columns a thread
    python benchmarks/jv_threads_sweep.py --cols 4 8 --json sweep.json
"""

import argparse
import json
import os
import subprocess
import sys

import torch

CASES = [("NAT n=256 d=2048 B=1", 1, 256, 2048), ("NAT n=256 d=2048 B=256", 256, 256, 2048),
         ("uniform 1x1024x1024", 1, 1024, 0), ("uniform 64x1024x1024", 64, 1024, 0)]


def time_cases(repeats: int) -> dict[str, float]:
    """Median ms of each case in this process (the setting already in the environment)."""
    import nat_ext  # noqa: F401  (registers the ops)
    g = torch.Generator(device="cuda").manual_seed(0)
    out = {}
    for name, B, n, d in CASES:
        if d:
            feats = torch.nn.functional.normalize(torch.randn(B, n, d, generator=g, device="cuda"), dim=-1)
            targets = torch.nn.functional.normalize(torch.randn(B, n, d, generator=g, device="cuda"), dim=-1)
            fn = lambda f=feats, t=targets: torch.ops.nat.assign(f, t, "jv")  # noqa: E731
        else:
            cost = torch.rand(B, n, n, generator=g, device="cuda")
            fn = lambda c=cost: torch.ops.nat.linear_sum_assignment(c, False, "jv")  # noqa: E731
        fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        out[name] = sorted(times)[len(times) // 2]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cols", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(time_cases(args.repeats)))
        return 0
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU; none is present")
    rows = {}
    for cols in args.cols:
        env = dict(os.environ, NAT_CUDA_COLS_PER_THREAD=str(cols))
        res = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(args.repeats)],
                             env=env, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"cols={cols}: failed\n{res.stderr[-2000:]}")
            continue
        rows[cols] = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{'case':<26}" + "".join(f"{f'{c} cols/thr':>14}" for c in rows))
    for name, *_ in CASES:
        print(f"{name:<26}" + "".join(f"{rows[c][name]:>11.3f} ms" for c in rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "median_ms": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
