"""Training throughput with and without reassignment, in the same run.

Runs :func:`nat_ext.train.train` with ``reassign_every=2``: even epochs
reassign, odd epochs do not, so both are measured in one process on the same
data, model and machine state. Prints a table and writes JSON. The share of
time in the reassignment comes from host timers: on a GPU, where the step no
longer waits for the device, it is the time to launch the reassignment, and the
images/s of the two kinds of epochs are the measure to compare.

    python benchmarks/train_bench.py --limit 7680 --epochs 8 --json /tmp/train_bench.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch

from nat_ext.train import Config, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--arch", default="convnet")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=7680, help="images per epoch (0: all)")
    p.add_argument("--epochs", type=int, default=8, help="even count: half reassign, half not")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        cfg = Config(data=args.data, arch=args.arch, dim=args.dim, batch_size=args.batch_size,
                     limit=args.limit, epochs=args.epochs, reassign_every=2, eval=False,
                     device=args.device, amp=args.amp, out=out)
        train(cfg)
        with open(f"{out}/metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
    # The first epoch includes warm-up (allocator, kernels); it is the first reassigning one,
    # so compare epochs from the second pair on when there are enough.
    use = rows[2:] if len(rows) >= 4 else rows
    with_r = [r["images_per_s"] for r in use if r["reassigned"]]
    without = [r["images_per_s"] for r in use if not r["reassigned"]]
    frac = [r["assign_frac"] for r in use if r["reassigned"]]
    res = {
        "config": vars(args), "threads": torch.get_num_threads(), "epochs": rows,
        "images_per_s_reassign": statistics.mean(with_r), "images_per_s_plain": statistics.mean(without),
        "assign_time_frac": statistics.mean(frac),
    }
    res["throughput_cost"] = 1 - res["images_per_s_reassign"] / res["images_per_s_plain"]
    print(f"{'epochs':>22s} {'images/s':>10s} {'reassign time':>14s}")
    print(f"{'with reassignment':>22s} {res['images_per_s_reassign']:10.0f} {100 * res['assign_time_frac']:13.1f}%")
    print(f"{'without':>22s} {res['images_per_s_plain']:10.0f} {'':>14s}")
    print(f"throughput cost of reassignment: {100 * res['throughput_cost']:.1f}% "
          f"(time inside the reassignment step: {100 * res['assign_time_frac']:.1f}% of step time)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
