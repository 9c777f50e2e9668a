"""NAT training: one loop, a dataclass of plain settings, argparse.

Run ``python -m nat_ext.train --data fashion-mnist`` (or ``nat-train``) for
the defaults: a 60k-parameter conv net trained with NAT on Fashion-MNIST, then
the linear probe of :mod:`nat_ext.eval` printed at the end. Multi-process with
``torchrun --nproc-per-node N -m nat_ext.train ...`` (NCCL on GPUs, gloo on CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import check_compatible, load_checkpoint, save_checkpoint
from .data import batch_augment, collate, get_dataset
from .models import ARCHS, build_model
from .state import Assignment
from .targets import Targets

__all__ = ["Config", "train", "main", "epoch_batches", "plot_metrics"]


@dataclass
class Config:
    """Settings of a run (plain values only: they go into the checkpoint)."""
    data: str = "fashion-mnist"     # built-in dataset name or ImageFolder path
    arch: str = "convnet"
    dim: int = 64                   # target dimension d
    epochs: int = 10
    batch_size: int = 256           # per process
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    schedule: str = "cosine"        # cosine | constant
    reassign_every: int = 3         # reassign on epochs 0, k, 2k...; 0 freezes the assignment (ablation)
    objective: str = "nat"          # nat | supervised (baseline encoder, cross-entropy on labels)
    workers: int = 0
    device: str = "auto"
    amp: bool = False
    out: str = "runs/nat"
    resume: bool = False
    seed: int = 0
    limit: int = 0                  # use a seeded subset of this many training images (0: all)
    image_size: int = 224           # crop size for ImageFolder data
    sobel: bool = False
    targets_from_seed: bool = False  # regenerate target rows from the seed instead of keeping Tensor[n, d]
    skip_corrupt: bool = False
    eval: bool = True               # linear probe + k-NN after training (rank 0)
    eval_layer: str = ""            # default: the last conv stage of the arch
    eval_grid: int = 2
    eval_limit: int = 0             # probe on a subset of the labelled splits (0: all)
    eval_baselines: str = "random,pixels"


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world: int = 1) -> list[list[int]]:
    """This rank's batches of an epoch: a seeded shuffle, split evenly over ranks.

    Every rank gets the same number of full batches (the remainder is dropped)
    so collective calls line up; ranks hold disjoint images.

    Args:
        n: dataset size.
        batch_size: per-rank batch size.
        seed, epoch: the order is a pure function of these (exact resume mid-epoch).
        rank, world: process index and count.

    Returns:
        list of batches, each a list of ``batch_size`` image indices.
    """
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2 ** 63))
    order = torch.randperm(n, generator=g)
    per_rank = n // world
    steps = per_rank // batch_size
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {per_rank} images per process")
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    return mine[:steps * batch_size].view(steps, batch_size).tolist()


def plot_metrics(metrics_path: str, png_path: str) -> None:
    """Plot the per-epoch curves of a metrics JSONL file to a PNG.

    Args:
        metrics_path: JSONL written by :func:`train`.
        png_path: output image.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    keys = [k for k in ("loss", "changed_frac", "images_per_s") if k in rows[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, k in zip(axes if len(keys) > 1 else [axes], keys):
        ax.plot([r["epoch"] + 1 for r in rows], [r[k] for r in rows], marker="o")
        ax.set_xlabel("epoch")
        ax.set_title(k)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints and exits after the current step."""

    def __init__(self) -> None:
        self.signum = 0

    def __call__(self, signum, frame) -> None:
        self.signum = signum


def _rng_state(aug_gen: torch.Generator) -> dict:
    state = {"cpu": torch.get_rng_state(), "aug": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, aug_gen: torch.Generator) -> None:
    torch.set_rng_state(state["cpu"])
    aug_gen.set_state(state["aug"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg: Config) -> dict:
    """Train an encoder with NAT (or the supervised baseline) as set by ``cfg``.

    Writes to ``cfg.out``: ``checkpoint.pt`` (every epoch and on SIGINT/SIGTERM),
    ``metrics.jsonl``, ``curves.png``, ``config.json``, TensorBoard events when
    tensorboard is installed, and ``eval.json`` when ``cfg.eval``.

    Args:
        cfg: the run's settings.

    Returns:
        dict with ``checkpoint`` (path), ``interrupted`` (signal number or 0),
        ``perm`` (Tensor[n] final assignment), ``train_seconds`` and ``eval``
        (results or None).
    """
    if cfg.objective not in ("nat", "supervised"):
        raise ValueError(f"objective should be 'nat' or 'supervised', got {cfg.objective!r}")
    if cfg.arch not in ARCHS:
        raise ValueError(f"arch should be one of {ARCHS}, got {cfg.arch!r}")
    if cfg.reassign_every < 0:
        raise ValueError(f"reassign_every should be >= 0, got {cfg.reassign_every}")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    master = rank == 0
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")

    torch.manual_seed(cfg.seed)  # same model init on every rank
    dataset, info = get_dataset(cfg.data, "train", augment=True, limit=cfg.limit or None,
                                image_size=cfg.image_size, skip_corrupt=cfg.skip_corrupt, seed=cfg.seed)
    n = len(dataset)
    nat = cfg.objective == "nat"
    model = build_model(cfg.arch, cfg.dim if nat else info.num_classes, info.in_channels,
                        sobel=cfg.sobel, small_input=info.small_input, normalize=nat).to(device)
    # What a checkpoint must agree on to be resumed (see checkpoint.COMPAT_KEYS).
    run_info = dict(dataclasses.asdict(cfg), n_images=n, in_channels=info.in_channels,
                    num_classes=info.num_classes, small_input=info.small_input, world_size=world)
    targets = Targets(n, cfg.dim, seed=cfg.seed, materialize=not cfg.targets_from_seed,
                      device=device) if nat else None
    assignment = Assignment(n, seed=cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    batches_per_epoch = len(epoch_batches(n, cfg.batch_size, cfg.seed, 0, rank, world))
    total_steps = cfg.epochs * batches_per_epoch
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    elif cfg.schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    else:
        raise ValueError(f"schedule should be 'cosine' or 'constant', got {cfg.schedule!r}")
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + rank)
    use_amp = cfg.amp
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)

    start_epoch, start_step, global_step, stats = 0, 0, 0, None
    train_seconds = 0.0
    if cfg.resume and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path, map_location="cpu")
        check_compatible(ck["config"], run_info, ckpt_path)
        if ck["config"].get("objective") != cfg.objective:
            raise ValueError(f"checkpoint {ckpt_path} is a {ck['config'].get('objective')!r} run, "
                             f"this run's objective is {cfg.objective!r}")
        if ck["config"].get("world_size") != world:
            raise ValueError(f"checkpoint {ckpt_path} was written by {ck['config'].get('world_size')} "
                             f"processes; resume with the same number (got {world})")
        if nat and ck["target_seed"] != cfg.seed:
            raise ValueError(f"checkpoint {ckpt_path} has target seed {ck['target_seed']}, --seed is {cfg.seed}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        assignment.load_state_dict(ck["assignment"])
        _set_rng_state(ck["rng"], aug_gen)
        start_epoch, start_step, global_step = ck["epoch"], ck["step"], ck["global_step"]
        stats, train_seconds = ck["epoch_stats"], ck["train_seconds"]
        if master:
            print(f"resumed from {ckpt_path} at epoch {start_epoch} step {start_step}", flush=True)
    if master:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(run_info, f, indent=1)
        if os.path.exists(metrics_path):  # drop lines of epochs that will be redone
            with open(metrics_path) as f:
                kept = [l for l in f if l.strip() and json.loads(l)["epoch"] < start_epoch]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
    writer = None
    if master:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(cfg.out, "tb"))
        except ImportError:  # tensorboard is optional
            writer = None

    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if distributed else model
    stop = _StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint(epoch: int, step: int) -> None:
        if master:
            save_checkpoint({
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "assignment": assignment.state_dict(), "target_seed": cfg.seed,
                "epoch": epoch, "step": step, "global_step": global_step,
                "epoch_stats": stats, "train_seconds": train_seconds,
                "rng": _rng_state(aug_gen), "config": run_info,
            }, ckpt_path)
        if distributed:
            dist.barrier()

    try:
        for epoch in range(start_epoch, cfg.epochs):
            batches = epoch_batches(n, cfg.batch_size, cfg.seed, epoch, rank, world)
            loader = DataLoader(dataset, batch_sampler=batches[start_step:], num_workers=cfg.workers,
                                collate_fn=collate, pin_memory=device.type == "cuda")
            reassign = nat and cfg.reassign_every > 0 and epoch % cfg.reassign_every == 0
            if stats is None:
                stats = {"loss_sum": 0.0, "images": 0, "changed": 0, "skipped": 0,
                         "seconds": 0.0, "assign_seconds": 0.0}
            model.train()
            t_last = time.perf_counter()
            bar = tqdm(loader, total=len(batches), initial=start_step, disable=not master,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
            for step, (x, y, idx, skipped) in enumerate(bar, start=start_step):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if info.batch_augment:  # in-memory data: augment on the device, batched
                    x = batch_augment(x, aug_gen)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    out = net(x)
                if nat:
                    if reassign:
                        t0 = time.perf_counter()
                        new = assignment.reassign(idx, out.detach().float(), targets.rows)
                        if distributed:  # every rank applies every rank's update: same perm everywhere
                            pad = cfg.batch_size - idx.numel()  # batches may be short after skipped images
                            mine = torch.stack([F.pad(idx, (0, pad), value=-1), F.pad(new, (0, pad), value=-1)])
                            mine = mine.to(device) if device.type == "cuda" else mine  # NCCL needs CUDA tensors
                            parts = [torch.empty_like(mine) for _ in range(world)]
                            dist.all_gather(parts, mine)
                            for part in parts:
                                part = part.cpu()
                                keep = part[0] >= 0
                                stats["changed"] += assignment.update(part[0][keep], part[1][keep])
                        else:
                            stats["changed"] += assignment.update(idx, new)
                        stats["assign_seconds"] += time.perf_counter() - t0
                    tgt = targets.rows(assignment.perm[idx]).to(device)
                    loss = (out.float() - tgt).pow(2).sum(dim=1).mean()
                else:
                    loss = F.cross_entropy(out.float(), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                global_step += 1
                stats["loss_sum"] += loss.item() * idx.numel()
                stats["images"] += idx.numel()
                stats["skipped"] += skipped
                now = time.perf_counter()
                stats["seconds"] += now - t_last
                t_last = now
                if master:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                signum = stop.signum
                if distributed:  # stop together, or collectives would hang
                    flag = torch.tensor([signum], device=device if device.type == "cuda" else "cpu")
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    signum = int(flag)
                if signum:
                    checkpoint(epoch, step + 1)
                    if master:
                        print(f"\nsignal {signum}: saved {ckpt_path} at epoch {epoch} step {step + 1}; "
                              "rerun with --resume to continue", flush=True)
                    return {"checkpoint": ckpt_path, "interrupted": signum, "perm": assignment.perm,
                            "train_seconds": train_seconds, "eval": None}
            bar.close()
            # Epoch summary, summed over ranks (changed is already global: updates are all-gathered).
            tot = torch.tensor([stats["loss_sum"], stats["images"], stats["skipped"]], dtype=torch.float64)
            if distributed:
                dist.all_reduce(tot)
            train_seconds += stats["seconds"]
            row = {"epoch": epoch, "loss": tot[0].item() / max(tot[1].item(), 1),
                   "changed_frac": stats["changed"] / n if nat else 0.0,
                   "reassigned": reassign, "images_per_s": tot[1].item() / max(stats["seconds"], 1e-9),
                   "assign_frac": stats["assign_seconds"] / max(stats["seconds"], 1e-9),
                   "skipped": int(tot[2].item()), "lr": sched.get_last_lr()[0],
                   "seconds": stats["seconds"], "step": global_step}
            if nat:
                assignment.check()
                if distributed:  # every rank must hold the same permutation
                    ref = assignment.perm.to(device) if device.type == "cuda" else assignment.perm.clone()
                    dist.broadcast(ref, 0)
                    if not torch.equal(ref.cpu(), assignment.perm):
                        raise RuntimeError(f"rank {rank}: assignment permutation differs from rank 0's")
            stats, start_step = None, 0
            if master:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if writer is not None:
                    for k in ("loss", "changed_frac", "images_per_s", "lr"):
                        writer.add_scalar(k, row[k], epoch + 1)
                plot_metrics(metrics_path, os.path.join(cfg.out, "curves.png"))
                print(f"epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.4f} changed "
                      f"{row['changed_frac']:.3f} {row['images_per_s']:.0f} img/s"
                      + (f" skipped {row['skipped']}" if row["skipped"] else ""), flush=True)
            checkpoint(epoch + 1, 0)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if writer is not None:
            writer.close()
        if distributed:
            dist.destroy_process_group()

    result = None
    if cfg.eval and master:
        from .eval import EvalConfig, evaluate
        ecfg = EvalConfig(checkpoint=ckpt_path, layer=cfg.eval_layer, grid=cfg.eval_grid,
                          limit=cfg.eval_limit, baselines=cfg.eval_baselines, device=str(device),
                          workers=cfg.workers, out=os.path.join(cfg.out, "eval.json"))
        result = evaluate(ecfg)
    return {"checkpoint": ckpt_path, "interrupted": 0, "perm": assignment.perm,
            "train_seconds": train_seconds, "eval": result}


def build_parser() -> argparse.ArgumentParser:
    """argparse parser with one option per :class:`Config` field."""
    p = argparse.ArgumentParser(prog="nat-train", description="Train an encoder with Noise As Targets.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = Config()
    p.add_argument("--data", default=d.data, help="'fashion-mnist' or an ImageFolder path (DIR/train, DIR/val)")
    p.add_argument("--arch", default=d.arch, choices=ARCHS)
    p.add_argument("--dim", type=int, default=d.dim, help="target dimension d")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", default=d.schedule, choices=("cosine", "constant"))
    p.add_argument("--reassign-every", type=int, default=d.reassign_every,
                   help="reassign targets on every k-th epoch; 0 freezes the initial random assignment")
    p.add_argument("--objective", default=d.objective, choices=("nat", "supervised"))
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1...")
    p.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    p.add_argument("--out", default=d.out, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if present")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--limit", type=int, default=d.limit, help="train on a seeded subset (0: all)")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--sobel", action="store_true", help="fixed Sobel front end")
    p.add_argument("--targets-from-seed", action="store_true",
                   help="regenerate target rows from the seed instead of storing the n x d matrix")
    p.add_argument("--skip-corrupt", action="store_true", help="skip and count unreadable images")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip the final linear probe")
    p.add_argument("--eval-layer", default=d.eval_layer)
    p.add_argument("--eval-grid", type=int, default=d.eval_grid)
    p.add_argument("--eval-limit", type=int, default=d.eval_limit)
    p.add_argument("--eval-baselines", default=d.eval_baselines,
                   help="comma list of random,pixels,supervised ('' for none)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``nat-train``. Returns the exit status."""
    args = build_parser().parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    res = train(cfg)
    if res["interrupted"]:
        return 128 + res["interrupted"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
