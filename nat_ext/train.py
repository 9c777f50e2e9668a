"""NAT training: one loop that reads top to bottom, settings from :class:`nat_ext.config.Config`.

Run ``python -m nat_ext.train --data fashion-mnist`` (or ``nat-train``) for
the defaults: a 60k-parameter conv net trained with NAT on Fashion-MNIST, then
the linear probe of :mod:`nat_ext.eval` printed at the end. Multi-process with
``torchrun --nproc-per-node N -m nat_ext.train ...`` (NCCL on GPUs, gloo on CPU).

On a GPU the step never waits for the host: the permutation and the targets live on
the device, the reassignment uses the sync-free ``assign_ex`` (its outcome is checked
at the epoch end), and the loss is summed on the device and read every
``--log-every`` steps. ``--sync-debug`` makes any host sync inside the step an error.

``--reassign-scope dataset`` replaces the per-batch reassignment by one exact assignment of
the whole training set (``nat_ext.assign_full``) at the start of each reassigning epoch, on
features extracted in eval mode without augmentation (:func:`dataset_features`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from .align import check_sinkhorn, sinkhorn_plan
from .checkpoint import check_compatible, load_checkpoint, save_checkpoint
from .faults import SolverFaultError
from .config import Config, EvalConfig, check_choices, parse_config, progress
from .data import batch_augment, collate, get_dataset
from .eval import evaluate
from .full_assign import assign_full
from .models import build_model
from .state import Assignment
from .targets import Targets, check_target_set

__all__ = ["Config", "train", "main", "epoch_batches", "reassigns_on", "reassign", "align_batch",
           "check_settings", "target_set", "dataset_features", "centre_features", "assignment_objective",
           "reassign_dataset", "plot_metrics"]


# ----------------------------------------------------------------------------- pure helpers

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


def reassigns_on(cfg: Config, epoch: int) -> bool:
    """The reassignment schedule: NAT reassigns on every batch of epochs 0, k, 2k, ... (k = ``reassign_every``)."""
    return cfg.objective == "nat" and cfg.reassign_every > 0 and epoch % cfg.reassign_every == 0


def target_generator(cfg: Config) -> str:
    """The generator of the run's targets: ``--target-generator``, where ``auto`` means philox
    (on the device) with ``--targets-from-seed`` and pcg64 (the generator of earlier runs) otherwise."""
    if cfg.target_generator != "auto":
        return cfg.target_generator
    return "philox" if cfg.targets_from_seed else "pcg64"


def target_set(cfg: Config) -> str:
    """The run's target set as one string (recorded in checkpoints, compared on resume):
    ``sphere``, ``onehot:k`` or ``clustered:k:spread``."""
    if cfg.targets == "onehot":
        return f"onehot:{cfg.num_prototypes}"
    if cfg.targets == "clustered":
        return f"clustered:{cfg.num_prototypes}:{cfg.target_spread!r}"
    return "sphere"


def check_settings(cfg: Config, n: int) -> None:
    """Raise ValueError, naming the options, for values and combinations that cannot train
    ``n`` images (called before anything is trained; the choices are checked before, by
    ``check_choices``).

    Args:
        cfg: the run's settings.
        n: number of training images.
    """
    if cfg.reassign_every < 0:
        raise ValueError(f"reassign_every should be >= 0, got {cfg.reassign_every}")
    if cfg.objective != "nat":
        changed = [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k, v in
                   (("targets", "sphere"), ("align", "exact"), ("views", 1)) if getattr(cfg, k) != v]
        if changed:
            raise ValueError(f"objective {cfg.objective!r} trains on the labels: {', '.join(changed)} "
                             "apply to NAT only")
        return
    check_target_set(cfg.targets, n, cfg.dim, cfg.num_prototypes, cfg.target_spread)
    if cfg.align == "sinkhorn":
        check_sinkhorn(cfg.sinkhorn_eps, cfg.sinkhorn_iters)
    if cfg.reassign_scope == "dataset":
        if cfg.align != "exact":
            raise ValueError("align sinkhorn works on a batch's b x b scores: use --reassign-scope batch with it "
                             "(the dataset-wide reassignment is exact)")
        if cfg.targets == "onehot":
            raise ValueError("targets onehot with --reassign-scope dataset: each prototype is n/k identical "
                             "targets, so assign_full's candidate lists grow towards n/k per row; use "
                             "--reassign-scope batch")


def _exchange(idx: torch.Tensor, new: torch.Tensor, batch_size: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (image, new target) pairs of this step; -1 pads short batches (skipped images)."""
    pad = batch_size - idx.numel()
    mine = torch.stack([F.pad(idx, (0, pad), value=-1), F.pad(new, (0, pad), value=-1)])
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    both = torch.cat(parts, dim=1)
    return both[0], both[1]


def reassign(assignment: Assignment, targets: Targets, idx: torch.Tensor, feats: torch.Tensor,
             batch_size: int, world: int) -> torch.Tensor:
    """NAT's reassignment of one batch: its images swap the targets they hold.

    The exact ``b x b`` assignment maximising the summed feature-target dot products
    (``assign_ex``, no host sync); with several processes every process applies every
    process's swaps, so all hold the same permutation.

    Args:
        assignment: the permutation, on the training device.
        targets: the run's targets.
        idx: Tensor[b] image indices of this process's batch, on the device.
        feats: Tensor[b, d] the batch's features.
        batch_size: the configured batch size (pads short batches for the exchange).
        world: number of processes.

    Returns:
        Tensor[] int64 on the device: images whose target changed, over all processes.
    """
    new = assignment.reassign(idx, feats.detach().float(), targets.rows)
    if world > 1:
        idx, new = _exchange(idx, new, batch_size, world)
    return assignment.update(idx, new)


def align_batch(cfg: Config, assignment: Assignment, targets: Targets, idx: torch.Tensor,
                views: list[torch.Tensor], world: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A reassigning step: align the batch's images with the targets they hold, update the held
    permutation, and give each view the targets its loss is taken against.

    * ``--align exact``, one view: NAT's reassignment (:func:`reassign`); the loss targets are the new ones.
    * ``--align sinkhorn``: the Sinkhorn plan between the features and the held targets; the loss is
      taken against the plan-weighted targets (a soft target per image, so an image whose scores are
      close for several targets is not forced onto one of them), and the held permutation becomes the
      plan rounded to the nearest permutation (so later epochs and batches still hold one target each).
    * two views: each view's alignment gives the other view's loss targets (swapped prediction); the
      held permutation follows the alignment of both views' summed scores (exact: the solve on the
      summed features; sinkhorn: the rounded mean plan).

    Args:
        cfg: the run's settings (``align``, ``sinkhorn_*``, ``batch_size``).
        assignment, targets: the run's permutation and targets.
        idx: Tensor[b] the batch's image indices, on the device.
        views: one Tensor[b, d] of features per view.
        world: number of processes.

    Returns:
        (one Tensor[b, d] of loss targets per view, Tensor[] images whose target changed, all processes).
    """
    if cfg.align == "exact" and len(views) == 1:
        changed = reassign(assignment, targets, idx, views[0], cfg.batch_size, world)
        return [targets.rows(assignment.targets_of(idx))], changed
    feats = [f.detach().float() for f in views]
    if cfg.align == "exact":
        per_view = [assignment.reassign(idx, f, targets.rows) for f in feats]
        loss_rows = [targets.rows(t) for t in per_view]
        keep = assignment.reassign(idx, sum(feats), targets.rows)
    else:
        rows = targets.rows(assignment.targets_of(idx))
        plans = [sinkhorn_plan(f @ rows.t(), cfg.sinkhorn_eps, cfg.sinkhorn_iters) for f in feats]
        loss_rows = [p @ rows for p in plans]
        keep = assignment.reassign_plan(idx, sum(plans) / len(plans))
    if len(loss_rows) == 2:
        loss_rows = loss_rows[::-1]  # each view is pulled towards the other view's alignment
    if world > 1:
        idx, keep = _exchange(idx, keep, cfg.batch_size, world)
    return loss_rows, assignment.update(idx, keep)


@torch.no_grad()
def dataset_features(model: torch.nn.Module, dataset, dim: int, batch_size: int, device: torch.device,
                     rank: int = 0, world: int = 1) -> torch.Tensor:
    """The embeddings of the whole training set, for the dataset-wide assignment and the objective.

    Eval mode (batch norm on its running statistics) and no augmentation: the features are a
    pure function of the weights, the same whatever the batch composition, and the pass changes
    no state (no running-statistics update, no draw from any generator), so training and exact
    resume are unaffected. With several processes each rank embeds its contiguous shard of rows
    and the shards are all-gathered, so every rank returns the same tensor. Leaves the model in
    eval mode (the loop sets train mode at each epoch start).

    Args:
        model: the encoder (not the DDP wrapper: no collective inside the forward).
        dataset: the unaugmented training set, yielding (image, label, index); the rows of
            images it skips (``--skip-corrupt``) are zero, so they score 0 with every target.
        dim: the embedding dimension.
        batch_size: images per forward pass.
        device: where the forward passes run.
        rank, world: process index and count.

    Returns:
        Tensor[n, d] float32 on ``device``, row i the embedding of image i.
    """
    n = len(dataset)
    shard = -(-n // world)
    lo, hi = min(rank * shard, n), min((rank + 1) * shard, n)
    model.eval()
    loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, collate_fn=collate)
    mine = torch.zeros(shard, dim, device=device)  # skipped (unreadable) images keep a zero row
    for x, _, idx, _ in loader:
        if idx.numel():
            mine[idx.to(device) - lo] = model(x.to(device)).float()  # idx: dataset indices
    if world == 1:
        return mine[:n]
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    return torch.cat(every)[:n]


def assignment_objective(feats: torch.Tensor, target_matrix: torch.Tensor, perm: torch.Tensor) -> float:
    """NAT's assignment objective sum_i f_i . t_P(i), summed in float64.

    Args:
        feats: Tensor[n, d] the images' embeddings.
        target_matrix: Tensor[n, d] every target, row t on the device of ``feats``.
        perm: Tensor[n] int64, the target of each image.
    """
    return float((feats.double() * target_matrix.index_select(0, perm.to(feats.device)).double()).sum())


def centre_features(feats: torch.Tensor) -> torch.Tensor:
    """``feats`` minus their mean row (taken in float64): what the dataset-wide solve is given.

    Centring changes every one-to-one assignment's total by the same constant
    (``-mean . sum_j t_j``: every target is held once), so the optimum is the same; it halves the
    candidates ``assign_full`` needs on the near-parallel features of an untrained network.
    """
    return feats - feats.double().mean(0).to(feats.dtype)


def _checksum(perm: torch.Tensor) -> torch.Tensor:
    # Order-sensitive: sum_i (i + 1) perm[i] (< 2^63 for n up to 3.5M).
    return ((torch.arange(perm.numel(), device=perm.device) + 1) * perm).sum()


def reassign_dataset(assignment: Assignment, target_matrix: torch.Tensor, feats: torch.Tensor,
                     rank: int = 0, world: int = 1) -> tuple[torch.Tensor, dict]:
    """The dataset-wide reassignment: the exact assignment of all n images to all n targets.

    Solved by ``nat_ext.assign_full`` from the held permutation (its pairs warm the solve and
    keep the sparse problem feasible). With several processes rank 0 solves, broadcasts the
    permutation, and every rank compares checksums of the held and the new permutation with
    every other rank (RuntimeError on a mismatch) before applying it.

    Args:
        assignment: the permutation, on the training device.
        target_matrix: Tensor[n, d] every target.
        feats: Tensor[n, d] every image's embedding (the same on every rank).
        rank, world: process index and count.

    Returns:
        (Tensor[] int64 images whose target changed, dict with ``objective_held`` and
        ``objective`` (sum_i f_i . t_P(i) before and after), ``rounds`` and ``solve_seconds``).
    """
    t0 = time.perf_counter()
    held = assignment.perm.clone()
    stats: dict = {}
    if rank == 0:
        centred = centre_features(feats)
        new = assign_full(centred, target_matrix.to(feats.dtype), init=held, stats=stats)
        del centred
    else:
        new = torch.empty_like(held)
    if world > 1:
        dist.broadcast(new, 0)
        sums = torch.stack([_checksum(held), _checksum(new)])
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            which = "held" if lo[0] != hi[0] else "new"
            raise RuntimeError(f"rank {rank}: the {which} permutation differs between ranks "
                               f"(checksums {lo.tolist()} vs {hi.tolist()}) in the dataset-wide reassignment")
    info = {"objective_held": assignment_objective(feats, target_matrix, held),
            "objective": assignment_objective(feats, target_matrix, new),
            "rounds": int(stats.get("rounds", 0)), "solve_seconds": time.perf_counter() - t0}
    changed = assignment.update(torch.arange(held.numel(), device=held.device), new)
    return changed, info


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


# ----------------------------------------------------------------------------- run plumbing

class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints and exits after the current step."""

    def __init__(self) -> None:
        self.signum = 0

    def __call__(self, signum, frame) -> None:
        self.signum = signum


class _EpochStats:
    """Totals of the current epoch; the loss and the changed count stay on the device."""

    def __init__(self, device: torch.device, saved: dict | None = None) -> None:
        s = saved or {}
        self.loss_sum = torch.tensor(float(s.get("loss_sum", 0.0)), dtype=torch.float64, device=device)
        self.changed = torch.tensor(int(s.get("changed", 0)), dtype=torch.int64, device=device)
        self.images, self.skipped = int(s.get("images", 0)), int(s.get("skipped", 0))
        self.seconds, self.assign_seconds = float(s.get("seconds", 0.0)), float(s.get("assign_seconds", 0.0))
        self.reassign_info = dict(s.get("reassign_info", {}))  # the dataset-wide reassignment's figures
        self.logged = (0.0, 0)  # (loss_sum, images) at the last log line

    def state_dict(self) -> dict:
        """Plain numbers for the checkpoint (reads the device)."""
        return {"loss_sum": self.loss_sum.item(), "images": self.images, "changed": int(self.changed),
                "skipped": self.skipped, "seconds": self.seconds, "assign_seconds": self.assign_seconds,
                "reassign_info": self.reassign_info}

    def loss_since_log(self) -> float:
        """Mean loss since the previous call (one read of the device)."""
        loss_sum = self.loss_sum.item()
        (prev_sum, prev_images), self.logged = self.logged, (loss_sum, self.images)
        return (loss_sum - prev_sum) / max(self.images - prev_images, 1)


@contextlib.contextmanager
def _no_sync_allowed(enabled: bool):
    """Inside, any CUDA host sync raises (``torch.cuda.set_sync_debug_mode('error')``)."""
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


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


def _setup_processes(cfg: Config) -> tuple[torch.device, int, int]:
    """(device, rank, world); joins the process group when launched by torchrun."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if not distributed:
        return device, 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def _resume(cfg: Config, path: str, run_info: dict, parts: dict, aug_gen: torch.Generator) -> dict:
    """Load ``path`` into the state dicts of ``parts`` after checking it belongs to this run.

    Returns:
        the checkpoint's progress: epoch, step, global_step, epoch_stats, train_seconds.
    """
    ck = load_checkpoint(path, map_location="cpu")
    saved = ck["config"]
    check_compatible(saved, run_info, path)
    if saved.get("objective") != cfg.objective:
        raise ValueError(f"checkpoint {path} is a {saved.get('objective')!r} run, "
                         f"this run's objective is {cfg.objective!r}")
    if saved.get("reassign_scope", "batch") != cfg.reassign_scope:
        raise ValueError(f"checkpoint {path} is a {saved.get('reassign_scope', 'batch')!r}-scope run, "
                         f"this run's reassign_scope is {cfg.reassign_scope!r}")
    if saved.get("world_size") != run_info["world_size"]:
        raise ValueError(f"checkpoint {path} was written by {saved.get('world_size')} "
                         f"processes; resume with the same number (got {run_info['world_size']})")
    if cfg.objective == "nat" and ck["target_seed"] != cfg.seed:
        raise ValueError(f"checkpoint {path} has target seed {ck['target_seed']}, --seed is {cfg.seed}")
    for name, part in parts.items():
        part.load_state_dict(ck[name])
    _set_rng_state(ck["rng"], aug_gen)
    return {k: ck[k] for k in ("epoch", "step", "global_step", "epoch_stats", "train_seconds")}


def _prepare_out(out: str, run_info: dict, start_epoch: int):
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


def _epoch_summary(stats: _EpochStats, assignment: Assignment | None, epoch: int, reassigned: bool,
                   n: int, world: int, lr: float, global_step: int) -> dict:
    """The epoch's metrics row, summed over ranks; checks the assignment (solver outcome,
    invariant, same permutation on every rank). Waits for the device."""
    tot = torch.stack([stats.loss_sum, torch.tensor(float(stats.images), dtype=torch.float64,
                                                    device=stats.loss_sum.device),
                       torch.tensor(float(stats.skipped), dtype=torch.float64, device=stats.loss_sum.device)])
    if world > 1:
        dist.all_reduce(tot)
    loss_sum, images, skipped = tot.tolist()
    if assignment is not None:
        if world > 1:  # every rank reports (and raises) the failures of all ranks alike
            dist.all_reduce(assignment.solver_status)
        assignment.check()
        if world > 1:
            ref = assignment.perm.clone()
            dist.broadcast(ref, 0)
            if not torch.equal(ref, assignment.perm):
                raise RuntimeError(f"rank {dist.get_rank()}: assignment permutation differs from rank 0's")
    seconds = max(stats.seconds, 1e-9)
    return {"epoch": epoch, "loss": loss_sum / max(images, 1),
            "changed_frac": int(stats.changed) / n if assignment is not None else 0.0,
            "reassigned": reassigned, "images_per_s": images / seconds,
            "assign_frac": stats.assign_seconds / seconds, "skipped": int(skipped), "lr": lr,
            "seconds": stats.seconds, "step": global_step, **stats.reassign_info}


def _write_summary(row: dict, out: str, writer, epochs: int) -> None:
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for k in ("loss", "changed_frac", "images_per_s", "lr"):
            writer.add_scalar(k, row[k], row["epoch"] + 1)
    plot_metrics(os.path.join(out, "metrics.jsonl"), os.path.join(out, "curves.png"))
    print(f"epoch {row['epoch'] + 1}/{epochs} loss {row['loss']:.4f} changed "
          f"{row['changed_frac']:.3f} {row['images_per_s']:.0f} img/s"
          + "".join(f" {k} {row[k]:.1f}" for k in ("objective_held", "objective", "objective_end") if k in row)
          + (f" skipped {row['skipped']}" if row["skipped"] else ""), flush=True)


# ----------------------------------------------------------------------------- the loop

def train(cfg: Config) -> dict:
    """Train an encoder with NAT (or the supervised baseline) as set by ``cfg``.

    Writes to ``cfg.out``: ``checkpoint.pt`` (every epoch and on SIGINT/SIGTERM),
    ``metrics.jsonl``, ``curves.png``, ``config.json``, TensorBoard events when
    tensorboard is installed, and ``eval.json`` when ``cfg.eval``.

    Args:
        cfg: the run's settings.

    Returns:
        dict with ``checkpoint`` (path), ``interrupted`` (signal number or 0),
        ``perm`` (Tensor[n] final assignment, CPU), ``train_seconds`` and ``eval``
        (results or None).
    """
    check_choices(cfg)  # before any process group or data: a bad choice fails at once
    # processes, data, model, targets, optimizer
    device, rank, world = _setup_processes(cfg)
    master = rank == 0
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    torch.manual_seed(cfg.seed)  # same model init on every rank
    dataset, info = get_dataset(cfg.data, "train", augment=True, limit=cfg.limit or None,
                                image_size=cfg.image_size, skip_corrupt=cfg.skip_corrupt, seed=cfg.seed,
                                views=cfg.views)
    n = len(dataset)
    check_settings(cfg, n)
    nat = cfg.objective == "nat"
    model = build_model(cfg.arch, cfg.dim if nat else info.num_classes, info.in_channels,
                        sobel=cfg.sobel, small_input=info.small_input, normalize=nat).to(device)
    # What a checkpoint must agree on to be resumed (see checkpoint.COMPAT_KEYS).
    run_info = dict(dataclasses.asdict(cfg), target_generator=target_generator(cfg), n_images=n,
                    in_channels=info.in_channels, num_classes=info.num_classes,
                    small_input=info.small_input, world_size=world, target_set=target_set(cfg))
    targets = Targets(n, cfg.dim, seed=cfg.seed, materialize=not cfg.targets_from_seed, device=device,
                      generator=run_info["target_generator"], kind=cfg.targets,
                      num_prototypes=cfg.num_prototypes, spread=cfg.target_spread) if nat else None
    assignment = Assignment(n, seed=cfg.seed, device=device) if nat else None
    # the dataset-wide pass (reassignment and objective): unaugmented images, every target
    whole = nat and cfg.reassign_every > 0 and (cfg.reassign_scope == "dataset" or cfg.track_objective)
    plain = dataset if info.batch_augment or not whole else \
        get_dataset(cfg.data, "train", augment=False, limit=cfg.limit or None, image_size=cfg.image_size,
                    skip_corrupt=cfg.skip_corrupt, seed=cfg.seed)[0]
    target_matrix = (targets.matrix if targets.matrix is not None else
                     targets.rows(torch.arange(n, device=device))) if whole else None
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(epoch_batches(n, cfg.batch_size, cfg.seed, 0, rank, world))
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs * steps_per_epoch, 1))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + rank)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and amp_dtype == torch.float16)

    # resume
    parts = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}
    if nat:
        parts["assignment"] = assignment
    at = {"epoch": 0, "step": 0, "global_step": 0, "epoch_stats": None, "train_seconds": 0.0}
    if cfg.resume and os.path.exists(ckpt_path):
        at = _resume(cfg, ckpt_path, run_info, parts, aug_gen)
        if master:
            print(f"resumed from {ckpt_path} at epoch {at['epoch']} step {at['step']}", flush=True)
    start_step, global_step, train_seconds = at["step"], at["global_step"], at["train_seconds"]
    writer = _prepare_out(cfg.out, run_info, at["epoch"]) if master else None

    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    stop = _StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    no_sync = cfg.sync_debug and device.type == "cuda"

    def checkpoint(epoch: int, step: int, stats: _EpochStats | None) -> None:
        if master:
            state = {name: part.state_dict() for name, part in parts.items()}
            save_checkpoint(dict(state, target_seed=cfg.seed, epoch=epoch, step=step, global_step=global_step,
                                 epoch_stats=stats.state_dict() if stats else None,
                                 train_seconds=train_seconds, rng=_rng_state(aug_gen), config=run_info),
                            ckpt_path)
        if world > 1:
            dist.barrier()

    try:
        for epoch in range(at["epoch"], cfg.epochs):
            batches = epoch_batches(n, cfg.batch_size, cfg.seed, epoch, rank, world)
            loader = DataLoader(dataset, batch_sampler=batches[start_step:], num_workers=cfg.workers,
                                collate_fn=collate, pin_memory=device.type == "cuda")
            reassigning = reassigns_on(cfg, epoch)
            stats = _EpochStats(device, at["epoch_stats"] if epoch == at["epoch"] else None)
            # reassign over the whole dataset, once, at the epoch start (done already when resuming mid-epoch)
            if reassigning and cfg.reassign_scope == "dataset" and start_step == 0:
                t0 = time.perf_counter()
                feats = dataset_features(model, plain, cfg.dim, cfg.probe.batch_size, device, rank, world)
                t_extract = time.perf_counter() - t0
                changed, stats.reassign_info = reassign_dataset(assignment, target_matrix, feats, rank, world)
                stats.changed += changed
                stats.reassign_info["extract_seconds"] = t_extract
                stats.assign_seconds += time.perf_counter() - t0
                stats.seconds += time.perf_counter() - t0
                del feats
            per_batch = reassigning and cfg.reassign_scope == "batch"
            model.train()
            t_last = time.perf_counter()
            bar = progress(loader, total=len(batches), initial=start_step, disable=not master,
                           desc=f"epoch {epoch + 1}/{cfg.epochs}")
            for step, (x, y, idx, skipped) in enumerate(bar, start=start_step):
                x, y, idx = (t.to(device, non_blocking=True) for t in (x, y, idx))
                with _no_sync_allowed(no_sync):
                    # forward: every view of the batch in one pass
                    if info.batch_augment:  # in-memory data: augment on the device, batched
                        x = torch.cat([batch_augment(x, aug_gen) for _ in range(cfg.views)])
                    elif cfg.views > 1:  # the dataset stacked the views: Tensor[b, views, C, H, W]
                        x = x.transpose(0, 1).flatten(0, 1)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                        out = net(x)
                    views = list(out.chunk(cfg.views))
                    # reassign: on scheduled epochs the batch's images share out their targets anew
                    if per_batch:
                        t0 = time.perf_counter()
                        loss_rows, changed = align_batch(cfg, assignment, targets, idx, views, world)
                        stats.changed += changed
                        stats.assign_seconds += time.perf_counter() - t0
                    elif nat:
                        loss_rows = [targets.rows(assignment.targets_of(idx))] * cfg.views
                    # loss: squared distance to the targets (NAT; views averaged), or cross-entropy (supervised)
                    if nat:
                        loss = sum((v.float() - t).pow(2).sum(dim=1).mean() for v, t in zip(views, loss_rows))
                        loss = loss / cfg.views
                    else:
                        loss = F.cross_entropy(out.float(), y)
                    # backward, update
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    stats.loss_sum += loss.detach().double() * idx.numel()
                global_step += 1
                stats.images += idx.numel()
                stats.skipped += skipped
                now = time.perf_counter()
                stats.seconds, t_last = stats.seconds + now - t_last, now

                # log every log_every steps (the only read of the device inside the epoch)
                log_step = cfg.log_every > 0 and (step + 1) % cfg.log_every == 0
                if log_step and master:
                    if bar.disable:
                        print(f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{len(batches)} "
                              f"loss {stats.loss_since_log():.4f}", flush=True)
                    else:
                        bar.set_postfix(loss=f"{stats.loss_since_log():.4f}")

                # stop on SIGINT/SIGTERM: checked every step alone, at log steps with several processes
                if (world == 1 or log_step) and _agreed_signal(stop, world, device):
                    checkpoint(epoch, step + 1, stats)
                    return _interrupted(stop, ckpt_path, epoch, step + 1, assignment, train_seconds, master)
            bar.close()

            # epoch summary, checkpoint
            try:
                row = _epoch_summary(stats, assignment, epoch, reassigning, n, world,
                                     sched.get_last_lr()[0], global_step)
            except SolverFaultError:  # NAT_CUDA_FALLBACK=raise: stop, keeping the epoch's work
                train_seconds += stats.seconds
                checkpoint(epoch + 1, 0, None)
                raise
            if reassigning and cfg.track_objective:  # measurement only: not in the epoch's time
                t0 = time.perf_counter()
                feats = dataset_features(model, plain, cfg.dim, cfg.probe.batch_size, device, rank, world)
                row["objective_end"] = assignment_objective(feats, target_matrix, assignment.perm)
                row["objective_seconds"] = time.perf_counter() - t0
                del feats
            train_seconds += stats.seconds
            start_step = 0
            if master:
                _write_summary(row, cfg.out, writer, cfg.epochs)
            checkpoint(epoch + 1, 0, None)
            if world > 1 and _agreed_signal(stop, world, device):
                return _interrupted(stop, ckpt_path, epoch + 1, 0, assignment, train_seconds, master)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if writer is not None:
            writer.close()
        if world > 1:
            dist.destroy_process_group()

    # evaluate (rank 0)
    result = None
    if cfg.eval and master:
        result = evaluate(EvalConfig(checkpoint=ckpt_path, probe=cfg.probe, device=str(device),
                                     workers=cfg.workers, out=os.path.join(cfg.out, "eval.json")))
    return {"checkpoint": ckpt_path, "interrupted": 0, "perm": _perm(assignment),
            "train_seconds": train_seconds, "eval": result}


def _agreed_signal(stop: _StopFlag, world: int, device: torch.device) -> int:
    """The signal received by any process (0: none); a collective when distributed, so all stop together."""
    if world == 1:
        return stop.signum
    flag = torch.tensor([stop.signum], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stop.signum = int(flag)
    return stop.signum


def _interrupted(stop: _StopFlag, ckpt_path: str, epoch: int, step: int, assignment: Assignment | None,
                 train_seconds: float, master: bool) -> dict:
    if master:
        print(f"\nsignal {stop.signum}: saved {ckpt_path} at epoch {epoch} step {step}; "
              "rerun with --resume to continue", flush=True)
    return {"checkpoint": ckpt_path, "interrupted": stop.signum, "perm": _perm(assignment),
            "train_seconds": train_seconds, "eval": None}


def _perm(assignment: Assignment | None) -> torch.Tensor | None:
    return assignment.perm.cpu().clone() if assignment is not None else None


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``nat-train``. Returns the exit status."""
    cfg = parse_config(Config, argv, "nat-train", "Train an encoder with Noise As Targets.")
    res = train(cfg)
    if res["interrupted"]:
        return 128 + res["interrupted"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
