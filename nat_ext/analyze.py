"""What a trained encoder learned, in pictures and a few numbers: ``nat-analyze``.

``nat-analyze --checkpoint runs/nat/checkpoint.pt --out DIR`` (or ``python -m nat_ext.analyze``) reads the
checkpoint's encoder and nat-eval's baselines (``random`` init and raw ``pixels`` by default, ``supervised``
trained here or given by ``--supervised-checkpoint``) on one layer (``--layer``; nat-eval's default, the last
conv stage), on the checkpoint's data, architecture and seed, as ``nat-eval`` does (:func:`nat_ext.eval.prepare`:
the same images, encoders, pooled features and k-NN bank). It writes to DIR:

* ``filters.png``: each encoder's first-layer filters as an image grid (with a Sobel front end, each filter's
  weights on the two gradient channels side by side, said on the figure);
* ``neighbours.png``: seeded test queries (``--per-class`` per class), each with its ``--k`` nearest training
  images by cosine on the layer's features, one panel per encoder, neighbours of the query's class framed green;
* ``tsne.png``: a 2-D t-SNE map of at most ``--tsne-points`` test images per encoder, coloured by class
  (needs scikit-learn; without it the map is skipped and the run says so);
* ``per_class.png``: each encoder's linear-probe accuracy per class (nat-eval's probe,
  :func:`nat_ext.eval.probe_counts`);
* ``history.png``: the run's loss per epoch beside the images that changed target at each reassignment,
  when the checkpoint's folder has its ``metrics.jsonl``;
* ``analysis.json``: per encoder (``encoders.<name>``) the neighbour ``purity`` (:func:`purity`), the
  ``effective_rank`` of the features (:func:`effective_rank`), the probe's top-1 overall and per class; and the
  figures, the query rows, the layer, the subsample sizes and the seed.

Neighbours, purity and effective rank are computed on the features of nat-eval's k-NN (the layer pooled to 2 x 2,
standardised by the bank's statistics, unit rows: :class:`nat_ext.probes.KnnBank`), against nat-eval's bank (at most
``--knn-bank`` training images, a seeded subset, under 1 GiB), for a seeded subset of ``--queries`` test images.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import load_checkpoint
from .config import COUNT, POSITIVE_INT, EvalConfig, ProbeConfig, build_parser, parse_config, setting, validate
from .data import FASHION_MNIST_CLASSES
from .eval import Prepared, _hold, check_settings, prepare, probe_counts
from .models import build_model
from .presets import IMAGENET_MEAN, IMAGENET_STD
from .probes import KnnBank

__all__ = ["AnalyzeConfig", "PURITY_K", "purity", "effective_rank", "pick_queries", "analyze", "main"]

PURITY_K = 10  # purity: the share of each test image's 10 nearest training images that share its label
MAX_QUERY_CLASSES = 10  # neighbour figure: rows of at most this many classes (a seeded subset when more)
THUMB_PX = 64  # neighbour figure: images shrunk to at most this side
DPI = 100
ANALYZE_LIMIT = 10_000  # nat-analyze's default --limit
TSNE_ITERS = 500  # t-SNE's iterations (scikit-learn's default 1000: the maps hardly move after 500)


def _as_in_eval(name: str):
    """The setting ``name`` of :class:`EvalConfig`, the same default and help (one source per setting)."""
    f = {f.name: f for f in dataclasses.fields(EvalConfig)}[name]
    return setting(f.default, f.metadata["help"], check=f.metadata.get("check"))


def _analyze_probe() -> ProbeConfig:
    # nat-eval's probe settings, on a seeded subset of 10,000 labelled images by default (--limit 0: all of them):
    # the L-BFGS probes of four encoders on Fashion-MNIST's 60,000 take most of a run's time
    return ProbeConfig(limit=ANALYZE_LIMIT)


@dataclass
class AnalyzeConfig:
    """Settings of ``nat-analyze`` (plain values); the probe settings are nat-eval's, unprefixed."""
    checkpoint: str = setting("", "checkpoint.pt from nat-train: its encoder, data, arch and seed")
    out: str = setting("", "output folder for the figures and analysis.json; default: the checkpoint's folder/analysis")
    k: int = setting(8, "training neighbours shown per query in neighbours.png", check=POSITIVE_INT)
    per_class: int = setting(1, "test queries per class in neighbours.png (a seeded choice; at most 10 classes, "
                                "a seeded subset of them when the data has more)", check=POSITIVE_INT)
    queries: int = setting(10_000, "test images (a seeded subset; all when fewer) whose neighbours give the purity "
                                   "and whose features give the effective rank", check=POSITIVE_INT)
    tsne_points: int = setting(2000, "test images in the t-SNE map (the first of a seeded order of the queries; "
                                     "0: no map)", check=COUNT)
    device: str = _as_in_eval("device")
    workers: int = _as_in_eval("workers")
    skip_corrupt: bool = _as_in_eval("skip_corrupt")
    probe: ProbeConfig = setting(help="probe settings, as nat-eval's", prefix="", default_factory=_analyze_probe)


def _eval_config(cfg: AnalyzeConfig) -> EvalConfig:
    return EvalConfig(checkpoint=cfg.checkpoint, device=cfg.device, workers=cfg.workers,
                      skip_corrupt=cfg.skip_corrupt, probe=cfg.probe)


def check_analyze_settings(cfg: AnalyzeConfig) -> None:
    """Raise ValueError naming the option for a setting out of range, before any work: analyze's own, nat-eval's
    probe settings (:func:`nat_ext.config.validate`), the checkpoint and the one layer to read."""
    validate(cfg)  # analyze's own settings and nat-eval's probe settings, each by its rule
    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required (a nat-train checkpoint.pt)")
    if not os.path.isfile(cfg.checkpoint):
        raise ValueError(f"--checkpoint {cfg.checkpoint}: no such file")
    layer = cfg.probe.layer
    if layer:
        c = load_checkpoint(cfg.checkpoint)["config"]
        with torch.device("meta"):
            stages = list(build_model(c["arch"], 2, c["in_channels"], sobel=c["sobel"]).stages)
        if layer not in stages:
            raise ValueError(f"--layer should be one stage of {stages} (nat-analyze reads one layer), got {layer!r}")


# ----------------------------------------------------------------------------- the numbers


def purity(neighbour_labels: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of neighbours that share their query's label, averaged over the queries.

    Args:
        neighbour_labels: Tensor[M, k] labels of each query's k nearest neighbours.
        labels: Tensor[M] the queries' labels.

    Returns:
        a fraction in [0, 1].
    """
    if neighbour_labels.dim() != 2 or neighbour_labels.shape[0] != labels.shape[0]:
        raise ValueError(f"neighbour_labels should be Tensor[M, k] with M = {labels.shape[0]} queries, got "
                         f"{tuple(neighbour_labels.shape)}")
    return float(neighbour_labels.eq(labels[:, None]).double().mean())


def effective_rank(x: torch.Tensor) -> float:
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007; RankMe's measure).

    Args:
        x: Tensor[N, F] features (rows are images), used as given.

    Returns:
        a value in [1, min(N, F)]: 1 when one direction holds everything, min(N, F) for equal singular values.
    """
    s = torch.linalg.svdvals(x.double())
    if float(s.sum()) == 0:
        raise ValueError("effective_rank: the features are all zero")
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def pick_queries(labels: torch.Tensor, per_class: int, seed: int, max_classes: int = MAX_QUERY_CLASSES
                 ) -> torch.Tensor:
    """A fixed, seeded choice of ``per_class`` queries per class (of at most ``max_classes`` classes, a seeded
    subset when there are more), ordered by class.

    Args:
        labels: Tensor[M] the candidates' labels.

    Returns:
        Tensor[Q] int64 positions in ``labels``.
    """
    g = torch.Generator().manual_seed(seed + 2)
    classes = labels.unique()
    if len(classes) > max_classes:
        classes = classes[torch.randperm(len(classes), generator=g)[:max_classes]].sort().values
    order = torch.randperm(len(labels), generator=g)
    picked = [order[labels[order] == c][:per_class] for c in classes]
    return torch.cat(picked) if picked else torch.zeros(0, dtype=torch.int64)


def _bank(feats: torch.Tensor, labels: torch.Tensor) -> KnnBank:
    bank = KnnBank(len(labels), feats.shape[1], torch.device("cpu"))
    bank.put(torch.arange(len(labels)), feats, labels)
    bank.finish()
    return bank


def _neighbours(bank: KnnBank, queries: torch.Tensor, k: int, batch: int = 512) -> torch.Tensor:
    """Tensor[M, k] bank rows of each query's nearest neighbours (queries in batches: M x 16384 scores at most)."""
    return torch.cat([bank.neighbours(q, k)[1] for q in queries.split(batch)])


# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    w, h = fig.get_size_inches() * DPI
    if min(w, h) < 400:  # every figure at least 400 px a side
        fig.set_size_inches(max(w, 400) / DPI, max(h, 400) / DPI)
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return os.path.basename(path)


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _filter_grid(w: torch.Tensor, sobel: bool) -> torch.Tensor:
    """First-layer weights Tensor[O, C, h, w] as one image Tensor[H, W, 3] in [0, 1]: one cell per filter, grey
    0.5 the zero weight (each filter scaled by its own largest weight) for 1 or 2 (Sobel: side by side) channels,
    colours stretched per filter for RGB; pale blue between the cells."""
    w = w.detach().float().cpu()
    o, c, kh, kw = w.shape
    if c == 3 and not sobel:
        lo = w.amin((1, 2, 3), keepdim=True)
        cells = ((w - lo) / (w.amax((1, 2, 3), keepdim=True) - lo).clamp_min(1e-12)).permute(0, 2, 3, 1)
    else:
        scaled = 0.5 + 0.5 * w / w.abs().amax((1, 2, 3), keepdim=True).clamp_min(1e-12)
        parts = [scaled[:, i] for i in range(c)]
        gap = torch.ones(o, kh, 1)  # a white line between a Sobel filter's two channels
        row = [p for i, p in enumerate(parts) for p in ((p,) if i == 0 else (gap, p))]
        cells = torch.cat(row, 2)[..., None].expand(-1, -1, -1, 3)
    ch, cw = cells.shape[1:3]
    cols = math.ceil(math.sqrt(o * ch / cw))  # a roughly square grid
    rows = math.ceil(o / cols)
    grid = torch.tensor([0.75, 0.85, 1.0]).expand(rows * (ch + 1) + 1, cols * (cw + 1) + 1, 3).clone()  # pale blue
    for i in range(o):
        r, q = divmod(i, cols)
        grid[1 + r * (ch + 1):1 + r * (ch + 1) + ch, 1 + q * (cw + 1):1 + q * (cw + 1) + cw] = cells[i]
    return grid


def filters_figure(prep: Prepared, path: str) -> str | None:
    """filters.png: each model encoder's first-layer filters (the pixel baseline has none). Returns its name."""
    models = [e for e in prep.encoders if e.model is not None]
    if not models:
        return None
    plt = _plt()
    sobel = prep.run.get("sobel", False)
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 4.8), squeeze=False, layout="constrained")
    for ax, e in zip(axes[0], models):
        conv = _first_conv(e.model)
        ax.imshow(_filter_grid(conv.weight, sobel).numpy(), interpolation="nearest")
        ax.set_title(f"{e.name}: {conv.out_channels} filters, {conv.kernel_size[0]}x{conv.kernel_size[1]}")
        ax.set_xticks([])
        ax.set_yticks([])
    what = ("Sobel front end: each filter's weights on the x-gradient (left) and y-gradient (right) channels"
            if sobel else "one cell per filter")
    fig.suptitle(f"First-layer filters ({what}; grey = 0, each filter scaled to its largest weight)", fontsize=10)
    return _save(fig, path)


def _display(x: torch.Tensor) -> torch.Tensor:
    """Model inputs Tensor[B, C, H, W] as displayable Tensor[B, T, T, 3] in [0, 1], T <= THUMB_PX."""
    x = x.float().cpu()
    if x.shape[1] == 3:  # ImageNet-normalised colour images
        x = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    else:  # grey: each image stretched to [0, 1]
        lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
        x = ((x - lo) / (hi - lo).clamp_min(1e-12)).expand(-1, 3, -1, -1)
    if x.shape[-1] > THUMB_PX:
        x = F.interpolate(x, size=(THUMB_PX, THUMB_PX), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def _images(prep: Prepared, dataset, rows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Thumbnails of the given dataset rows: {row: Tensor[T, T, 3]}."""
    out = {}
    for x, _, idx in prep.read(dataset, rows.unique(), "analysis: thumbnails"):
        if x is not None:
            out.update(zip(idx.tolist(), _display(x)))
    return out


def neighbours_figure(names: list[str], query_rows: torch.Tensor, query_labels: torch.Tensor,
                      neighbour_rows: list[torch.Tensor], neighbour_labels: list[torch.Tensor],
                      query_images: dict, train_images: dict, class_names: list[str], caption: str,
                      path: str) -> str:
    """neighbours.png: one row per query, one panel per encoder (query then its neighbours, nearest first),
    neighbours framed green when they share the query's label, red when not. Returns its name.

    Args:
        names: the encoders.
        query_rows, query_labels: Tensor[Q] the queries' test rows and labels.
        neighbour_rows, neighbour_labels: per encoder Tensor[Q, k] training rows and labels.
        query_images, train_images: thumbnails by row (:func:`_images`).
        class_names: label names.
        caption: what the figure shows (the bank and the queries), under the title.
    """
    plt = _plt()
    t = next(iter(query_images.values())).shape[0]
    fr, gap, qgap = 3, 3, 9  # frame, white gap between cells, and between the query and its neighbours (px)
    cell, k, q = t + 2 * fr + gap, neighbour_rows[0].shape[1], len(query_rows)
    frame = {"query": (0.25, 0.35, 0.9), True: (0.1, 0.7, 0.1), False: (0.9, 0.1, 0.1)}
    blank = torch.ones(t, t, 3)

    def x0(c):  # left edge of column c
        return c * cell + (qgap if c else 0)

    def put(m, r, c, img, colour):
        y, x = r * cell, x0(c)
        m[y:y + t + 2 * fr, x:x + t + 2 * fr] = torch.tensor(colour)
        m[y + fr:y + fr + t, x + fr:x + fr + t] = img

    h_px, w_px = q * cell, x0(k + 1)
    scale = min(2.0, max(1.0, 48 / cell))  # screen pixels per mosaic pixel: a cell shown at 48 px or more
    fig, axes = plt.subplots(1, len(names), figsize=(len(names) * (w_px * scale / DPI + 0.3) + 1.3,
                                                     h_px * scale / DPI + 1.8), squeeze=False, layout="constrained")
    for e, (ax, name) in enumerate(zip(axes[0], names)):
        mosaic = torch.ones(h_px, w_px, 3)
        for i in range(q):
            put(mosaic, i, 0, query_images.get(int(query_rows[i]), blank), frame["query"])
            for j in range(k):
                same = bool(neighbour_labels[e][i, j] == query_labels[i])
                put(mosaic, i, j + 1, train_images.get(int(neighbour_rows[e][i, j]), blank), frame[same])
        ax.imshow(mosaic.numpy(), interpolation="nearest")
        hits = float(neighbour_labels[e].eq(query_labels[:, None]).double().mean())
        ax.set_title(f"{name}: {100 * hits:.0f}% of these share the query's label", fontsize=10)
        ax.set_xticks([x0(c) + (cell - gap) / 2 for c in range(k + 1)], ["query"] + [str(j + 1) for j in range(k)],
                      fontsize=8)
        ax.set_xlabel("neighbours, nearest first")
        if e == 0:
            ax.set_yticks([i * cell + (cell - gap) / 2 for i in range(q)], [class_names[int(y)] for y in query_labels],
                          fontsize=8)
            ax.set_ylabel("query's class")
        else:
            ax.set_yticks([])
    fig.suptitle(f"Nearest training images by cosine (green frame: the query's class, red: another)\n{caption}",
                 fontsize=10)
    return _save(fig, path)


def _colours(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "hsv")
    return [cmap(i % cmap.N if n <= 20 else i / n) for i in range(n)]


def tsne_figure(names: list[str], feats: list[torch.Tensor], labels: torch.Tensor, class_names: list[str],
                seed: int, caption: str, path: str) -> str | None:
    """tsne.png: a 2-D t-SNE map per encoder of the given features, coloured by class. Returns its name, or None
    when scikit-learn is not installed (the caller says so).

    Args:
        feats: per encoder Tensor[N, F] (unit rows: Euclidean t-SNE on them is cosine t-SNE).
        labels: Tensor[N].
    """
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return None
    plt = _plt()
    n_classes = len(class_names)
    colours = _colours(n_classes)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 5.6), squeeze=False, layout="constrained")
    for ax, name, x in zip(axes[0], names, feats):
        x = x.double()
        x = x - x.mean(0)
        if x.shape[1] > 50:  # PCA to 50 dimensions first, t-SNE's usual start
            x = x @ torch.linalg.svd(x, full_matrices=False)[2][:50].t()
        perplexity = min(30.0, (x.shape[0] - 1) / 3)
        y = TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", max_iter=TSNE_ITERS,
                 random_state=seed).fit_transform(x.numpy())
        for c in range(n_classes):
            m = (labels == c).numpy()
            if m.any():
                ax.scatter(y[m, 0], y[m, 1], s=3, color=colours[c], label=class_names[c], rasterized=True)
        ax.set_title(name)
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])
    if n_classes <= 20:
        handles, texts = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, texts, loc="outside lower center", ncol=min(n_classes, 5), markerscale=4, fontsize=9,
                   frameon=False)
        fig.suptitle(f"t-SNE of the test features, by class\n{caption}", fontsize=10)
    else:
        fig.suptitle(f"t-SNE of the test features, one colour per class ({n_classes} classes, no legend)\n{caption}",
                     fontsize=10)
    return _save(fig, path)


def per_class_figure(names: list[str], accuracy: list[torch.Tensor], class_names: list[str], caption: str,
                     path: str) -> str:
    """per_class.png: each encoder's linear-probe accuracy per class (grouped bars up to 20 classes, else each
    encoder's classes sorted by accuracy). Returns its name.

    Args:
        accuracy: per encoder Tensor[classes] in [0, 1] (NaN for a class without test images).
    """
    plt = _plt()
    n = len(class_names)
    colours = _colours(max(len(names), 1)) if len(names) > 10 else [_colours(10)[i] for i in range(len(names))]
    if n <= 20:
        fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * n + 2), 5.6), layout="constrained")
        width = 0.8 / len(names)
        for e, (name, acc) in enumerate(zip(names, accuracy)):
            mean = float(acc[~acc.isnan()].mean()) if (~acc.isnan()).any() else float("nan")
            ax.bar([c + (e - (len(names) - 1) / 2) * width for c in range(n)], (100 * acc).tolist(), width,
                   label=f"{name}: {100 * mean:.1f}%", color=colours[e])
        ax.set_xticks(range(n), class_names, rotation=30, ha="right")
        ax.set_xlabel("class")
        ax.set_ylim(0, 105)
    else:
        fig, ax = plt.subplots(figsize=(8.0, 5.6), layout="constrained")
        for e, (name, acc) in enumerate(zip(names, accuracy)):
            acc = acc[~acc.isnan()]  # classes without test images (a subsample) have no accuracy
            ax.plot(range(1, len(acc) + 1), (100 * acc.sort(descending=True).values).tolist(), marker=".",
                    label=name, color=colours[e])
        seen = int((~accuracy[0].isnan()).sum()) if accuracy else 0
        ax.set_xlabel(f"the {seen} classes with test images (of {n}), sorted by the encoder's accuracy")
        ax.set_ylim(0, 102)
    ax.set_ylabel("linear-probe accuracy on the class's test images (%)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=min(len(names), 4), fontsize=9,
               frameon=False, title="encoder: mean of the per-class accuracies" if n <= 20 else None,
               title_fontsize=9)
    ax.set_title(f"Linear probe, accuracy per class\n{caption}", fontsize=10)
    return _save(fig, path)


def history_figure(rows: list[dict], n_images: int | None, path: str) -> str:
    """history.png: the training loss per epoch beside the images that changed target at each reassignment.

    Args:
        rows: the run's metrics.jsonl rows (``epoch``, ``loss``, ``changed_frac``, ``reassigned``).
        n_images: the run's training images (the changed count is ``changed_frac`` of them); None: fractions.
    """
    plt = _plt()
    from matplotlib.ticker import MaxNLocator
    fig, (a, b) = plt.subplots(1, 2, figsize=(10.5, 4.4), layout="constrained")
    epochs = [r["epoch"] + 1 for r in rows]
    a.plot(epochs, [r["loss"] for r in rows], marker="o", color="black")
    for r in rows:
        if r.get("reassigned"):
            a.axvline(r["epoch"] + 1, color="tab:orange", alpha=0.3, lw=6)
    a.set_xlabel("epoch (shaded: reassigning epochs)")
    a.set_ylabel("training loss (mean over the epoch)")
    a.set_title("Loss")
    re = [r for r in rows if r.get("reassigned")]
    if re:
        scale = n_images if n_images else 1
        vals = [r["changed_frac"] * scale for r in re]
        b.bar([r["epoch"] + 1 for r in re], vals, color="tab:orange", width=0.6)
        for r, v in zip(re, vals):
            b.annotate(f"{r['changed_frac']:.0%}", (r["epoch"] + 1, v), ha="center", va="bottom", fontsize=8)
        b.set_ylim(0, max(vals) * 1.15 or 1)
    else:
        b.text(0.5, 0.5, "no reassigning epoch in this run", ha="center", va="center", transform=b.transAxes)
    b.set_xlim(0.4, max(epochs) + 0.6)
    for ax in (a, b):
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    b.set_xlabel("epoch")
    b.set_ylabel(f"images that changed target{'' if n_images else ' (fraction)'}")
    b.set_title(f"Reassignments{f' ({n_images} training images)' if n_images else ''}")
    fig.suptitle("The run's own history (metrics.jsonl)", fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------- the run


def _class_names(prep: Prepared) -> list[str]:
    n = prep.split.info.num_classes
    if prep.data == "fashion-mnist":
        return list(FASHION_MNIST_CLASSES)
    names = getattr(prep.split.train, "classes", None)
    return list(names) if names and len(names) == n else [f"class {c}" for c in range(n)]


def _history(checkpoint: str, run: dict, path: str) -> tuple[str | None, str | None]:
    """(history.png's name or None, a note when skipped)."""
    metrics = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "metrics.jsonl")
    if not os.path.isfile(metrics):
        return None, f"history skipped: no metrics.jsonl next to {checkpoint}"
    with open(metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows or not all("loss" in r and "epoch" in r for r in rows):
        return None, f"history skipped: {metrics} has no per-epoch loss rows"
    perm = load_checkpoint(checkpoint).get("assignment", {}) or {}
    n_images = int(perm["perm"].numel()) if "perm" in perm else None
    note = None if run.get("objective", "nat") == "nat" else f"history: a {run.get('objective')} run, no targets"
    return history_figure(rows, n_images, path), note


def analyze(cfg: AnalyzeConfig) -> dict:
    """Write the figures and ``analysis.json`` of a checkpoint and nat-eval's baselines (see the module docstring).

    Args:
        cfg: settings; see :class:`AnalyzeConfig`.

    Returns:
        the dict written to ``OUT/analysis.json``.
    """
    t0 = time.perf_counter()
    check_analyze_settings(cfg)
    out = cfg.out or os.path.join(os.path.dirname(os.path.abspath(cfg.checkpoint)), "analysis")
    os.makedirs(out, exist_ok=True)
    ecfg = _eval_config(cfg)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    prep = prepare(ecfg, check_settings(ecfg), device)
    split, taps, names = prep.split, prep.taps, [e.name for e in prep.encoders]
    layer = prep.layers[0]
    class_names = _class_names(prep)
    n_train, n_test = len(split.train_idx), len(split.test_idx)
    print(f"nat-analyze: {', '.join(names)} on {layer}; {prep.method} probe on {n_train} training / {n_test} test "
          f"images", flush=True)

    # the probe (nat-eval's), with its per-class counts
    timing = {"prepare": time.perf_counter() - t0}
    counts, per_class = probe_counts(prep, cfg.probe)
    probe_test = int(counts[-1, 0])
    timing["probe"] = time.perf_counter() - t0 - sum(timing.values())

    # the k-NN features of the bank and of the queries (float16, bounded as nat-eval's bank)
    g = torch.Generator().manual_seed(prep.seed + 3)
    query_rows = split.test_idx[torch.randperm(n_test, generator=g)[:cfg.queries].sort().values]
    _, bank_feats, bank_y, bank_rows = _hold(taps, prep.read, split.train, prep.bank_rows, "analysis: bank",
                                             knn=True, probe=False)
    _, q_feats, q_y, q_rows = _hold(taps, prep.read, split.test, query_rows, "analysis: queries", knn=True,
                                    probe=False)
    shown = pick_queries(q_y, cfg.per_class, prep.seed)
    k_all = max(PURITY_K, cfg.k)
    encoders, unit, accuracy, shown_rows, shown_labels = {}, [], [], [], []
    for t, name in enumerate(names):
        bank = _bank(bank_feats[t], bank_y)
        near = _neighbours(bank, q_feats[t], k_all)
        u = bank.normalize(q_feats[t])
        unit.append(u)
        conf = per_class[t].double()
        acc = conf.diagonal() / conf.sum(1)  # NaN for a class without test images
        accuracy.append(acc)
        encoders[name] = {
            "purity": purity(bank_y[near[:, :PURITY_K]], q_y),
            "effective_rank": effective_rank(u),
            "feature_dim": int(u.shape[1]),
            "linear_top1": int(counts[t, 0]) / max(probe_test, 1),
            "knn_top1": int(counts[t, 2]) / max(probe_test, 1) if cfg.probe.knn_k > 0 else None,
            "per_class_top1": {class_names[c]: (None if math.isnan(a) else float(a))
                               for c, a in enumerate(acc.tolist())},
            "per_class_test_images": {class_names[c]: int(v) for c, v in enumerate(conf.sum(1).long().tolist())},
        }
        shown_rows.append(bank_rows[near[shown, :cfg.k]])
        shown_labels.append(bank_y[near[shown, :cfg.k]])
        e = encoders[name]
        print(f"{name:>12s}  purity@{PURITY_K} {e['purity']:.3f}  effective rank {e['effective_rank']:7.1f} of "
              f"{e['feature_dim']}  linear {100 * e['linear_top1']:.2f}%", flush=True)

    # the figures
    timing["neighbours"] = time.perf_counter() - t0 - sum(timing.values())
    figures, notes = [], []
    bank_note = (f"bank: all {len(bank_rows)} training images" if len(bank_rows) == n_train else
                 f"bank: a seeded subset of {len(bank_rows)} of the {n_train} training images")
    feats_note = f"{layer} features as nat-eval's k-NN reads them"
    n_classes = split.info.num_classes
    classes_note = (f"; {len(shown) // cfg.per_class} of the {n_classes} classes (seeded)"
                    if n_classes > MAX_QUERY_CLASSES else "")
    f = filters_figure(prep, os.path.join(out, "filters.png"))
    if f:
        figures.append(f)
    q_shown = q_rows[shown]
    query_images = _images(prep, split.test, q_shown)
    train_images = _images(prep, split.train, torch.cat([r.flatten() for r in shown_rows]))
    figures.append(neighbours_figure(
        names, q_shown, q_y[shown], shown_rows, shown_labels, query_images, train_images, class_names,
        f"{feats_note}; {bank_note}; {len(shown)} seeded test queries{classes_note}",
        os.path.join(out, "neighbours.png")))
    tsne_n = min(cfg.tsne_points, len(q_y))
    t_map = time.perf_counter()
    if tsne_n >= 5:
        pick = torch.randperm(len(q_y), generator=torch.Generator().manual_seed(prep.seed + 4))[:tsne_n]
        f = tsne_figure(names, [u[pick] for u in unit], q_y[pick], class_names, prep.seed,
                        f"{tsne_n} test images (seeded), {feats_note}", os.path.join(out, "tsne.png"))
        if f:
            figures.append(f)
        else:
            notes.append("t-SNE map skipped: scikit-learn is not installed (pip install scikit-learn, or the "
                         "'analyze' extra)")
    else:
        notes.append("t-SNE map skipped: " + ("--tsne-points 0" if cfg.tsne_points == 0 else
                                              f"only {tsne_n} test images"))
    timing["tsne"] = time.perf_counter() - t_map
    figures.append(per_class_figure(names, accuracy, class_names,
                                    f"{prep.method} probe on {layer} ({taps.dims[0]} features), {n_train} training / "
                                    f"{probe_test} test images", os.path.join(out, "per_class.png")))
    f, note = _history(cfg.checkpoint, prep.run, os.path.join(out, "history.png"))
    if f:
        figures.append(f)
    if note:
        notes.append(note)
    for n in notes:
        print(n, flush=True)

    report = {
        "encoders": encoders, "figures": figures, "notes": notes, "layer": layer, "seed": prep.seed,
        "checkpoint": cfg.checkpoint, "data": prep.data, "arch": prep.arch, "class_names": class_names,
        "queries": {"test_rows": q_shown.tolist(), "labels": q_y[shown].tolist()},
        "subsample": {"probe_train": n_train, "probe_test": probe_test, "probe_method": prep.method,
                      "bank": len(bank_rows), "purity_queries": len(q_y), "purity_k": PURITY_K,
                      "tsne_points": tsne_n if "tsne.png" in figures else 0, "neighbours_shown": cfg.k},
        "seconds": time.perf_counter() - t0,
        "phase_seconds": dict(timing, other_figures=time.perf_counter() - t0 - sum(timing.values())),
        "config": dataclasses.asdict(cfg),
    }
    with open(os.path.join(out, "analysis.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"nat-analyze: {len(figures)} figures and analysis.json in {out} ({report['seconds']:.0f} s)", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``nat-analyze``. Returns the exit status (bad settings exit 2 with argparse's message)."""
    parser = build_parser(AnalyzeConfig, "nat-analyze", "Figures and numbers of what a trained encoder learned: "
                          "first-layer filters, nearest neighbours, a t-SNE map, per-class probe accuracy.")
    cfg = parse_config(AnalyzeConfig, parser.parse_args(argv))
    try:
        check_analyze_settings(cfg)
    except ValueError as e:
        parser.error(str(e))
    analyze(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
