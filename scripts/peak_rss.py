#!/usr/bin/env python3
"""Run a command and report the peak memory of its whole process tree, sampled from /proc.

Every ``--interval`` seconds (default 0.05) the script lists every process whose ancestry leads
to the command (parent links read from ``/proc/<pid>/stat``, so DataLoader workers, torchrun's
ranks and their workers all count) and sums their resident set sizes (``VmRSS`` of
``/proc/<pid>/status``). The peak of that sum is reported, with the wall time and the exit status.
Pages shared between processes (for instance forked workers' copy-on-write pages) count once per
process, so the sum is an upper bound on the physical memory used. The script also sums the
proportional set sizes (``Pss`` of ``/proc/<pid>/smaps_rollup``: each shared page divided among
the processes that map it), the tree's physical memory without that double count, and reports its
peak too. A spike shorter than the interval can be missed.

Usage:
    python scripts/peak_rss.py [--json OUT.json] [--interval S] -- COMMAND ARGS...

Prints one line ``peak_tree_rss_mb=... peak_tree_pss_mb=... wall_s=... rc=... max_procs=...`` on
stderr and exits with the command's status.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name (2nd field) may hold spaces: the fields after it follow the last ')'
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _field_kb(path: str, field: str) -> int:
    # the kB figure of a "Field:   1234 kB" line of a /proc file (0 once the process has gone)
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(root: int, with_pss: bool = True) -> tuple[int, int, int]:
    """(sum of VmRSS in kB, sum of Pss in kB (0 unless ``with_pss``), number of processes) over ``root``
    and all its descendants."""
    kids = _children_map()
    todo, total, pss, count = [root], 0, 0, 0
    while todo:
        pid = todo.pop()
        total += _field_kb(f"/proc/{pid}/status", "VmRSS:")
        pss += _field_kb(f"/proc/{pid}/smaps_rollup", "Pss:") if with_pss else 0
        count += 1
        todo.extend(kids.get(pid, []))
    return total, pss, count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--pss-every", type=int, default=20,
                   help="read the PSS every N samples (smaps_rollup walks the page tables: at every 50 ms "
                        "sample of a 2-3 GB process tree it cost a fifth of a core)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        p.error("give the command after --")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak, peak_pss, peak_procs, at, sample = 0, 0, 0, 0.0, 0
    while proc.poll() is None:
        kb, pss, count = tree_rss_kb(proc.pid, with_pss=sample % max(args.pss_every, 1) == 0)
        sample += 1
        if kb > peak:
            peak, at = kb, time.perf_counter() - t0
        peak_pss = max(peak_pss, pss)
        peak_procs = max(peak_procs, count)
        time.sleep(args.interval)
    wall = time.perf_counter() - t0
    res = {"command": cmd, "peak_tree_rss_mb": round(peak / 1024, 1), "peak_at_s": round(at, 1),
           "peak_tree_pss_mb": round(peak_pss / 1024, 1),
           "wall_s": round(wall, 1), "rc": proc.returncode, "max_procs": peak_procs, "interval_s": args.interval}
    print(f"peak_tree_rss_mb={res['peak_tree_rss_mb']} (at {res['peak_at_s']} s) "
          f"peak_tree_pss_mb={res['peak_tree_pss_mb']} wall_s={res['wall_s']} "
          f"rc={res['rc']} max_procs={peak_procs}", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
