"""Evaluation of frozen encoders: linear probe and k-NN on a chosen layer.

``python -m nat_ext.eval --checkpoint runs/nat/checkpoint.pt`` (or
``nat-eval``) reads the layer's features (average-pooled to a ``grid x grid``
map), standardises them with the training-split statistics, fits a
multinomial logistic regression (full-batch L-BFGS) on the labelled training
split and reports top-1 on the test split, plus a cosine k-NN top-1.
Baselines from the same command, same layer and classifier: a randomly
initialised encoder of the same architecture (``random``), the raw pixels
(``pixels``) and a supervised encoder of the same architecture trained with the
evaluated run's settings (``supervised``, see :mod:`nat_ext.supervised`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .checkpoint import load_checkpoint
from .config import EvalConfig, ProbeConfig, parse_config, progress
from .data import collate, get_dataset
from .models import Encoder, build_model
from .supervised import supervised_config, train_supervised

__all__ = ["EvalConfig", "default_layer", "extract_features", "linear_probe", "knn_accuracy",
           "evaluate", "main"]

BASELINES = ("random", "pixels", "supervised")


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
    for x, y, _, _ in progress(loader, desc=f"features {layer}"):
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
    pc: ProbeConfig = ecfg.probe
    tx, ty = extract_features(model, train_ds, layer, pc.grid, device, pc.batch_size, ecfg.workers)
    if test_ds is None:
        perm = torch.randperm(len(ty), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(ty))
        vx, vy, tx, ty = tx[perm[cut:]], ty[perm[cut:]], tx[perm[:cut]], ty[perm[:cut]]
    else:
        vx, vy = extract_features(model, test_ds, layer, pc.grid, device, pc.batch_size, ecfg.workers)
    lin = linear_probe(tx, ty, vx, vy, num_classes, pc.probe_wd, pc.probe_iters)
    knn = knn_accuracy(tx, ty, vx, vy, num_classes, pc.knn_k)
    res = {"encoder": name, "layer": layer, "grid": pc.grid, "feature_dim": tx.shape[1],
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
    wanted = [b for b in ecfg.probe.baselines.split(",") if b]
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
    layer = ecfg.probe.layer or default_layer(arch)
    skip_corrupt = ecfg.skip_corrupt or c.get("skip_corrupt", False)
    train_ds, test_ds, info = _splits(data, ecfg.probe.limit, seed, c.get("image_size", 224), skip_corrupt)
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
        out = os.path.join(os.path.dirname(ecfg.out or ecfg.checkpoint or "runs/x") or ".", "supervised")
        run = dict(c, data=data, arch=arch, seed=seed, skip_corrupt=skip_corrupt)
        sup, _ = _load_encoder(train_supervised(supervised_config(
            run, out=out, epochs=ecfg.probe.supervised_epochs, device=str(device), workers=ecfg.workers)))
        results.append(_score(sup, "supervised", layer, ecfg, device, train_ds, test_ds, info.num_classes, seed))
    report = {"results": results, "config": dict(dataclasses.asdict(ecfg), layer=layer, data=data, arch=arch,
                                                 dim=dim, seed=seed)}
    if ecfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(ecfg.out)), exist_ok=True)
        with open(ecfg.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``nat-eval``. Returns the exit status."""
    evaluate(parse_config(EvalConfig, argv, "nat-eval", "Linear probe and k-NN of a frozen encoder."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
