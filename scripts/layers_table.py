"""Markdown table of per-layer probes (issue 18) from ``nat-eval --layer all`` JSON files.

Each file is an ``eval.json``; rows are (label, encoder) pairs read from the files given for each
seed, columns the layers; a cell is ``seed 0 / seed 1 (mean)`` of the linear (or k-NN) top-1.

usage: python scripts/layers_table.py --key linear_top1 LABEL=ENCODER:FILE_SEED0,FILE_SEED1 ...
"""
from __future__ import annotations

import argparse
import json
import statistics


def _cells(paths: list[str], encoder: str, key: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for path in paths:
        for r in json.load(open(path))["results"]:
            if r["encoder"] == encoder and r.get(key) is not None:
                out.setdefault(r["layer"], []).append(100 * r[key])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+", help="LABEL=ENCODER:FILE[,FILE...] (one file per seed)")
    p.add_argument("--key", default="linear_top1")
    a = p.parse_args()
    rows, layers = [], []
    for spec in a.rows:
        label, rest = spec.split("=", 1)
        encoder, files = rest.split(":", 1)
        cells = _cells(files.split(","), encoder, a.key)
        layers += [l for l in cells if l not in layers]
        rows.append((label, cells))
    print("| encoder | " + " | ".join(layers) + " |")
    print("|---|" + "---|" * len(layers))
    for label, cells in rows:
        out = []
        for l in layers:
            v = cells.get(l, [])
            out.append(" / ".join(f"{x:.2f}" for x in v) + (f" ({statistics.mean(v):.2f})" if len(v) > 1 else "")
                       if v else "-")
        print(f"| {label} | " + " | ".join(out) + " |")


if __name__ == "__main__":
    main()
