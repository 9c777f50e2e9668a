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
import shutil
import signal
import time

import torch
import torch.distributed as dist

from .checkpoint import compat_diffs, load_checkpoint, previous_path
from .config import Config, SettingError
from .state import Assignment

__all__ = ["epoch_batches", "plot_metrics", "StopFlag", "EpochStats", "no_sync_allowed", "rng_state",
           "set_rng_state", "setup_processes", "resume", "move_aside", "RUN_FILES", "prepare_out", "write_summary",
           "stopped", "held_perm", "STOP_SIGNALS", "gather_rng", "scaled_lr", "build_scheduler", "continue_schedule", "amp_settings"]


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


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by SIGINT, SIGTERM or SIGUSR1 (what torchrun and SLURM send some seconds before a kill);
    the loop checkpoints and exits at the first step on which the ranks see it (:meth:`agreed`).

    Args:
        world: the number of processes; with several, construct it on every rank at the same point
            (it makes a gloo group when the default one is NCCL).
    """

    def __init__(self, world: int = 1) -> None:
        self.signum, self.world = 0, world
        # the flag is reduced on the CPU every step: through NCCL it would be a host sync per step
        self.group = dist.new_group(backend="gloo") if world > 1 and dist.get_backend() != "gloo" else None

    def __call__(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> dict:
        """Handle the stop signals; returns the old handlers (give them to :meth:`restore`)."""
        return {s: signal.signal(s, self) for s in STOP_SIGNALS}

    @staticmethod
    def restore(handlers: dict) -> None:
        for s, h in handlers.items():
            signal.signal(s, h)

    def agreed(self) -> int:
        """The signal received by any process (0: none). With several processes a collective on the
        CPU (microseconds), so call it at the same point on every rank: all then stop at the same step."""
        if self.world == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        agreed = int(flag)
        # a signal handled during the reduce (its handler runs when the call returns) is kept for the next
        # step: writing `agreed` over it would lose it
        self.signum = max(self.signum, agreed)
        return agreed


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
        self.wait_seconds = 0.0  # time this rank's loop waited for the loader (not saved: a per-session figure)
        self.logged = (0.0, 0, 0.0, 0.0)  # (loss_sum, images, seconds, wait_seconds) at the last log line

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

    def since_log(self) -> tuple[float, float, float]:
        """(mean loss, this rank's images/s, share of the time spent waiting for data) since the
        previous call: one read of the device."""
        now = (self.loss_sum.item(), self.images, self.seconds, self.wait_seconds)
        prev, self.logged = self.logged, now
        images, seconds = now[1] - prev[1], max(now[2] - prev[2], 1e-9)
        return (now[0] - prev[0]) / max(images, 1), images / seconds, min((now[3] - prev[3]) / seconds, 1.0)


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


def gather_rng(aug_gen: torch.Generator, world: int) -> list[dict]:
    """Every rank's :func:`rng_state`, in rank order (a collective when distributed): each rank
    draws its own augmentation, so an exact resume restores each rank's own."""
    if world == 1:
        return [rng_state(aug_gen)]
    states: list = [None] * world
    dist.all_gather_object(states, rng_state(aug_gen))
    return states


def set_rng_state(state: dict, aug_gen: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["cpu"])
    aug_gen.set_state(state["aug"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def setup_processes(cfg: Config) -> tuple[torch.device, int, int]:
    """(device, rank, world); joins the process group when launched by torchrun.

    The group's timeout is ``--dist-timeout`` minutes: every collective waits at most that long.
    The dataset-wide solve does not count against it: while rank 0 solves the sparse problem the
    other ranks poll the process group's store (``nat_ext.full_assign.assign_sharded``).
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


def build_scheduler(cfg: Config, opt: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0):
    """The per-step schedule: cosine from the base lr to 0 over ``total_steps``, or constant; with
    ``warmup_steps`` (``--warmup-epochs``), a linear warmup first (step s takes lr (s + 1) / W) and the
    schedule over the remaining steps, in closed form (a resume with another length recomputes it)."""
    if warmup_steps > 0:
        cosine = cfg.schedule == "cosine"

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            if not cosine:
                return 1.0
            span = max(total_steps - warmup_steps, 1)
            return (1 + math.cos(math.pi * min(step - warmup_steps, span) / span)) / 2
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
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


def _read_run(path: str) -> dict | None:
    """The checkpoint in ``path`` (None when there is none); an unreadable one (cut by a kill
    mid-write on a file system without atomic rename) falls back to the one it replaced."""
    if not os.path.exists(path):
        return None
    try:
        return load_checkpoint(path, map_location="cpu")
    except RuntimeError as e:
        prev = previous_path(path)
        if not os.path.exists(prev):
            raise
        print(f"warning: {e}; resuming from the previous checkpoint {prev}", flush=True)
        return load_checkpoint(prev, map_location="cpu")


def _agree_on_checkpoint(ck: dict | None, path: str, rank: int, world: int) -> None:
    # Every rank must resume from what rank 0 resumes from: a rank that sees another checkpoint (or
    # none: a node-local --out) would hang the first collective. One gather, before any other.
    if world == 1:
        return
    seen = None if ck is None else (ck["epoch"], ck["step"], ck["global_step"])
    views: list = [None] * world
    dist.all_gather_object(views, seen)
    if any(v != views[0] for v in views):
        described = "; ".join(f"rank {r}: " + ("no checkpoint" if v is None else f"epoch {v[0]} step {v[1]}")
                              for r, v in enumerate(views))
        raise SettingError(f"the ranks do not see the same checkpoint {path} ({described}): --out must be one "
                           "folder shared by every node")


def resume(cfg: Config, path: str, run_info: dict, parts: dict, aug_gen: torch.Generator, rank: int = 0,
           world: int = 1) -> dict | None:
    """Load ``path`` into the state dicts of ``parts`` after checking it belongs to this run.

    With several processes every rank calls it (at the same point, before any other collective):
    they check they see the same checkpoint, and each restores its own random state.

    Returns:
        the checkpoint's progress: epoch, step, global_step, epoch_stats, train_seconds, the
        labelled set and the last dataset-wide solve's record (``dataset_solve``, None in
        checkpoints written before it existed); None when there is no checkpoint.

    Raises:
        SettingError: naming every setting that differs from the checkpoint's run.
    """
    ck = _read_run(path)
    _agree_on_checkpoint(ck, path, rank, world)
    if ck is None:
        return None
    saved = ck["config"]
    diffs = compat_diffs(saved, run_info)
    if saved.get("objective") != cfg.objective:
        diffs.append(f"objective: checkpoint is a {saved.get('objective')!r} run, this run's objective is "
                     f"{cfg.objective!r}")
    if saved.get("reassign_scope", "batch") != cfg.reassign_scope:
        diffs.append(f"reassign_scope: checkpoint is a {saved.get('reassign_scope', 'batch')!r}-scope run, "
                     f"this run's reassign_scope is {cfg.reassign_scope!r}")
    if saved.get("world_size") != world:
        diffs.append(f"world size: checkpoint written by {saved.get('world_size')} processes, this run has "
                     f"{world} (the per-rank batch order depends on it: resume with the same number)")
    if cfg.objective == "nat" and ck["target_seed"] != cfg.seed:
        diffs.append(f"seed: checkpoint has target seed {ck['target_seed']}, --seed is {cfg.seed}")
    if ("aux" in ck) != ("aux" in parts):
        diffs.append(f"rotation head: checkpoint written with --rotation-loss {saved.get('rotation_loss', 0.0)}, "
                     f"this run has {cfg.rotation_loss} (resume with a weight that is 0 in both or in neither)")
    if ("labels" in ck) != ("labels" in parts):
        diffs.append("label head: the checkpoint's run and this one do not both use labels (--label-fraction, "
                     "--label-file)")
    if saved.get("nat_weight", 1.0) != cfg.nat_weight:
        diffs.append(f"nat_weight: checkpoint {saved.get('nat_weight', 1.0)}, this run {cfg.nat_weight}")
    if diffs:
        raise SettingError(f"checkpoint {path} is another run ({'; '.join(diffs)}): use that run's settings, "
                           "--no-resume to start afresh (its files are moved aside), or another --out")
    for name, part in parts.items():
        part.load_state_dict(ck[name])
    set_rng_state(ck.get("rng_ranks", [ck["rng"]] * world)[rank], aug_gen)
    return {**{k: ck[k] for k in ("epoch", "step", "global_step", "epoch_stats", "train_seconds")},
            "labelled": ck.get("labelled"), "dataset_solve": ck.get("dataset_solve")}


RUN_FILES = ("checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", "config.json", "curves.png", "eval.json", "tb")


def move_aside(out: str) -> str | None:
    """Move a previous run's files in ``out`` to ``out/previous-<UTC time>/`` (``--no-resume``; never
    deleted). Returns that folder, or None when ``out`` held none."""
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if not present:
        return None
    aside = os.path.join(out, "previous-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    while os.path.exists(aside):
        aside += "+"
    os.makedirs(aside)
    for f in present:
        shutil.move(os.path.join(out, f), os.path.join(aside, f))
    return aside


def _epoch_of(line: str) -> int | None:
    # a metrics line's epoch; None for a blank line or one cut by a kill mid-write
    try:
        return json.loads(line)["epoch"]
    except (ValueError, KeyError, TypeError):
        return None


def prepare_out(out: str, run_info: dict, start_epoch: int):
    """Write config.json, drop metrics lines of epochs that will be redone, open TensorBoard if installed."""
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(run_info, f, indent=1)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            kept = [l for l in f if _epoch_of(l) is not None and _epoch_of(l) < start_epoch]
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics_path + ".tmp", metrics_path)
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
          + "".join(f" {k} {row[k]:.3f}" for k in ("rotation_loss", "rotation_acc", "koleo", "label_loss", "label_acc")
                    if k in row)
          + (f" skipped {row['skipped']}" if row["skipped"] else ""), flush=True)


def stopped(why: str, signum: int, ckpt_path: str, epoch: int, step: int, assignment: Assignment | None,
            train_seconds: float, master: bool) -> dict:
    """The result of a run that stops before its last epoch (a signal, or ``--max-steps``), its
    checkpoint written: rank 0 says where and how to continue."""
    if master:
        print(f"\n{why}: saved {ckpt_path} at epoch {epoch} step {step}; "
              "run the same command again to continue", flush=True)
    return {"checkpoint": ckpt_path, "interrupted": signum, "perm": held_perm(assignment),
            "train_seconds": train_seconds, "eval": None}


def held_perm(assignment: Assignment | None) -> torch.Tensor | None:
    return assignment.perm.cpu().clone() if assignment is not None else None


