"""Run plumbing of the training loop: the data order, processes, signals, resume, schedule,
output files and per-epoch statistics; everything :func:`nat_ext.train.train` needs that is not
a step of NAT itself (those are in :mod:`nat_ext.reassign`).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os

import torch
import torch.distributed as dist

from .checkpoint import check_compatible, load_checkpoint
from .config import Config, SettingError
from .state import Assignment

__all__ = ["epoch_batches", "plot_metrics", "StopFlag", "EpochStats", "no_sync_allowed", "rng_state",
           "set_rng_state", "setup_processes", "resume", "prepare_out", "write_summary", "agreed_signal",
           "stopped", "held_perm", "scaled_lr", "build_scheduler", "continue_schedule", "amp_settings"]


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
        raise SettingError(f"--batch-size should be at most the {per_rank} images per process, got {batch_size}")
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


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints and exits after the current step."""

    def __init__(self) -> None:
        self.signum = 0

    def __call__(self, signum, frame) -> None:
        self.signum = signum


class EpochStats:
    """Totals of the current epoch; the loss and the changed count stay on the device."""

    def __init__(self, device: torch.device, saved: dict | None = None) -> None:
        s = saved or {}
        self.loss_sum = torch.tensor(float(s.get("loss_sum", 0.0)), dtype=torch.float64, device=device)
        self.changed = torch.tensor(int(s.get("changed", 0)), dtype=torch.int64, device=device)
        self.images, self.skipped = int(s.get("images", 0)), int(s.get("skipped", 0))
        self.seconds, self.assign_seconds = float(s.get("seconds", 0.0)), float(s.get("assign_seconds", 0.0))
        self.reassign_info = dict(s.get("reassign_info", {}))  # the dataset-wide reassignment's figures
        # the auxiliary terms' per-step means times the step's images (issue 19; empty without them)
        self.aux_sums = {k: torch.tensor(float(v), dtype=torch.float64, device=device)
                         for k, v in s.get("aux_sums", {}).items()}
        self.logged = (0.0, 0)  # (loss_sum, images) at the last log line

    def add_aux(self, name: str, value: torch.Tensor, images: int) -> None:
        """Add an auxiliary term's step mean ``value`` (Tensor[], on the device), weighted by the step's images."""
        if name not in self.aux_sums:
            self.aux_sums[name] = torch.zeros((), dtype=torch.float64, device=self.loss_sum.device)
        self.aux_sums[name] += value.detach().double() * images

    def state_dict(self) -> dict:
        """Plain numbers for the checkpoint (reads the device)."""
        state = {"loss_sum": self.loss_sum.item(), "images": self.images, "changed": int(self.changed),
                 "skipped": self.skipped, "seconds": self.seconds, "assign_seconds": self.assign_seconds,
                 "reassign_info": self.reassign_info}
        if self.aux_sums:
            state["aux_sums"] = {k: v.item() for k, v in self.aux_sums.items()}
        return state

    def loss_since_log(self) -> float:
        """Mean loss since the previous call (one read of the device)."""
        loss_sum = self.loss_sum.item()
        (prev_sum, prev_images), self.logged = self.logged, (loss_sum, self.images)
        return (loss_sum - prev_sum) / max(self.images - prev_images, 1)


@contextlib.contextmanager
def no_sync_allowed(enabled: bool):
    """Inside, any CUDA host sync raises (``torch.cuda.set_sync_debug_mode('error')``)."""
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def rng_state(aug_gen: torch.Generator) -> dict:
    """The generators' states for the checkpoint (CPU, the augmentation generator, CUDA)."""
    state = {"cpu": torch.get_rng_state(), "aug": aug_gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, aug_gen: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["cpu"])
    aug_gen.set_state(state["aug"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def setup_processes(cfg: Config) -> tuple[torch.device, int, int]:
    """(device, rank, world); joins the process group when launched by torchrun.

    The group's timeout is ``--dist-timeout`` minutes: every collective waits at most that long,
    and the other ranks wait at the broadcast while rank 0 alone solves the dataset-wide
    assignment, so it must cover that solve (NCCL's default, 10 minutes, does not at scale).
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda" and cfg.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if not distributed:
        return device, 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=cfg.dist_timeout))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if dist.get_rank() == 0:
        print(f"{dist.get_world_size()} processes ({dist.get_backend()}), process-group timeout "
              f"{cfg.dist_timeout} min", flush=True)
    return device, dist.get_rank(), dist.get_world_size()


def scaled_lr(cfg: Config, world: int) -> float:
    """The run's base learning rate: ``--lr``, times ``batch_size x world / 256`` with ``--lr-scale linear``
    (the linear scaling rule of Goyal et al.: the global batch over the 256 the lr was set for)."""
    if cfg.lr_scale == "linear":
        return cfg.lr * cfg.batch_size * world / 256
    return cfg.lr


def build_scheduler(cfg: Config, opt: torch.optim.Optimizer, total_steps: int):
    """The per-step schedule: cosine from the base lr to 0 over ``total_steps``, or constant."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def continue_schedule(sched, opt: torch.optim.Optimizer, total_steps: int) -> bool:
    """After a resume with another ``--epochs``: put the cosine schedule on the new length.

    The loaded scheduler keeps the old ``T_max`` (with a longer run the lr would climb back
    from 0). This sets ``T_max`` to ``total_steps`` and each group's lr to the closed-form value
    of the new schedule at the step reached, ``base (1 + cos(pi step / T_max)) / 2``, so from
    there the lr is that of a run launched with the new ``--epochs`` (to float rounding; the
    steps before the resume followed the old length). Returns whether anything changed.
    """
    if not isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR) or sched.T_max == max(total_steps, 1):
        return False
    sched.T_max = max(total_steps, 1)
    step = min(sched.last_epoch, sched.T_max)
    for group, base in zip(opt.param_groups, sched.base_lrs):
        group["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * step / sched.T_max)) / 2
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    return True


def amp_settings(cfg: Config, device: torch.device) -> tuple[torch.dtype, bool]:
    """(autocast dtype, whether a GradScaler is needed): ``--amp-dtype``, bf16 by default on CPU
    and CUDA alike (no scaler, so no host sync per step); fp16 needs the scaler."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp_dtype]
    return dtype, cfg.amp and dtype == torch.float16


def resume(cfg: Config, path: str, run_info: dict, parts: dict, aug_gen: torch.Generator) -> dict:
    """Load ``path`` into the state dicts of ``parts`` after checking it belongs to this run.

    Returns:
        the checkpoint's progress: epoch, step, global_step, epoch_stats, train_seconds.
    """
    ck = load_checkpoint(path, map_location="cpu")
    saved = ck["config"]
    check_compatible(saved, run_info, path)
    if saved.get("objective") != cfg.objective:
        raise SettingError(f"checkpoint {path} is a {saved.get('objective')!r} run, "
                         f"this run's objective is {cfg.objective!r}")
    if saved.get("reassign_scope", "batch") != cfg.reassign_scope:
        raise SettingError(f"checkpoint {path} is a {saved.get('reassign_scope', 'batch')!r}-scope run, "
                         f"this run's reassign_scope is {cfg.reassign_scope!r}")
    if saved.get("world_size") != run_info["world_size"]:
        raise SettingError(f"checkpoint {path} was written by {saved.get('world_size')} "
                         f"processes; resume with the same number (got {run_info['world_size']})")
    if cfg.objective == "nat" and ck["target_seed"] != cfg.seed:
        raise SettingError(f"checkpoint {path} has target seed {ck['target_seed']}, --seed is {cfg.seed}")
    if ("aux" in ck) != ("aux" in parts):
        raise SettingError(f"checkpoint {path} was written with --rotation-loss "
                         f"{saved.get('rotation_loss', 0.0)}, this run has {cfg.rotation_loss}: a rotation head "
                         "exists in one and not the other; resume with a weight that is 0 in both or in neither")
    for name, part in parts.items():
        part.load_state_dict(ck[name])
    set_rng_state(ck["rng"], aug_gen)
    return {k: ck[k] for k in ("epoch", "step", "global_step", "epoch_stats", "train_seconds")}


def prepare_out(out: str, run_info: dict, start_epoch: int):
    """Write config.json, drop metrics lines of epochs that will be redone, open TensorBoard if installed."""
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(run_info, f, indent=1)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            kept = [l for l in f if l.strip() and json.loads(l)["epoch"] < start_epoch]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(os.path.join(out, "tb"))
    except ImportError:  # tensorboard is optional
        return None


def write_summary(row: dict, out: str, writer, epochs: int) -> None:
    """Append the epoch's row to metrics.jsonl, TensorBoard and curves.png; print its line."""
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for k in ("loss", "changed_frac", "images_per_s", "lr"):
            writer.add_scalar(k, row[k], row["epoch"] + 1)
    plot_metrics(os.path.join(out, "metrics.jsonl"), os.path.join(out, "curves.png"))
    print(f"epoch {row['epoch'] + 1}/{epochs} loss {row['loss']:.4f} changed "
          f"{row['changed_frac']:.3f} {row['images_per_s']:.0f} img/s"
          + "".join(f" {k} {row[k]:.1f}" for k in ("objective_held", "objective", "objective_end") if k in row)
          + "".join(f" {k} {row[k]:.3f}" for k in ("rotation_loss", "rotation_acc", "koleo") if k in row)
          + (f" skipped {row['skipped']}" if row["skipped"] else ""), flush=True)


def agreed_signal(stop: StopFlag, world: int, device: torch.device) -> int:
    """The signal received by any process (0: none); a collective when distributed, so all stop together."""
    if world == 1:
        return stop.signum
    flag = torch.tensor([stop.signum], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stop.signum = int(flag)
    return stop.signum


def stopped(why: str, signum: int, ckpt_path: str, epoch: int, step: int, assignment: Assignment | None,
            train_seconds: float, master: bool) -> dict:
    """The result of a run that stops before its last epoch (a signal, or ``--max-steps``), its
    checkpoint written: rank 0 says where and how to continue."""
    if master:
        print(f"\n{why}: saved {ckpt_path} at epoch {epoch} step {step}; "
              "rerun with --resume to continue", flush=True)
    return {"checkpoint": ckpt_path, "interrupted": signum, "perm": held_perm(assignment),
            "train_seconds": train_seconds, "eval": None}


def held_perm(assignment: Assignment | None) -> torch.Tensor | None:
    return assignment.perm.cpu().clone() if assignment is not None else None


