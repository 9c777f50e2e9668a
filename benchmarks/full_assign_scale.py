"""Issue 24's measurements of the exact whole-dataset assignment, each in a fresh process.

Inputs (seeded): targets uniform unit vectors; "spread" features uniform unit vectors; "crowded"
features unit(base + 0.05 N(0, I)) with one base for every row (an untrained network's look);
init a seeded random permutation; torch.set_num_threads(THREADS).

    python benchmarks/full_assign_scale.py phases --rows 262144 --kind spread    # one cold solve
    python benchmarks/full_assign_scale.py warm --rows 262144                    # cold vs warm re-solve
    torchrun --nproc-per-node 2 benchmarks/full_assign_scale.py ranks --rows 65536   # 2 gloo ranks
    python benchmarks/full_assign_scale.py ranks --rows 65536                    # the same, 1 process

Each prints one JSON line: seconds, peak RSS, CPU seconds and assign_full's per-phase stats
(candidate pass, each sparse solve, each pricing round; "coarse" where the coarse duals ran).
"""

import argparse
import json
import os
import resource
import sys
import time

import torch


def inputs(n: int, d: int, kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    if kind == "spread":
        f = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    else:
        base = torch.randn(1, d, generator=g)
        f = torch.nn.functional.normalize(base + 0.05 * torch.randn(n, d, generator=g), dim=1)
    return f, t, torch.randperm(n, generator=g)


def usage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_mb": r.ru_maxrss / 1024, "cpu_s": r.ru_utime + r.ru_stime}


def total(f, t, x) -> float:
    x = x.to(f.device)
    return float(sum((f[i:i + 65536].double() * t[x[i:i + 65536]].double()).sum()
                     for i in range(0, f.shape[0], 65536)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["phases", "warm", "ranks"])
    p.add_argument("--rows", type=int, default=262144, help="n = m")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--kind", default="spread", choices=["spread", "crowded"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--step", type=float, default=0.02, help="warm: how far the features move")
    p.add_argument("--device", default="cpu", help="where the features and targets live (cuda: "
                   "the passes run as torch ops on the GPU, the sparse solve on the CPU)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import nat_ext
    from nat_ext.full_assign import assign_sharded

    f, t, init = inputs(args.rows, args.d, args.kind)
    if args.device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False  # the ranking's error bound is float32's
        f, t, init = f.to(args.device), t.to(args.device), init.to(args.device)
    out: dict = {"mode": args.mode, "n": args.rows, "d": args.d, "kind": args.kind,
                 "device": str(f.device),
                 "threads": args.threads, "torch": torch.__version__}
    if args.mode == "phases":
        st: dict = {}
        t0 = time.perf_counter()
        x = nat_ext.assign_full(f, t, init=init, stats=st)
        out.update(seconds=time.perf_counter() - t0, total=total(f, t, x), stats=st, **usage())
    elif args.mode == "warm":
        # the previous epoch's solve, then the features move by a small step: cold and warm
        x0, u0, v0 = nat_ext.assign_full(f, t, init=init, return_duals=True)
        g = torch.Generator().manual_seed(1)
        f2 = torch.nn.functional.normalize(f + args.step * torch.randn(f.shape, generator=g), dim=1)
        cold, warm = {}, {}
        t0 = time.perf_counter()
        xc = nat_ext.assign_full(f2, t, init=x0, stats=cold)
        out["cold_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        xw, _, _ = assign_sharded(f2, 0, args.rows, t, x0, warm=(x0, u0, v0), stats=warm)
        out["warm_seconds"] = time.perf_counter() - t0
        out.update(cold_total=total(f2, t, xc), warm_total=total(f2, t, xw),
                   same_assignment=bool(torch.equal(xc.cpu(), xw.cpu())), cold=cold, warm=warm,
                   **usage())
    else:
        import torch.distributed as dist
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = 0
        if world > 1:
            dist.init_process_group("gloo")
            rank = dist.get_rank()
        lo, hi = args.rows * rank // world, args.rows * (rank + 1) // world
        st = {}
        t0 = time.perf_counter()
        x, u, v = assign_sharded(f[lo:hi], lo, args.rows, t, init, stats=st)
        out.update(world=world, rank=rank, seconds=time.perf_counter() - t0, total=total(f, t, x),
                   rounds=st["rounds"], checksum=int(((torch.arange(args.rows) + 1) * x).sum()),
                   **usage())
        if world > 1:
            from nat_ext.full_assign import close_process_group
            close_process_group()
        if rank != 0:
            return
    print(json.dumps(out, default=float))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
