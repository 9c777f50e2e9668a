"""Time and peak memory of nat_ext.assign_full, against the dense solve where it fits.

Every measurement runs in a subprocess of its own, so peak RSS (resource.getrusage maxrss, the
whole process: torch, data and all) does not mix between sizes or methods. Inputs: feats and
targets drawn from a seeded normal and L2-normalised (NAT's targets live on the sphere), init a
seeded random permutation (the held assignment); or, with --inputs untrained, what NAT's
dataset-wide reassignment solves at epoch 1: the centred embeddings (nat_ext.train's
dataset_features and centre_features) of the seed's untrained convnet on the first n images of
the seeded Fashion-MNIST shuffle (nearly parallel: mean pairwise cosine 0.998 before centring),
the seed's sphere targets and its initial permutation. Where n <= --dense-max, the dense solve
(torch.ops.nat.assign: the n x n scores, then the JV solver) runs too, and both totals are
compared in float64.

    python benchmarks/full_assign_bench.py --json full_assign.json
    python benchmarks/full_assign_bench.py --cases 4096x64 60000x64 --device cuda
    python benchmarks/full_assign_bench.py --inputs untrained --cases 8192x64 16384x64 60000x64
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _results import write_results

DEFAULT_CASES = ["4096x64", "16384x64", "60000x64", "4096x2048"]


def make_inputs(n: int, d: int, dtype: torch.dtype, device: str, seed: int, inputs: str = "random"):
    if inputs == "untrained":
        return untrained_inputs(n, d, dtype, device, seed)
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    targets = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    init = torch.randperm(n, generator=g)
    return feats.to(device, dtype), targets.to(device, dtype), init.to(device)


def untrained_inputs(n: int, d: int, dtype: torch.dtype, device: str, seed: int):
    from nat_ext.data import get_dataset
    from nat_ext.models import build_model
    from nat_ext.state import Assignment
    from nat_ext.targets import Targets
    from nat_ext.train import centre_features, dataset_features

    dataset, info = get_dataset("fashion-mnist", "train", augment=False, limit=n, seed=seed)
    torch.manual_seed(seed)  # the model init of a run with this seed
    model = build_model("convnet", d, info.in_channels, small_input=info.small_input, normalize=True)
    feats = centre_features(dataset_features(model, dataset, d, 512, torch.device("cpu")))
    targets = Targets(n, d, seed=seed).matrix
    init = Assignment(n, seed=seed).perm
    return feats.to(device, dtype), targets.to(device, dtype), init.to(device)


def worker(args) -> None:
    """One measurement in this process; prints a JSON line, saves the assignment."""
    import nat_ext  # noqa: F401  (loads the ops)

    dtype = getattr(torch, args.dtype)
    feats, targets, init = make_inputs(args.n, args.d, dtype, args.device, args.seed, args.inputs)
    stats: dict = {}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    if args.method == "full":
        cols = nat_ext.assign_full(feats, targets, init=init, stats=stats)
    else:
        cols = torch.ops.nat.assign(feats, targets)
    sync()
    seconds = time.perf_counter() - start
    total = float((feats.double() * targets.double()[cols]).sum())
    torch.save(cols.cpu(), args.out)
    result = {"seconds": seconds, "total": total,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.device == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if stats:
        result["stats"] = stats
    print(json.dumps(result))


def run_worker(method: str, n: int, d: int, args, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(n), "--d", str(d),
           "--dtype", args.dtype, "--device", args.device, "--seed", str(args.seed),
           "--inputs", args.inputs, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="n x d, e.g. 60000x64")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dense-max", type=int, default=16384, help="largest n solved densely too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inputs", default="random", choices=["random", "untrained"],
                   help="random unit vectors, or NAT's epoch-1 dataset solve (Fashion-MNIST)")
    p.add_argument("--json", type=Path, help="write the results here")
    # internal: one measurement
    p.add_argument("--worker", choices=["full", "dense"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.method = args.worker
        worker(args)
        return

    rows = []
    print(f"{'n':>7} {'d':>5} {'full s':>8} {'full MB':>8} {'rounds':>6} {'cand/row':>8} "
          f"{'dense s':>8} {'dense MB':>8} {'same optimum':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            n, d = (int(x) for x in case.split("x"))
            full = run_worker("full", n, d, args, Path(tmp) / "full.pt")
            row = {"n": n, "d": d, "dtype": args.dtype, "device": args.device, "inputs": args.inputs,
                   "full": full}
            if n <= args.dense_max and "error" not in full:
                dense = run_worker("dense", n, d, args, Path(tmp) / "dense.pt")
                row["dense"] = dense
                if "error" not in dense:
                    a, b = torch.load(Path(tmp) / "full.pt"), torch.load(Path(tmp) / "dense.pt")
                    gap = dense["total"] - full["total"]
                    row["total_gap"] = gap
                    row["rows_differing"] = int((a != b).sum())
                    # the same optimum, up to the float32 score rounding the certificate allows
                    row["same_optimum"] = abs(gap) <= 1e-5 * max(1.0, abs(dense["total"]))
            rows.append(row)
            st = full.get("stats", {})
            dense = row.get("dense", {})
            print(f"{n:>7} {d:>5} {full.get('seconds', float('nan')):>8.2f} "
                  f"{full.get('peak_rss_mb', float('nan')):>8.0f} {st.get('rounds', '-'):>6} "
                  f"{st.get('candidates_per_row', [float('nan')])[-1]:>8.2f} "
                  f"{dense.get('seconds', float('nan')):>8.2f} "
                  f"{dense.get('peak_rss_mb', float('nan')):>8.0f} "
                  f"{str(row.get('same_optimum', '-')):>12}", flush=True)
            if "error" in full:
                print(f"  full: {full['error']}")
    if args.json:
        meta = {"machine": platform.machine(), "processor": platform.processor(),
                "cpus": torch.get_num_threads(), "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        write_results(args.json, meta, rows)


if __name__ == "__main__":
    main()
