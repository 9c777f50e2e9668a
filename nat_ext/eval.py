"""Evaluation of frozen encoders: linear probe and k-NN on a chosen layer.

``python -m nat_ext.eval --checkpoint runs/nat/checkpoint.pt`` (or
``nat-eval``) reads the layer's features (average-pooled to a ``grid x grid``
map), standardises them with the training-split statistics, fits a
multinomial logistic regression (full-batch L-BFGS) on the labelled training
split and reports top-1 on the test split, plus a cosine k-NN top-1.
Baselines from the same command, same layer and classifier: a randomly
initialised encoder of the same architecture (``random``), the raw pixels
(``pixels``) and a supervised encoder trained by :func:`nat_ext.train.train`
(``supervised``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .data import collate, get_dataset
from .models import Encoder, build_model

__all__ = ["EvalConfig", "default_layer", "extract_features", "linear_probe", "knn_accuracy",
           "evaluate", "main"]

BASELINES = ("random", "pixels", "supervised")


@dataclass
class EvalConfig:
    """Settings of an evaluation (plain values)."""
    checkpoint: str = ""        # trained encoder; empty: baselines only (needs data/arch/dim)
    data: str = ""              # default: the checkpoint's
    arch: str = ""              # default: the checkpoint's
    dim: int = 0                # default: the checkpoint's
    layer: str = ""             # default: last conv stage (see default_layer)
    grid: int = 2
    limit: int = 0              # seeded subsets of the labelled splits (0: all)
    baselines: str = "random,pixels"
    supervised_epochs: int = 10
    knn_k: int = 20
    probe_iters: int = 300
    probe_wd: float = 1e-4
    batch_size: int = 512
    device: str = "auto"
    workers: int = 0
    seed: int = -1              # default: the checkpoint's
    skip_corrupt: bool = False  # skip unreadable images instead of failing
    out: str = ""               # write results JSON here


def default_layer(arch: str) -> str:
    """The probe layer used unless one is named: the last convolutional stage."""
    return {"convnet": "conv4", "alexnet": "conv5"}.get(arch, "layer4")


@torch.no_grad()
def extract_features(model: Encoder, dataset, layer: str, grid: int, device: torch.device,
                     batch_size: int = 512, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of a frozen encoder (eval mode) for a whole dataset.

    Args:
        model: the encoder.
        dataset: yields (image, label, index), unaugmented.
        layer: stage name or ``pixels`` (see :meth:`Encoder.features`).
        grid: pooling grid.
        device: where the forward passes run.
        batch_size, workers: DataLoader settings.

    Returns:
        (Tensor[N, F] float32 CPU features, Tensor[N] int64 labels), in dataset order.
    """
    model.eval().to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate)
    feats, labels = [], []
    for x, y, _, _ in tqdm(loader, desc=f"features {layer}", leave=False, dynamic_ncols=True):
        x = x.to(device)
        if layer == "pixels" and x.shape[-1] > 32:  # keep raw-pixel probes tractable on large images
            x = F.adaptive_avg_pool2d(x, 32)
        feats.append(model.features(x, layer, grid).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _standardize(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
                 iters: int = 300) -> float:
    """Multinomial logistic regression on standardised features, top-1 on the test set.

    Args:
        train_x: Tensor[N, F] features; train_y: Tensor[N] labels.
        test_x: Tensor[M, F]; test_y: Tensor[M].
        num_classes: number of classes.
        weight_decay: L2 penalty on the weights (added to the mean cross-entropy).
        iters: L-BFGS iterations (full batch, strong-Wolfe line search: no learning rate to tune).

    Returns:
        top-1 accuracy in [0, 1].
    """
    train_x, test_x = _standardize(train_x.double(), test_x.double())
    w = torch.zeros(train_x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ w + b, train_y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (test_x @ w + b).argmax(1).eq(test_y).double().mean().item()


def knn_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, num_classes: int, k: int = 20) -> float:
    """Cosine k-NN (similarity-weighted vote) on standardised features.

    Args:
        train_x: Tensor[N, F]; train_y: Tensor[N].
        test_x: Tensor[M, F]; test_y: Tensor[M].
        num_classes: number of classes.
        k: neighbours.

    Returns:
        top-1 accuracy in [0, 1].
    """
    train_x, test_x = _standardize(train_x, test_x)
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    k = min(k, train_x.shape[0])
    correct = 0
    for i in range(0, test_x.shape[0], 1024):
        sim, nn_idx = (test_x[i:i + 1024] @ train_x.t()).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes).scatter_add_(1, train_y[nn_idx], sim.clamp_min(0) + 1e-6)
        correct += int(votes.argmax(1).eq(test_y[i:i + 1024]).sum())
    return correct / test_x.shape[0]


def _splits(data: str, limit: int, seed: int, image_size: int, skip_corrupt: bool):
    """(train dataset, test dataset or None, DataInfo). None: split train 80/20 (no val folder)."""
    kw = dict(augment=False, limit=limit or None, seed=seed, image_size=image_size, skip_corrupt=skip_corrupt)
    train_ds, info = get_dataset(data, "train", **kw)
    if data != "fashion-mnist" and not os.path.isdir(os.path.join(data, "val")):
        return train_ds, None, info
    test_ds, _ = get_dataset(data, "test", **kw)
    return train_ds, test_ds, info


def _score(model: Encoder, name: str, layer: str, ecfg: EvalConfig, device: torch.device,
           train_ds, test_ds, num_classes: int, seed: int) -> dict:
    t0 = time.perf_counter()
    tx, ty = extract_features(model, train_ds, layer, ecfg.grid, device, ecfg.batch_size, ecfg.workers)
    if test_ds is None:
        perm = torch.randperm(len(ty), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(ty))
        vx, vy, tx, ty = tx[perm[cut:]], ty[perm[cut:]], tx[perm[:cut]], ty[perm[:cut]]
    else:
        vx, vy = extract_features(model, test_ds, layer, ecfg.grid, device, ecfg.batch_size, ecfg.workers)
    lin = linear_probe(tx, ty, vx, vy, num_classes, ecfg.probe_wd, ecfg.probe_iters)
    knn = knn_accuracy(tx, ty, vx, vy, num_classes, ecfg.knn_k)
    res = {"encoder": name, "layer": layer, "grid": ecfg.grid, "feature_dim": tx.shape[1],
           "linear_top1": lin, "knn_top1": knn, "n_train": len(ty), "n_test": len(vy),
           "seconds": time.perf_counter() - t0}
    print(f"{name:>12s}  {layer:>7s}  dim {tx.shape[1]:5d}  linear {100 * lin:5.2f}%  "
          f"kNN {100 * knn:5.2f}%", flush=True)
    return res


def _load_encoder(path: str) -> tuple[Encoder, dict]:
    ck = load_checkpoint(path)
    c = ck["config"]
    nat = c["objective"] == "nat"
    model = build_model(c["arch"], c["dim"] if nat else c["num_classes"], c["in_channels"],
                        sobel=c["sobel"], small_input=c["small_input"],
                        normalize=nat)
    model.load_state_dict(ck["model"])
    return model, c


def evaluate(ecfg: EvalConfig) -> dict:
    """Probe a trained encoder and the requested baselines on the same layer.

    Args:
        ecfg: settings; see :class:`EvalConfig`.

    Returns:
        dict: ``results`` (list of per-encoder dicts with ``linear_top1`` and
        ``knn_top1``) and ``config``. Also written to ``ecfg.out`` if set.
    """
    wanted = [b for b in ecfg.baselines.split(",") if b]
    unknown = [b for b in wanted if b not in BASELINES]
    if unknown:
        raise ValueError(f"baselines should be among {BASELINES}, got {unknown}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if ecfg.device == "auto" else ecfg.device)
    trained, c = None, {}
    if ecfg.checkpoint:
        trained, c = _load_encoder(ecfg.checkpoint)
    data = ecfg.data or c.get("data")
    arch = ecfg.arch or c.get("arch")
    dim = ecfg.dim or c.get("dim")
    seed = ecfg.seed if ecfg.seed >= 0 else c.get("seed", 0)
    if not (data and arch and dim):
        raise ValueError("checkpoint is empty: give data, arch and dim for a baselines-only evaluation")
    layer = ecfg.layer or default_layer(arch)
    train_ds, test_ds, info = _splits(data, ecfg.limit, seed, c.get("image_size", 224),
                                      ecfg.skip_corrupt or c.get("skip_corrupt", False))
    sobel = c.get("sobel", False)
    results = []
    if trained is not None:
        name = c["objective"] if c["objective"] == "supervised" else (
            "nat" if c["reassign_every"] > 0 else "nat-frozen")
        results.append(_score(trained, name, layer, ecfg, device, train_ds, test_ds, info.num_classes, seed))
    if "random" in wanted:
        torch.manual_seed(seed)
        rnd = build_model(arch, dim, info.in_channels, sobel=sobel, small_input=info.small_input)
        results.append(_score(rnd, "random", layer, ecfg, device, train_ds, test_ds, info.num_classes, seed))
    if "pixels" in wanted:
        any_model = trained or build_model(arch, dim, info.in_channels, small_input=info.small_input)
        results.append(_score(any_model, "pixels", "pixels", ecfg, device, train_ds, test_ds,
                              info.num_classes, seed))
    if "supervised" in wanted:
        from .train import Config, train
        out = os.path.join(os.path.dirname(ecfg.out or ecfg.checkpoint or "runs/x") or ".", "supervised")
        tcfg = Config(data=data, arch=arch, epochs=ecfg.supervised_epochs, objective="supervised",
                      out=out, seed=seed, sobel=sobel, eval=False, device=str(device),
                      workers=ecfg.workers, limit=c.get("limit", 0))
        train(tcfg)
        sup, _ = _load_encoder(os.path.join(out, "checkpoint.pt"))
        results.append(_score(sup, "supervised", layer, ecfg, device, train_ds, test_ds, info.num_classes, seed))
    report = {"results": results, "config": dict(vars(ecfg), layer=layer, data=data, arch=arch, dim=dim, seed=seed)}
    if ecfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(ecfg.out)), exist_ok=True)
        with open(ecfg.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def build_parser() -> argparse.ArgumentParser:
    """argparse parser with one option per :class:`EvalConfig` field."""
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="nat-eval", description="Linear probe and k-NN of a frozen encoder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=d.checkpoint, help="checkpoint.pt from nat-train")
    p.add_argument("--data", default=d.data, help="default: the checkpoint's")
    p.add_argument("--arch", default=d.arch, help="default: the checkpoint's")
    p.add_argument("--dim", type=int, default=d.dim, help="default: the checkpoint's")
    p.add_argument("--layer", default=d.layer, help="stage to probe (default: last conv stage)")
    p.add_argument("--grid", type=int, default=d.grid, help="pool feature maps to grid x grid")
    p.add_argument("--limit", type=int, default=d.limit, help="seeded subsets of the labelled splits")
    p.add_argument("--baselines", default=d.baselines, help="comma list of random,pixels,supervised")
    p.add_argument("--supervised-epochs", type=int, default=d.supervised_epochs)
    p.add_argument("--knn-k", type=int, default=d.knn_k)
    p.add_argument("--probe-iters", type=int, default=d.probe_iters)
    p.add_argument("--probe-wd", type=float, default=d.probe_wd)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--device", default=d.device)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--seed", type=int, default=d.seed, help="default: the checkpoint's")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images")
    p.add_argument("--out", default=d.out, help="write the results JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``nat-eval``. Returns the exit status."""
    args = build_parser().parse_args(argv)
    evaluate(EvalConfig(**vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
