"""Table, JSON and loss plot of NAT variant runs (issue 11), from their output folders.

Each run folder holds what ``nat-train`` writes (``eval.json`` with the 2x2-pooled probe,
``metrics.jsonl``, ``checkpoint.pt``) plus ``eval_g1.json`` from ``nat-eval --grid 1`` (the
globally pooled probe). Rows are named ``NAME_SEED`` folders; the random-init and supervised
references come from the folders given by ``--random`` and ``--supervised`` (seed-suffixed too).

usage: python scripts/variants_table.py RUNS_DIR NAME[=LABEL] ... [--json OUT.json] [--plot OUT.png]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch


def _probe(path: str, encoder: str | None = None) -> tuple[float, float] | None:
    if not os.path.exists(path):
        return None
    for r in json.load(open(path))["results"]:
        if encoder is None or r["encoder"] == encoder:
            return 100 * r["linear_top1"], 100 * r["knn_top1"]
    return None


def run_figures(folder: str, encoder: str | None = None) -> dict | None:
    """The probes (2x2 and global), training seconds and per-epoch losses of one run folder."""
    grid2 = _probe(os.path.join(folder, "eval.json"), encoder)
    if grid2 is None:
        return None
    grid1 = _probe(os.path.join(folder, "eval_g1.json"), encoder)
    out = {"linear_2x2": grid2[0], "knn_2x2": grid2[1],
           "linear_global": grid1[0] if grid1 else None, "knn_global": grid1[1] if grid1 else None}
    ck = os.path.join(folder, "checkpoint.pt")
    if os.path.exists(ck):
        out["train_seconds"] = torch.load(ck, map_location="cpu", weights_only=False)["train_seconds"]
    metrics = os.path.join(folder, "metrics.jsonl")
    if os.path.exists(metrics):
        out["loss"] = [json.loads(l)["loss"] for l in open(metrics) if l.strip()]
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs")
    p.add_argument("names", nargs="+", help="run names (folders NAME_0, NAME_1...), optionally NAME=LABEL")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--random", default="nat", help="run folders whose eval holds the random-init rows")
    p.add_argument("--supervised", default="sup")
    p.add_argument("--json", default="")
    p.add_argument("--plot", default="")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]

    def seeded(name, encoder=None):
        return [run_figures(os.path.join(a.runs, f"{name}_{s}"), encoder) for s in seeds]

    rand = seeded(a.random, "random")
    sup = seeded(a.supervised, "supervised")
    ref = {k: (_mean([r[k] for r in rand if r]), _mean([r[k] for r in sup if r]))
           for k in ("linear_2x2", "linear_global")}
    rows = {}
    header = ("| variant | linear 2x2, seeds | mean | spread | gap closed | linear global (mean) | "
              "k-NN 2x2 (mean) | k-NN global (mean) | train s |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for item in [f"{a.random}=random init:random", f"{a.supervised}=supervised:supervised"] + a.names:
        name, _, label = item.partition("=")
        label, _, encoder = label.partition(":")
        figs = seeded(name, encoder or None)
        if not any(figs):
            continue
        got = [f for f in figs if f]
        lin = [f["linear_2x2"] for f in got]
        mean = statistics.mean(lin)
        closed = 100 * (mean - ref["linear_2x2"][0]) / (ref["linear_2x2"][1] - ref["linear_2x2"][0])
        row = {"label": label or name, "seeds": [s for s, f in zip(seeds, figs) if f], "linear_2x2": lin,
               "mean_linear_2x2": mean, "spread": max(lin) - min(lin), "gap_closed_pct": closed,
               **{k: [f.get(k) for f in got] for k in ("linear_global", "knn_2x2", "knn_global",
                                                       "train_seconds", "loss")}}
        row["reference"] = bool(encoder)
        rows[row["label"]] = row

        def fmt(k):
            m = _mean(row[k])
            return f"{m:.2f}" if m is not None else "-"
        secs = _mean(row["train_seconds"]) if encoder != "random" else None
        print(f"| {row['label']} | {' / '.join(f'{v:.2f}' for v in lin)} | {mean:.2f} | {row['spread']:.2f} | "
              f"{closed:.0f}% | {fmt('linear_global')} | {fmt('knn_2x2')} | {fmt('knn_global')} | "
              f"{f'{secs:.0f}' if secs else '-'} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"references": ref, "rows": rows}, f, indent=1)
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(10, 4))
        for row in rows.values():
            losses = [l for l in row["loss"] if l]
            if not losses or row["reference"]:
                continue
            curve = [statistics.mean(v) for v in zip(*losses)]
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=row["label"])
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(a.plot, dpi=90)


if __name__ == "__main__":
    main()
