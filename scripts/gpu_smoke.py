"""Takes every CUDA kernel path once and checks each answer with a dual certificate: the first
thing scripts/gpu_check.sh runs on a GPU (under CUDA_LAUNCH_BLOCKING=1, so a fault names its
launch), and the cases compute-sanitizer and ncu run.

    python scripts/gpu_smoke.py                 # every case
    python scripts/gpu_smoke.py --small         # the cases small enough for compute-sanitizer
    python scripts/gpu_smoke.py --case nat_b1   # one case (ncu profiles it)
    python scripts/gpu_smoke.py --device cpu    # a dry run of this script without a GPU

Prints one PASS/FAIL line a case and exits 1 if any failed; a failure does not stop the rest.
"""

import argparse
import sys
import time
import traceback

import torch

import nat_ext

DEVICE = "cuda"


def certified(cost: torch.Tensor, maximize: bool = False, solver: str = "auto") -> None:
    x, u, v = nat_ext.solve_with_duals(cost, maximize=maximize, solver=solver)
    assert x.device.type == u.device.type == v.device.type == DEVICE, "outputs should stay put"
    assert nat_ext.check_optimality(cost.cpu(), x.cpu(), u.cpu(), v.cpu(), maximize=maximize), \
        f"certificate fails for shape {tuple(cost.shape)}, solver={solver}, maximize={maximize}"
    cols = torch.ops.nat.linear_sum_assignment(cost, maximize, solver)
    assert torch.equal(cols, x), "the plain op and the duals op disagree"


def rand(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.rand(*shape, generator=g, device=DEVICE, dtype=dtype)


def unit(*shape, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g, device=DEVICE), dim=-1)


def jv_one_warp():  # m <= 256: one warp a problem, warp-shuffle reductions only
    certified(rand(64, 64, seed=1))
    certified(rand(3, 40, 200, seed=2, dtype=torch.float64), maximize=True)


def jv_multi_warp():  # several warps a problem: block-wide reductions
    certified(rand(2, 300, 300, seed=3))
    certified(rand(20, 1000, seed=4), maximize=True)


def jv_global_by_size():  # state above the shared-memory cap: global workspace
    certified(rand(1, 1800, 1800, seed=5), solver="jv")


def jv_global_by_batch():  # more problems than one wave (~19 blocks an SM): global workspace
    certified(rand(5000, 16, 16, seed=6))


def jv_global_by_batch_small():  # the same path on smaller problems, for the sanitizers
    certified(rand(4300, 4, 4, seed=6))


def auction_small():
    certified(rand(64, 64, seed=7), solver="auction")
    certified(torch.floor(rand(2, 200, 200, seed=8) * 4), maximize=True, solver="auction")


def auction_4096():
    certified(rand(4096, 4096, seed=9), solver="auction")


def nat_b1():  # the NAT step: scores by cuBLAS, then the jv kernel
    feats, targets = unit(256, 2048, seed=10), unit(256, 2048, seed=11)
    idx = nat_ext.assign(feats, targets)
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


def ex_ops():  # per-problem info instead of errors, -1 rows where a problem failed
    for solver in ("jv", "auction"):
        cost = rand(4, 30, 30, seed=14, dtype=torch.float64)
        cost[1, 3, 4] = float("nan")
        cost[2, :3, 2:] = float("inf")
        cols, info = nat_ext.linear_sum_assignment_ex(cost, solver=solver)
        assert info.tolist() == [0, 2, 1, 0], f"{solver}: info {info.tolist()}"
        assert (cols[1:3] == -1).all(), f"{solver}: failed problems should have -1 rows"
        for b in (0, 3):
            certified(cost[b], solver=solver)
    feats, targets = unit(2, 30, 8, seed=15), unit(2, 30, 8, seed=16)
    feats[0, 5, 1] = float("nan")
    idx, info = nat_ext.assign_ex(feats, targets)
    assert info.tolist() == [2, 0] and (idx[0] == -1).all(), f"assign_ex info {info.tolist()}"


CASES = {f.__name__: f for f in (jv_one_warp, jv_multi_warp, jv_global_by_size, jv_global_by_batch,
                                 auction_small, auction_4096, nat_b1, ex_ops)}
# Small enough to run under compute-sanitizer (which slows kernels 10-100x) in seconds.
SMALL = {f.__name__: f for f in (jv_one_warp, nat_small, jv_global_by_batch_small, auction_small,
                                 ex_ops)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="only the cases for compute-sanitizer")
    p.add_argument("--case", action="append", choices=sorted({**CASES, **SMALL}),
                   help="run only this case (repeatable)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        p.error("needs a CUDA GPU; none is present")
    pool = {**CASES, **SMALL}
    names = args.case or list(SMALL if args.small else CASES)
    failed = 0
    for name in names:
        print(f"START {name}", flush=True)  # a hang shows which case it was
        t0 = time.perf_counter()
        try:
            pool[name]()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            print(f"PASS {name:<22} {1e3 * (time.perf_counter() - t0):9.1f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 -- report every case, then fail at the end
            failed += 1
            print(f"FAIL {name:<22} {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3)
    print(f"smoke: {len(names) - failed}/{len(names)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
