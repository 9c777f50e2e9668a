"""Evaluation of frozen encoders: linear probes and k-NN on every chosen layer at once.

``nat-eval --checkpoint runs/nat/checkpoint.pt`` (or ``python -m nat_ext.eval``) probes the
layers named by ``--layer`` (a name, a comma list, or ``all``: every conv stage) of the trained
encoder and of the baselines (``random`` init of the same architecture, raw ``pixels`` on inputs
of at most 64 px, a ``supervised`` encoder trained here or given by ``--supervised-checkpoint``),
every encoder and layer read from the same forward passes. For each (encoder, layer):

* a linear classifier on the layer's pooled features (:func:`nat_ext.probes.probe_grid`), standardised:
  ``--probe-method lbfgs`` fits it by full-batch L-BFGS on held features (small data);
  ``--probe-method sgd`` trains one head per (encoder, layer), all together, by SGD on streamed
  batches of ``--probe-batch`` images over all processes, every rank of ``torchrun`` taking its share
  of each (the same steps on any number of processes; nothing per image is held);
  ``auto`` (the default) is lbfgs up to 100,000 training images;
* a cosine k-NN against a bank of at most ``--knn-bank`` training images' 2x2-pooled float16 features
  (globally pooled with ``--grid 1``; :class:`nat_ext.probes.KnnBank`, at most 1 GiB), scored chunk
  by chunk.

Top-1 on the test split (top-5 too with 100 classes or more) goes to ``--out`` (``eval.json``), one
result per (encoder, layer), and a table of encoders by layers is printed at the end.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .auxiliary import PooledLinear, stage_width
from .checkpoint import load_checkpoint
from .labels import balanced_subset, dataset_labels
from .config import BASELINES, EvalConfig, ProbeConfig, SettingError, parse_config, progress, refuse, validate
from .data import DataInfo, collate, default_workers, get_dataset, shard_rows
from .models import CONV_STAGES, Encoder, build_model
from .presets import DeviceTransform
from .full_assign import close_process_group
from .probes import FeatureStats, KnnBank, LinearHeads, linear_probe, pool_features, probe_grid
from .supervised import supervised_config, train_supervised

__all__ = ["EvalConfig", "BASELINES", "default_layer", "probe_layers", "Probed", "Taps", "confusion", "check_settings",
           "Prepared", "prepare", "probe_counts", "evaluate", "report_tables", "main"]

LBFGS_MAX_IMAGES = 100_000  # --probe-method auto: L-BFGS up to this many training images
BANK_MAX_BYTES = 1 << 30  # the k-NN bank's features stay under 1 GiB
KNN_GRID = 2
PIXELS_MAX_SIZE = 64  # the pixel baseline only on inputs this small (data.py's small_input)


def default_layer(arch: str) -> str:
    """The probe layer used unless one is named: the last convolutional stage."""
    return CONV_STAGES[arch][-1]


def probe_layers(spec: str, arch: str, stages: list[str]) -> list[str]:
    """The layers a ``--layer`` value names.

    Args:
        spec: '' (the last conv stage), ``all`` (every conv stage), or a comma list of stage names.
        arch: the architecture.
        stages: the encoder's stage names.

    Returns:
        stage names, in the encoder's order.
    """
    if not spec:
        return [default_layer(arch)]
    if spec == "all":
        return list(CONV_STAGES[arch])
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in stages]
    if unknown or not names:
        raise SettingError(f"--layer should be 'all' or a comma list of {', '.join(stages)}, got {spec!r}")
    return [s for s in stages if s in names]


@dataclass
class Probed:
    """One encoder under evaluation: its name in the results, the model (None: the raw pixels), its layers."""
    name: str
    model: Encoder | None
    layers: list[str]


def _pixels(x: torch.Tensor) -> torch.Tensor:
    # the raw-pixel baseline's features: the input, pooled to 32 px when larger (keeps its probe tractable)
    if x.shape[-1] > 32:
        x = F.adaptive_avg_pool2d(x, 32)
    return x.flatten(1).float()


class Taps:
    """Every probed (encoder, layer) of a batch from one forward pass per encoder.

    Args:
        encoders: the encoders and their layers.
        input_shape: (C, H, W) of the model input (sizes the pooling grids from one dry forward).
        small_input, grid: see :func:`nat_ext.probes.probe_grid`.
        device: where the models run.

    Attributes:
        heads: (encoder name, layer, probe grid) per tap; grid 0 for the pixels.
        dims, knn_dims: feature width of each tap's linear probe and of its k-NN features.
    """

    def __init__(self, encoders: list[Probed], input_shape: tuple[int, int, int], small_input: bool,
                 grid: int, device: torch.device) -> None:
        self.encoders = encoders
        self.heads, self.dims, self.knn_dims, self._grids = [], [], [], []
        dummy = torch.zeros(1, *input_shape, device=device)
        for e in encoders:
            if e.model is None:
                width = _pixels(dummy).shape[1]
                self.heads.append((e.name, "pixels", 0))
                self.dims.append(width)
                self.knn_dims.append(width)
                self._grids.append((None, None))
                continue
            e.model.eval().to(device)
            for layer, out in e.model.stage_outputs(dummy, e.layers).items():
                g = probe_grid(out.shape[1], out.shape[-1], small_input, grid) if out.dim() == 4 else 1
                k = min(KNN_GRID, g) if out.dim() == 4 else 1  # --grid 1: the k-NN on global features too
                self.heads.append((e.name, layer, g if out.dim() == 4 else 0))
                self.dims.append(pool_features(out, g).shape[1])
                self.knn_dims.append(pool_features(out, k).shape[1])
                self._grids.append((g, k))

    @property
    def bank_bytes_per_image(self) -> int:
        """One image's k-NN bank entries over every tap: float16 features and an int64 label each."""
        return sum(2 * d + 8 for d in self.knn_dims)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Args: x Tensor[B, C, H, W] model input. Returns: per tap (Tensor[B, dim], Tensor[B, knn_dim])."""
        out, t = [], 0
        for e in self.encoders:
            if e.model is None:
                f = _pixels(x)
                out.append((f, f))
                t += 1
                continue
            maps = e.model.stage_outputs(x, e.layers)
            for layer in e.layers:
                g, k = self._grids[t]
                probe = pool_features(maps[layer], g)
                out.append((probe, probe if k == g else pool_features(maps[layer], k)))
                t += 1
        return out


# ----------------------------------------------------------------------------- data


@dataclass
class _Split:
    """The evaluation's images: training and test datasets (the same one when split 80/20) and the
    rows of each that the evaluation uses."""
    train: object
    test: object
    train_idx: torch.Tensor
    test_idx: torch.Tensor
    info: DataInfo


def _splits(pc: ProbeConfig, data: str, seed: int, image_size: int, skip_corrupt: bool,
            device: torch.device) -> _Split:
    """Training and test images; an image folder without ``val`` is split 80/20 (seeded)."""
    kw = dict(augment=False, limit=pc.limit or None, seed=seed, image_size=image_size, skip_corrupt=skip_corrupt,
              uint8=True, worker_resize=device.type == "cpu")
    train_ds, info = get_dataset(data, "train", **kw)
    folder = not (data == "fashion-mnist" or data.startswith("synthetic:"))
    if folder and not os.path.isdir(os.path.join(data, "val")):
        if pc.val_labels:
            raise SettingError(f"--val-labels {pc.val_labels} is for a flat validation folder, but {data} has no val")
        perm = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(perm))
        return _Split(train_ds, train_ds, perm[:cut], perm[cut:], info)
    test_ds, _ = get_dataset(data, "test", val_labels=pc.val_labels, **kw)
    return _Split(train_ds, test_ds, torch.arange(len(train_ds)), torch.arange(len(test_ds)), info)


REPORT_EVERY_S = 60.0  # seconds between a pass's progress lines in a log (see _Reader)


class _Reader:
    """Batches of given dataset rows as model inputs on the device (uint8 data finished there)."""

    def __init__(self, info: DataInfo, batch_size: int, device: torch.device, workers: int,
                 report: bool = False) -> None:
        self.batch_size, self.device = batch_size, device
        # A pass over ImageNet takes hours on some machines: when stderr is not a terminal (no bar),
        # the reporting rank prints a line a minute, so a slow pass is never mistaken for a hang.
        self.report_every_s = REPORT_EVERY_S if report and not sys.stderr.isatty() else None
        self.workers = workers if workers >= 0 else (
            0 if info.batch_augment else default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        self.prepare = DeviceTransform(info.image_size) if info.uint8 else None

    def __call__(self, dataset, rows: torch.Tensor | list[torch.Tensor], desc: str):
        """Yield (Tensor[b, C, H, W] input, Tensor[b] labels, Tensor[b] dataset rows) on the device, for
        ``rows`` in batches of ``batch_size`` (or for the given list of batches); images skipped as
        unreadable are left out, a batch of only those gives empty tensors."""
        batches = rows if isinstance(rows, list) else list(rows.split(self.batch_size))
        # Forked workers (the default): they share the k-NN bank's pages with this process, so their
        # RSS counts it again, their PSS does not. A fork server (tried for the dry run) left its
        # workers running after this process was killed: they watch their parent, the server.
        loader = DataLoader(dataset, batch_sampler=[b.tolist() for b in batches if len(b)],
                            num_workers=self.workers, collate_fn=collate, pin_memory=self.device.type == "cuda")
        t0 = last = time.perf_counter()
        for i, (x, y, idx, _) in enumerate(progress(loader, desc=desc), 1):
            if self.report_every_s is not None and time.perf_counter() - last >= self.report_every_s:
                last = time.perf_counter()
                print(f"{desc}: batch {i}/{len(loader)}, {last - t0:.0f} s", flush=True)
            if not len(y):
                yield None, y, idx
                continue
            x = x.to(self.device, non_blocking=True)
            yield (self.prepare(x) if self.prepare is not None else x), y.to(self.device), idx


# ----------------------------------------------------------------------------- the two probes


def _bank_rows(train_idx: torch.Tensor, want: int, seed: int) -> torch.Tensor:
    """The k-NN bank's training images: all of them, or a seeded subset of ``want``, in row order."""
    if want >= len(train_idx):
        return train_idx
    pick = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed + 1))[:want]
    return train_idx[pick.sort().values]


def _bank_size(pc: ProbeConfig, n_train: int, taps: Taps) -> int:
    """``--knn-bank`` images, fewer when the bank's float16 features and labels would pass 1 GiB."""
    return max(1, min(pc.knn_bank, n_train, BANK_MAX_BYTES // taps.bank_bytes_per_image))


def _hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(top-1, top-5) correct among the rows of ``logits`` Tensor[B, C] (votes or scores)."""
    top1 = int(logits.argmax(1).eq(y).sum())
    top5 = int(logits.topk(min(5, logits.shape[1]), 1).indices.eq(y[:, None]).any(1).sum())
    return top1, top5


def confusion(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class counts of a linear probe: Tensor[num_classes, num_classes] int64, row the true class, column
    the top-1 prediction (the diagonal over the row sums is each class's accuracy)."""
    pred = logits.argmax(1).to(y.device)
    return torch.bincount(y * num_classes + pred, minlength=num_classes * num_classes).view(
        num_classes, num_classes).cpu()


def _new_banks(taps: Taps, rows: torch.Tensor, pc: ProbeConfig, device: torch.device) -> list[KnnBank] | None:
    return [KnnBank(len(rows), d, device) for d in taps.knn_dims] if pc.knn_k > 0 else None


def _bank_position(n: int, rows: torch.Tensor) -> torch.Tensor:
    # dataset row -> bank row (-1: not in the bank); n int64 (10 MB at ImageNet's n)
    pos = torch.full((n,), -1, dtype=torch.int64)
    pos[rows] = torch.arange(len(rows))
    return pos


def _sgd_probe(taps: Taps, split: _Split, pc: ProbeConfig, read: _Reader, num_classes: int,
               bank_rows: torch.Tensor, rank: int, world: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Streamed linear heads on every tap, every rank sharing each pass. Returns the counts Tensor[taps + 1, 4]:
    per tap linear top-1, linear top-5, k-NN top-1, k-NN top-5; the test images in the last row's first entry;
    and the linear probes' per-class counts Tensor[taps, classes, classes] (:func:`confusion`)."""
    device = read.device
    # 1. the bank's images: the standardisation statistics of every tap, and the k-NN bank
    banks = _new_banks(taps, bank_rows, pc, device)
    position = _bank_position(len(split.train), bank_rows)
    stats = [FeatureStats(d, device) for d in taps.dims]
    lo, hi, _ = shard_rows(len(bank_rows), rank, world)
    for x, y, idx in read(split.train, bank_rows[lo:hi], "k-NN bank and statistics"):
        if x is None:
            continue
        for t, (probe, knn) in enumerate(taps(x)):
            stats[t].add(probe)
            if banks is not None:
                banks[t].put(position[idx].to(device), knn, y)
    for s in stats:
        s.all_reduce()
    if banks is not None:
        shards = [shard_rows(len(bank_rows), r, world)[:2] for r in range(world)]
        for b in banks:
            b.finish(shards)
    means, stds = zip(*(s.mean_std() for s in stats))
    heads = LinearHeads(taps.dims, num_classes, list(means), list(stds)).to(device)
    opt = heads.optimizer(pc.probe_lr, pc.probe_wd)
    # 2. SGD on global batches of probe_batch images (G) from a seeded order, the same for any number of
    # processes W: rank r takes its shard_rows of each (ceil(G / W) rows, the last ranks fewer), read in
    # forward passes of at most batch_size. Each rank's loss is its images' summed loss over G and the
    # gradients are summed over the ranks, so each step is the one-process step on the same G images (up
    # to the order of float sums). An epoch takes n // G steps: the last n mod G images of its order are
    # left out, and the next epoch's new order gives them their turn, as for one process.
    n, G = len(split.train_idx), pc.probe_batch
    steps_per_epoch = n // G  # at least 1: _evaluate checks G <= n
    total = pc.probe_epochs * steps_per_epoch
    if pc.max_steps > 0:
        total = min(total, pc.max_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    lo, hi, _ = shard_rows(G, rank, world)
    passes = -(-(hi - lo) // pc.batch_size)  # forward passes per step on this rank (0: no share)
    step, t0 = 0, time.perf_counter()
    for epoch in range(pc.probe_epochs):
        if step >= total:
            break
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(steps_per_epoch, total - step)
        mine = split.train_idx[order[:take * G]].view(take, G)[:, lo:hi]
        batches = [b for rows in mine for b in rows.split(pc.batch_size)] if passes else []
        reads = iter(read(split.train, batches, f"sgd probe, epoch {epoch + 1}"))
        for _ in range(take):
            opt.zero_grad(set_to_none=False)
            for _ in range(passes):
                x, y, _ = next(reads)
                if x is not None:
                    logits = heads([p for p, _ in taps(x)])
                    loss = sum(F.cross_entropy(l, y, reduction="sum") for l in logits) / G
                    loss.backward()
            heads.sum_gradients(world)
            opt.step()
            sched.step()
            step += 1
        if rank == 0:
            print(f"sgd probe: epoch {epoch + 1}, {step}/{total} steps, {time.perf_counter() - t0:.0f} s",
                  flush=True)
    # 3. the test images, each rank its share, the counts summed
    heads.eval()
    counts = torch.zeros(len(taps.heads) + 1, 4, dtype=torch.int64)
    per_class = torch.zeros(len(taps.heads), num_classes, num_classes, dtype=torch.int64)
    lo, hi, _ = shard_rows(len(split.test_idx), rank, world)
    with torch.no_grad():
        for x, y, _ in read(split.test, split.test_idx[lo:hi], "test"):
            if x is None:
                continue
            feats = taps(x)
            for t, logits in enumerate(heads([p for p, _ in feats])):
                counts[t, :2] += torch.tensor(_hits(logits, y))
                per_class[t] += confusion(logits, y, num_classes)
                if banks is not None:
                    counts[t, 2:] += torch.tensor(_hits(banks[t].predict(feats[t][1], pc.knn_k, num_classes), y))
            counts[-1, 0] += len(y)
    if world > 1:
        counts, per_class = counts.to(device), per_class.to(device)
        dist.all_reduce(counts)
        dist.all_reduce(per_class)
    return counts.cpu(), per_class.cpu()


def _hold(taps: Taps, read: _Reader, dataset, rows: torch.Tensor, desc: str, knn: bool, probe: bool = True):
    """Every tap's features of ``rows``, held on the CPU: (per tap Tensor[N, dim] or None without ``probe``,
    per tap Tensor[N, knn_dim] float16 or None without ``knn``, Tensor[N] labels, Tensor[N] dataset rows)."""
    kept_probe, near, labels, kept = [[] for _ in taps.heads], [[] for _ in taps.heads], [], []
    for x, y, idx in read(dataset, rows, desc):
        if x is None:
            continue
        for t, (p, k) in enumerate(taps(x)):
            if probe:
                kept_probe[t].append(p.cpu())
            if knn:
                near[t].append(k.to(torch.float16).cpu())
        labels.append(y.cpu())
        kept.append(idx)
    if not labels:
        raise ValueError(f"no readable image among the {len(rows)} of the {desc}")
    return ([torch.cat(p) for p in kept_probe] if probe else None, [torch.cat(k) for k in near] if knn else None,
            torch.cat(labels), torch.cat(kept))


def _lbfgs_probe(taps: Taps, split: _Split, pc: ProbeConfig, read: _Reader, num_classes: int,
                 bank_rows: torch.Tensor, rank: int = 0, world: int = 1, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS on held features, one process (rank, world, seed unused: the signature of :func:`_sgd_probe`).
    Returns the counts and per-class counts as :func:`_sgd_probe`."""
    knn = pc.knn_k > 0
    train_x, train_k, train_y, train_rows = _hold(taps, read, split.train, split.train_idx, "features (train)", knn)
    test_x, test_k, test_y, _ = _hold(taps, read, split.test, split.test_idx, "features (test)", knn)
    counts = torch.zeros(len(taps.heads) + 1, 4, dtype=torch.int64)
    counts[-1, 0] = len(test_y)
    per_class = torch.zeros(len(taps.heads), num_classes, num_classes, dtype=torch.int64)
    in_bank = _bank_position(len(split.train), bank_rows)[train_rows] >= 0
    for t in range(len(taps.heads)):
        logits = linear_probe(train_x[t], train_y, test_x[t], test_y, num_classes, pc.probe_wd, pc.probe_iters)
        counts[t, :2] = torch.tensor(_hits(logits, test_y))
        per_class[t] = confusion(logits, test_y, num_classes)
        if knn:
            bank = KnnBank(int(in_bank.sum()), taps.knn_dims[t], torch.device("cpu"))
            bank.put(torch.arange(len(bank.labels)), train_k[t][in_bank], train_y[in_bank])
            bank.finish()
            for q, y in zip(test_k[t].split(pc.batch_size), test_y.split(pc.batch_size)):
                counts[t, 2:] += torch.tensor(_hits(bank.predict(q, pc.knn_k, num_classes), y))
    return counts, per_class


# ----------------------------------------------------------------------------- encoders, processes, report


def _load_encoder(path: str) -> tuple[Encoder, dict]:
    ck = load_checkpoint(path)
    c = ck["config"]
    nat = c["objective"] == "nat"
    model = build_model(c["arch"], c["dim"] if nat else c["num_classes"], c["in_channels"],
                        sobel=c["sobel"], small_input=c["small_input"],
                        normalize=nat)
    model.load_state_dict(ck["model"])
    return model, c


def trained_name(c: dict) -> str:
    """The name of a checkpoint's encoder in the results: what trained it (``nat``, ``nat-frozen`` for the
    frozen-assignment ablation, ``supervised``, or without NAT's term the other terms, e.g. ``rotation``)."""
    if c["objective"] == "supervised":
        return "supervised"
    if c.get("nat_weight", 1.0) == 0:
        on = (("rotation", c.get("rotation_loss", 0) > 0), ("koleo", c.get("koleo", 0) > 0),
              ("labels", c.get("label_fraction", 0) > 0 or bool(c.get("label_file"))))
        return "+".join(name for name, used in on if used)
    return "nat" if c["reassign_every"] > 0 else "nat-frozen"


def _result_rows(taps: Taps, counts: torch.Tensor, pc: ProbeConfig, method: str, n_train: int, bank: int,
                 num_classes: int, suffix: str) -> list[dict]:
    """One result per (encoder, layer) from a probe's counts (printed as they come); ``suffix`` names
    the encoders of a probe fit on other training images (``@labelled``)."""
    n_test, rows = int(counts[-1, 0]), []
    for t, (name, layer, grid) in enumerate(taps.heads):
        r = {"encoder": name + suffix, "layer": layer, "grid": grid, "feature_dim": taps.dims[t],
             "linear_top1": int(counts[t, 0]) / max(n_test, 1),
             "knn_top1": int(counts[t, 2]) / max(n_test, 1) if pc.knn_k > 0 else None,
             "n_train": n_train, "n_test": n_test, "method": method, "knn_bank": bank}
        if num_classes >= 100:
            r["linear_top5"] = int(counts[t, 1]) / max(n_test, 1)
            r["knn_top5"] = int(counts[t, 3]) / max(n_test, 1) if pc.knn_k > 0 else None
        rows.append(r)
        knn = f"  kNN {100 * r['knn_top1']:5.2f}%" if pc.knn_k > 0 else ""
        print(f"{r['encoder']:>12s}  {layer:>7s}  dim {taps.dims[t]:5d}  linear {100 * r['linear_top1']:5.2f}%{knn}",
              flush=True)
    return rows


def _labelled_rows(path: str, c: dict, pc: ProbeConfig, split: _Split, seed: int) -> torch.Tensor | None:
    """The training rows the probes also fit on alone: a labelled run's own labelled images (when the
    evaluation's training images are the run's: the same --limit, not an 80/20 split of a folder without
    val), else ``--label-fraction``'s seeded class-balanced share, the images a labelled run of this seed
    would have had; None for neither."""
    if path and (c.get("label_fraction") or c.get("label_file")):
        if pc.limit != c.get("limit", 0) or split.train is split.test:
            print("the labelled-only probe is skipped: the evaluation's training images are not the run's "
                  f"(--limit {pc.limit}, the run's {c.get('limit', 0)})", flush=True)
            return None
        return load_checkpoint(path)["labelled"]
    if pc.label_fraction > 0:
        return split.train_idx[balanced_subset(dataset_labels(split.train)[split.train_idx], pc.label_fraction,
                                               seed)]
    return None


@torch.no_grad()
def _semi_row(path: str, model: Encoder, c: dict, split: _Split, read: _Reader, device: torch.device) -> dict | None:
    """The ``semi`` result of a run trained with labels: its own classifier head's top-1 on the test
    images (the head reads the pooled last conv stage); None for a run without labels."""
    ck = load_checkpoint(path)
    if "labels" not in ck:
        return None
    layer = default_layer(c["arch"])
    head = PooledLinear(stage_width(model, layer), c["num_classes"])
    head.load_state_dict(ck["labels"])
    model, head = model.to(device).eval(), head.to(device).eval()
    correct = total = 0
    for x, y, _ in read(split.test, split.test_idx, "semi"):
        if x is not None:
            correct += int((head(model.trunk(x, layer)).argmax(1) == y).sum())
            total += len(y)
    return {"encoder": "semi", "layer": layer, "linear_top1": correct / max(total, 1), "knn_top1": None,
            "n_test": total, "method": "the run's label head", "n_labelled": len(ck["labelled"]),
            "labelled_per_class": ck.get("labelled_per_class")}


def _supervised(ecfg: EvalConfig, c: dict, data: str, arch: str, seed: int, skip_corrupt: bool,
                device: torch.device, world: int) -> Encoder:
    """The supervised baseline: ``--supervised-checkpoint``, or trained here (a child run, one process)."""
    pc = ecfg.probe
    if pc.supervised_checkpoint:
        model, sc = _load_encoder(pc.supervised_checkpoint)
        if sc.get("objective") != "supervised":
            raise SettingError(f"--supervised-checkpoint {pc.supervised_checkpoint} is a {sc.get('objective')!r} run, "
                             "expected a nat-train --objective supervised run")
        if sc.get("arch") != arch:
            raise SettingError(f"--supervised-checkpoint {pc.supervised_checkpoint} is a {sc.get('arch')} run, "
                             f"the evaluated encoder is a {arch}")
        return model
    if world > 1:
        raise SettingError("the supervised baseline is trained by one process: under torchrun give it as "
                         "--supervised-checkpoint (a nat-train --objective supervised run)")
    out = os.path.join(os.path.dirname(ecfg.out or ecfg.checkpoint or "runs/x") or ".", "supervised")
    run = dict(c, data=data, arch=arch, seed=seed, skip_corrupt=skip_corrupt)
    path = train_supervised(supervised_config(run, out=out, epochs=pc.supervised_epochs, device=str(device),
                                              workers=max(ecfg.workers, 0)))
    return _load_encoder(path)[0]


def _processes(device_setting: str) -> tuple[torch.device, int, int, bool]:
    """(device, rank, world, whether this call started the process group): joins torchrun's group
    when launched by it (nat-eval), or uses the group already there (nat-train's ranks)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device_setting == "auto"
                          else device_setting)
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    if not dist.is_initialized():
        return device, 0, 1, False
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size(), started


def _table(results: list[dict], key: str, title: str) -> str:
    layers = list(dict.fromkeys(r["layer"] for r in results if r["layer"] != "pixels"))
    if any(r["layer"] == "pixels" for r in results):
        layers.append("pixels")
    names = list(dict.fromkeys(r["encoder"] for r in results))
    cell = {(r["encoder"], r["layer"]): r.get(key) for r in results}
    width = max(12, *(len(n) + 1 for n in names))
    lines = [title, f"{'encoder':{width}s}" + "".join(f"{l:>9s}" for l in layers)]
    for name in names:
        row = [cell.get((name, l)) for l in layers]
        lines.append(f"{name:{width}s}" + "".join(f"{100 * v:9.2f}" if v is not None else f"{'-':>9s}" for v in row))
    return "\n".join(lines)


def report_tables(report: dict) -> str:
    """The linear (and k-NN) tables of an ``eval.json`` report, as the evaluation printed them."""
    results = report["results"]
    tables = [_table(results, "linear_top1", "linear top-1 (%)")]
    if any(r.get("knn_top1") is not None for r in results):
        tables.append(_table(results, "knn_top1", "k-NN top-1 (%)"))
    return "\n".join(tables)


def check_settings(ecfg: EvalConfig) -> list[str]:
    """Check every setting (:func:`nat_ext.config.validate`: SettingError naming the option, before any
    work). Returns the baselines asked for."""
    validate(ecfg)
    return [b for b in ecfg.probe.baselines.split(",") if b]


def evaluate(ecfg: EvalConfig) -> dict | None:
    """Probe a trained encoder and the requested baselines on the chosen layers.

    Under ``torchrun`` (or called by every rank of a training run, its process group still up),
    ``--probe-method sgd`` shares every pass among the ranks; the L-BFGS probe runs on rank 0 alone
    (the other ranks return None at once).

    Args:
        ecfg: settings; see :class:`EvalConfig`.

    Returns:
        On rank 0, dict: ``results`` (one dict per (encoder, layer) with ``linear_top1``, ``knn_top1``,
        with 100 classes or more ``linear_top5`` and ``knn_top5``) and ``config``; also written to
        ``ecfg.out`` if set. None on the other ranks.
    """
    wanted = check_settings(ecfg)
    device, rank, world, started = _processes(ecfg.device)
    try:
        return _evaluate(ecfg, wanted, device, rank, world)
    finally:
        if started:
            close_process_group()


@dataclass
class Prepared:
    """An evaluation ready to run: its images, encoders and their taps, the k-NN bank's rows, the probe method,
    and the data, architecture, dim and seed it resolved (from the checkpoint unless given)."""
    split: _Split
    encoders: list[Probed]
    layers: list[str]
    taps: Taps
    read: _Reader
    bank_rows: torch.Tensor
    method: str
    data: str
    arch: str
    dim: int
    seed: int
    run: dict  # the checkpoint's config ({} without one)
    semi: dict | None = None  # the result of the run's own label head (semi-supervised NAT), rank 0


def prepare(ecfg: EvalConfig, wanted: list[str], device: torch.device, rank: int = 0,
            world: int = 1) -> Prepared | None:
    """Load the checkpoint's encoder and build the baselines in ``wanted`` (:func:`check_settings`), on the
    checkpoint's data, architecture and seed (unless ``ecfg`` gives them) and the layers of ``--layer``.

    Returns:
        :class:`Prepared`; None on ranks other than 0 when the probe is L-BFGS (rank 0 runs it alone).
    """
    pc, master = ecfg.probe, rank == 0
    trained, c = None, {}
    if ecfg.checkpoint:
        trained, c = _load_encoder(ecfg.checkpoint)
    data = ecfg.data or c.get("data")
    arch = ecfg.arch or c.get("arch")
    dim = ecfg.dim or c.get("dim")
    seed = ecfg.seed if ecfg.seed >= 0 else c.get("seed", 0)
    if not (data and arch and dim):
        raise SettingError("--checkpoint is empty: give --data, --arch and --dim for a baselines-only evaluation")
    skip_corrupt = ecfg.skip_corrupt or c.get("skip_corrupt", False)
    image_size = c.get("image_size", 224)
    split = _splits(pc, data, seed, image_size, skip_corrupt, device)
    info = split.info
    n_train = len(split.train_idx)
    method = pc.probe_method if pc.probe_method != "auto" else ("lbfgs" if n_train <= LBFGS_MAX_IMAGES else "sgd")
    if method == "lbfgs" and not master:
        return None  # held features and L-BFGS: rank 0 alone
    if method == "sgd" and pc.probe_batch > n_train:
        raise SettingError(f"--probe-batch (the sgd probe's global batch) should be at most the {n_train} "
                           f"training images, got {pc.probe_batch}")
    sobel = c.get("sobel", False)
    encoders = []
    any_model = trained
    semi = None
    if trained is not None:
        encoders.append(Probed(trained_name(c), trained, []))
        if master:  # the run's own classifier head (semi-supervised NAT), read before the stages are dropped
            semi = _semi_row(ecfg.checkpoint, trained, c, split, _Reader(info, pc.batch_size, device, ecfg.workers),
                             device)
    if "random" in wanted:
        torch.manual_seed(seed)
        rnd = build_model(arch, dim, info.in_channels, sobel=sobel, small_input=info.small_input)
        encoders.append(Probed("random", rnd, []))
        any_model = any_model or rnd
    if "supervised" in wanted:
        encoders.append(Probed("supervised", _supervised(ecfg, c, data, arch, seed, skip_corrupt, device, world), []))
    any_model = any_model or build_model(arch, dim, info.in_channels, small_input=info.small_input)
    layers = probe_layers(pc.layer, arch, list(any_model.stages))
    for e in encoders:
        e.layers = layers
        e.model.keep_until(layers[-1])  # the deeper stages and the head never run
    if "pixels" in wanted:
        if info.image_size > PIXELS_MAX_SIZE:
            if master:
                print(f"pixels baseline skipped: inputs are {info.image_size} px, more than {PIXELS_MAX_SIZE}",
                      flush=True)
        else:
            encoders.append(Probed("pixels", None, []))
    if not encoders:
        raise ValueError("nothing to evaluate: give a checkpoint or baselines")
    in_shape = (info.in_channels, info.image_size, info.image_size)
    taps = Taps(encoders, in_shape, info.small_input, pc.grid, device)
    read = _Reader(info, pc.batch_size, device, ecfg.workers, report=master)
    bank_rows = _bank_rows(split.train_idx, _bank_size(pc, n_train, taps), seed)
    return Prepared(split, encoders, layers, taps, read, bank_rows, method, data, arch, dim, seed, c, semi)


def probe_counts(prep: Prepared, pc: ProbeConfig, rank: int = 0, world: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prepared evaluation's probes (L-BFGS or SGD, and the k-NN).

    Returns:
        (Tensor[taps + 1, 4] counts: per tap linear top-1, linear top-5, k-NN top-1, k-NN top-5 correct, the
        test images in the last row's first entry; Tensor[taps, classes, classes] the linear probes' per-class
        counts, :func:`confusion`).
    """
    if prep.method == "sgd":
        return _sgd_probe(prep.taps, prep.split, pc, prep.read, prep.split.info.num_classes, prep.bank_rows, rank,
                          world, prep.seed)
    return _lbfgs_probe(prep.taps, prep.split, pc, prep.read, prep.split.info.num_classes, prep.bank_rows)


def _evaluate(ecfg: EvalConfig, wanted: list[str], device: torch.device, rank: int, world: int) -> dict | None:
    pc, master, t0 = ecfg.probe, rank == 0, time.perf_counter()
    prep = prepare(ecfg, wanted, device, rank, world)
    if prep is None:
        return None
    info, taps, bank_rows, method = prep.split.info, prep.taps, prep.bank_rows, prep.method
    layers, data, arch, dim, seed = prep.layers, prep.data, prep.arch, prep.dim, prep.seed
    n_train = len(prep.split.train_idx)
    if master:
        bank_mb = len(bank_rows) * taps.bank_bytes_per_image / 2 ** 20
        print(f"{method} probe of {len(taps.heads)} (encoder, layer) pairs on {n_train} training images, "
              f"{world} process(es); k-NN bank {len(bank_rows)} images ({bank_mb:.0f} MiB)", flush=True)
    counts, _ = probe_counts(prep, pc, rank, world)
    # a run with labels (or --label-fraction): the probes fit again on the labelled images only (1% / 10%)
    labelled = _labelled_rows(ecfg.checkpoint, prep.run, pc, prep.split, seed)
    if labelled is not None:
        in_shape = (info.in_channels, info.image_size, info.image_size)
        on_labels = dataclasses.replace(prep, split=dataclasses.replace(prep.split, train_idx=labelled),
                                        taps=Taps(prep.encoders, in_shape, info.small_input, pc.grid, device),
                                        bank_rows=labelled)
        counts_l, _ = probe_counts(on_labels, dataclasses.replace(pc, probe_batch=min(pc.probe_batch, len(labelled))),
                                   rank, world)
    if not master:
        return None
    results = [prep.semi] if prep.semi is not None else []
    results += _result_rows(taps, counts, pc, method, n_train, len(bank_rows), info.num_classes, "")
    if labelled is not None:
        results += _result_rows(taps, counts_l, pc, method, len(labelled), len(labelled), info.num_classes,
                                "@labelled")
    n_test = int(counts[-1, 0])
    seconds = time.perf_counter() - t0
    print(_table(results, "linear_top1", f"linear top-1 (%), {method} probe, {n_train} training / {n_test} test "
                                         f"images, {seconds:.0f} s"), flush=True)
    if pc.knn_k > 0:
        print(_table(results, "knn_top1", f"k-NN (k = {pc.knn_k}) top-1 (%), bank of {len(bank_rows)}"), flush=True)
    if info.num_classes >= 100:
        print(_table(results, "linear_top5", "linear top-5 (%)"), flush=True)
    report = {"results": results, "seconds": seconds,
              "config": dict(dataclasses.asdict(ecfg), layers=layers, method=method, data=data, arch=arch,
                             dim=dim, seed=seed, world_size=world)}
    if ecfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(ecfg.out)), exist_ok=True)
        with open(ecfg.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``nat-eval``. Returns the exit status."""
    ecfg = parse_config(EvalConfig, argv, "nat-eval", "Linear probes and k-NN of a frozen encoder's layers.")
    try:
        evaluate(ecfg)
    except SettingError as e:  # a setting refused once the checkpoint or the data was read
        refuse("nat-eval", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
