"""NAT's reassignment steps: which epochs reassign, the per-batch swap of targets (and its
variants), and the passes over the whole training set (the dataset-wide exact assignment and
the objective).

Memory per rank scales with ``n``, not ``n x d`` (docs/imagenet.md has the table at
n = 1,281,167): the targets are never held as a table with ``--targets-from-seed`` (every pass
over all of them regenerates them chunk by chunk, :meth:`nat_ext.targets.Targets.chunks`), the
objective is summed batch by batch as the images are embedded, and the dataset-wide solve
keeps each rank's shard of the features where it was made (``assign_sharded``: only candidate
lists and duals travel between ranks).
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from .align import sinkhorn_plan
from .config import Config, SettingError, parse_crops
from .data import collate, shard_rows, usable_cpus
from .full_assign import SolveInterrupted, assign_sharded
from .state import Assignment
from .targets import CHUNK_ELEMS, Targets, check_target_set

__all__ = ["reassigns_on", "target_generator", "target_set", "check_settings", "reassign", "align_batch",
           "dataset_features", "dataset_objective", "feature_mean", "centre_features", "assignment_objective",
           "reassign_dataset", "TEST_SOLVE_SLEEP"]


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
    """Raise SettingError, naming the options, for combinations that cannot train ``n`` images
    (called once the data is known, before anything is trained; each value alone was checked
    before, by ``config.validate``).

    Args:
        cfg: the run's settings.
        n: number of training images.
    """
    if cfg.label_fraction > 0 and cfg.label_file:
        raise SettingError("--label-fraction and --label-file both name the labelled images: give one")
    if cfg.objective != "nat":  # (with labels: the supervised model of those labels alone)
        changed = [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k, v in
                   (("targets", "sphere"), ("align", "exact"), ("views", 1), ("rotation_loss", 0.0),
                    ("koleo", 0.0), ("crops", ""), ("nat_weight", 1.0)) if getattr(cfg, k) != v]
        if changed:
            raise SettingError(f"objective {cfg.objective!r} trains on the labels: {', '.join(changed)} "
                               "apply to NAT only")
        return
    if cfg.nat_weight == 0:
        if not (cfg.rotation_loss > 0 or cfg.koleo > 0 or cfg.label_fraction > 0 or cfg.label_file):
            raise SettingError("--nat-weight 0 leaves no term to train: give --rotation-loss, --koleo or labels")
        if cfg.crops and parse_crops(cfg.crops)[1]:
            raise SettingError(f"--crops {cfg.crops}: local crops regress to NAT's targets, and --nat-weight is 0")
    try:
        check_target_set(cfg.targets, n, cfg.dim, cfg.num_prototypes, cfg.target_spread)
    except ValueError as e:
        raise SettingError(f"--targets {cfg.targets}: {e}") from None
    if cfg.reassign_scope == "dataset":
        if cfg.align != "exact":
            raise SettingError("--align sinkhorn works on a batch's b x b scores: use --reassign-scope batch with "
                               "it (the dataset-wide reassignment is exact)")
        if cfg.targets == "onehot":
            raise SettingError("--targets onehot with --reassign-scope dataset: each prototype is n/k identical "
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


def _embed(model: torch.nn.Module, dataset, lo: int, hi: int, batch_size: int, device: torch.device,
           workers: int = 0, prepare: Callable | None = None):
    # (Tensor[b] row indices into the dataset, Tensor[b, d] embeddings) for rows lo..hi, eval mode
    model.eval()
    loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size, collate_fn=collate,
                        num_workers=workers, pin_memory=device.type == "cuda")
    for x, _, idx, _ in loader:
        if idx.numel():
            idx = idx.to(device, non_blocking=True)
            x = x.to(device, non_blocking=True)
            yield idx, model(prepare(x) if prepare is not None else x)


@torch.no_grad()
def dataset_features(model: torch.nn.Module, dataset, dim: int, batch_size: int, device: torch.device,
                     rank: int = 0, world: int = 1, dtype: torch.dtype = torch.float32,
                     workers: int = 0, prepare: Callable | None = None) -> torch.Tensor:
    """This rank's shard of the training set's embeddings: what the dataset-wide solve is given.

    Eval mode (batch norm on its running statistics) and no augmentation: the features are a
    pure function of the weights, the same whatever the batch composition, and the pass changes
    no state (no running-statistics update, no draw from any generator), so training and exact
    resume are unaffected. Each rank embeds its contiguous shard of rows, rows ``lo..hi`` of
    :func:`nat_ext.data.shard_rows`, and keeps it where it was made: nothing is gathered, no rank
    holds more than ``ceil(n / world)`` rows. Leaves the model in eval mode (the loop sets train
    mode at each epoch start).

    Args:
        model: the encoder (not the DDP wrapper: no collective inside the forward).
        dataset: the unaugmented training set, yielding (image, label, index); the rows of
            images it skips (``--skip-corrupt``) are zero, so they score 0 with every target.
        dim: the embedding dimension.
        batch_size: images per forward pass (``--extract-batch-size``).
        device: where the forward passes run.
        rank, world: process index and count.
        dtype: of the shard (float32, or bfloat16: half the memory).
        workers: DataLoader worker processes of the pass.
        prepare: applied to each batch on the device before the model (uint8 data:
            ``nat_ext.presets.DeviceTransform`` without a generator, i.e. no flip).

    Returns:
        Tensor[hi - lo, d] of ``dtype`` on ``device``: row r the embedding of image ``lo + r``
        (with one process, every image's: Tensor[n, d]).
    """
    lo, hi, _ = shard_rows(len(dataset), rank, world)
    mine = torch.zeros(hi - lo, dim, dtype=dtype, device=device)  # skipped (unreadable) images keep a zero row
    for idx, f in _embed(model, dataset, lo, hi, batch_size, device, workers, prepare):
        mine[idx - lo] = f.to(dtype)
    return mine


@torch.no_grad()
def dataset_objective(model: torch.nn.Module, dataset, targets: Targets, perm: torch.Tensor, batch_size: int,
                      device: torch.device, rank: int = 0, world: int = 1, workers: int = 0,
                      prepare: Callable | None = None) -> float:
    """NAT's objective over the whole training set, ``sum_i f_i . t_P(i)``, batch by batch.

    Each rank embeds its shard of rows (as :func:`dataset_features`: eval mode, unaugmented, no
    state changed) and adds each batch's ``f_i . t_P(i)`` (the held targets regenerated in the
    features' dtype, products summed in float64) to a float64 total as it goes; the totals are
    summed over ranks. Nothing of size ``n x d`` exists on any rank.

    Args:
        model: the encoder (not the DDP wrapper).
        dataset: the unaugmented training set.
        targets: the run's targets.
        perm: Tensor[n] int64, the target of each image (on ``device``).
        batch_size, device, rank, world, workers, prepare: as :func:`dataset_features`.

    Returns:
        the total, the same on every rank.
    """
    lo, hi, _ = shard_rows(len(dataset), rank, world)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for idx, f in _embed(model, dataset, lo, hi, batch_size, device, workers, prepare):
        t = targets.rows(perm.index_select(0, idx)).to(f.dtype)
        total += (f.double() * t.double()).sum()
    if world > 1:
        dist.all_reduce(total)
    return float(total)


def assignment_objective(feats: torch.Tensor, targets: Targets | torch.Tensor, perm: torch.Tensor,
                         chunk_elems: int = CHUNK_ELEMS) -> float:
    """NAT's assignment objective sum_i f_i . t_P(i), chunk by chunk, summed in float64.

    The targets are taken (``Targets``: regenerated) ``chunk_elems / d`` rows at a time, in the
    features' dtype; each chunk's products are summed in float64 and added to a float64 total,
    so the work space is one chunk, never ``n x d`` (the unchunked sum differs by float64
    rounding only; tested).

    Args:
        feats: Tensor[n, d] the images' embeddings.
        targets: the run's targets, or Tensor[n, d] every target (row t).
        perm: Tensor[n] int64, the target of each image.
        chunk_elems: rows per chunk times d.
    """
    total = torch.zeros((), dtype=torch.float64, device=feats.device)
    for lo, t in _held_targets(feats, targets, perm, chunk_elems):
        total += (feats[lo:lo + t.shape[0]].double() * t.double()).sum()
    return float(total)


def _held_targets(feats: torch.Tensor, targets: Targets | torch.Tensor, perm: torch.Tensor, chunk_elems: int):
    # (offset, Tensor[c, d] in feats' dtype on feats' device): the targets perm gives feats' rows, chunk by chunk
    perm = perm.to(feats.device)
    if isinstance(targets, Targets):
        chunks = targets.chunks(perm, dtype=feats.dtype, chunk_elems=chunk_elems)
    else:
        step = max(1, chunk_elems // max(feats.shape[1], 1))
        chunks = ((lo, targets.index_select(0, perm[lo:lo + step].to(targets.device)).to(feats.device, feats.dtype))
                  for lo in range(0, perm.numel(), step))
    for lo, t in chunks:
        yield lo, t.to(feats.device)


def feature_mean(feats: torch.Tensor, n: int | None = None, world: int = 1,
                 chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """The mean row of the features of every rank: float64 Tensor[d] on ``feats``' device.

    Each rank sums its shard in float64 chunk by chunk (no float64 copy of the shard), the sums
    are all-reduced, and the total is divided by ``n``.

    Args:
        feats: Tensor[r, d] this rank's shard (with one process, every row).
        n: the rows over all ranks (default ``feats.shape[0]``, one process).
        world: number of processes; above 1 an ``all_reduce`` on the default group (call it on every rank).
        chunk_elems: rows per chunk times d.
    """
    rows, d = feats.shape
    step = max(1, chunk_elems // max(d, 1))
    total = torch.zeros(d, dtype=torch.float64, device=feats.device)
    for lo in range(0, rows, step):
        total += feats[lo:lo + step].double().sum(0)
    if world > 1:
        dist.all_reduce(total)
    return total / max(rows if n is None else n, 1)


def centre_features(feats: torch.Tensor, mean: torch.Tensor | None = None, inplace: bool = False,
                    chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """``feats`` minus their mean row (taken in float64, subtracted in ``feats``' dtype): what the
    dataset-wide solve is given.

    Centring changes every one-to-one assignment's total by the same constant
    (``-mean . sum_j t_j``: every target is held once), so the optimum is the same; it halves the
    candidates the solve needs on the near-parallel features of an untrained network.

    Args:
        feats: Tensor[r, d] the features (with several processes: this rank's shard).
        mean: float64 Tensor[d] the mean row to subtract (:func:`feature_mean`, all ranks'); None:
            ``feats``' own.
        inplace: subtract in place, chunk by chunk (no second copy of the shard), and return ``feats``.
        chunk_elems: rows per chunk times d (``inplace``).
    """
    mean = (feature_mean(feats, chunk_elems=chunk_elems) if mean is None else mean).to(feats.dtype)
    if not inplace:
        return feats - mean
    step = max(1, chunk_elems // max(feats.shape[1], 1))
    for lo in range(0, feats.shape[0], step):
        feats[lo:lo + step] -= mean
    return feats


def _checksum(perm: torch.Tensor) -> torch.Tensor:
    # Order-sensitive: sum_i (i + 1) perm[i] (< 2^63 for n up to 3.5M).
    return ((torch.arange(perm.numel(), device=perm.device) + 1) * perm).sum()


def _same_on_every_rank(perm: torch.Tensor, which: str, rank: int, world: int) -> None:
    # RuntimeError on every rank when the ranks' permutations differ (a diverged state)
    if world == 1:
        return
    s = _checksum(perm).reshape(1)
    lo, hi = s.clone(), s.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"rank {rank}: the {which} permutation differs between ranks "
                           f"(checksums {int(lo)} vs {int(hi)}) in the dataset-wide reassignment")


def _objective_and_target_sum(feats: torch.Tensor, targets: Targets | torch.Tensor, perm: torch.Tensor,
                              chunk_elems: int = CHUNK_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
    # (float64 Tensor[] sum_i f_i . t_perm(i), float64 Tensor[d] sum_i t_perm(i)) over feats' rows, chunk by chunk
    total = torch.zeros((), dtype=torch.float64, device=feats.device)
    tsum = torch.zeros(feats.shape[1], dtype=torch.float64, device=feats.device)
    for lo, t in _held_targets(feats, targets, perm, chunk_elems):
        t = t.double()
        total += (feats[lo:lo + t.shape[0]].double() * t).sum()
        tsum += t.sum(0)
    return total, tsum


# test-only (documented in docs/training.md): seconds the dataset-wide solve waits before the solver, polling the
# stop flag and the budget as the solver does, so a test can signal a run inside the solve deterministically
TEST_SOLVE_SLEEP = "NAT_TEST_SOLVE_SLEEP"


def _test_wait(seconds: float, should_stop: Callable[[], bool] | None, deadline: float | None,
               device: torch.device, world: int) -> None:
    t0 = time.monotonic()
    stop = budget = False
    while time.monotonic() - t0 < seconds and not (stop or budget):
        time.sleep(0.05)
        stop = should_stop is not None and should_stop()
        budget = deadline is not None and time.monotonic() > deadline
    flags = torch.tensor([int(stop), int(budget)], dtype=torch.int64, device=device)
    if world > 1:  # the ranks agree, as the solver's own checks do
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags.any():
        raise SolveInterrupted("stop" if flags[0] else "budget", time.monotonic() - t0)


def reassign_dataset(assignment: Assignment, targets: Targets | torch.Tensor, feats: torch.Tensor,
                     rank: int = 0, world: int = 1, *, warm: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                     deadline: float | None = None, should_stop: Callable[[], bool] | None = None
                     ) -> tuple[torch.Tensor, dict, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The dataset-wide reassignment: the exact assignment of all n images to all n targets,
    every rank taking part with its own shard of the features.

    Every rank centres its shard by the mean row of all ranks' (in place), then all call
    :func:`nat_ext.full_assign.assign_sharded` together from the held permutation (its pairs
    keep the sparse problem feasible) and, when given, the previous solve's matching and prices.
    Nothing of size ``n x d`` exists on any rank: the targets are regenerated tile by tile,
    the objective is summed shard by shard and all-reduced. Before the solve and after it every
    rank compares checksums of the held and the new permutation with every other rank
    (RuntimeError on a mismatch, on every rank).

    Args:
        assignment: the permutation, on the training device.
        targets: the run's targets, or Tensor[n, d] every target.
        feats: Tensor[hi - lo, d] this rank's shard (:func:`dataset_features`: rows ``lo..hi`` of
            :func:`nat_ext.data.shard_rows`; with one process every row). Centred in place.
        rank, world: process index and count.
        warm: the previous solve's ``(col4row, u, v)``, or None (a cold solve).
        deadline: ``time.monotonic()`` value past which the solve gives up
            (``--dataset-solve-budget``), or None.
        should_stop: polled during the solve (the run's stop flag).

    Returns:
        (Tensor[] int64 images whose target changed, dict with ``objective_held`` and
        ``objective`` (sum_i f_i . t_P(i) before and after, all ranks'), ``rounds``,
        ``solve_seconds`` and ``warm``, the new ``(col4row int64[n], u float64[n], v float64[m])``
        on the CPU, the same on every rank).

    Raises:
        nat_ext.full_assign.SolveInterrupted: on every rank, past the deadline (``reason``
            "budget") or when ``should_stop()`` turned True on some rank ("stop"); the held
            permutation is then unchanged.
    """
    t0 = time.perf_counter()
    n = assignment.n
    lo, hi, _ = shard_rows(n, rank, world)
    if feats.dim() != 2 or feats.shape[0] != hi - lo:
        raise ValueError(f"feats should be rank {rank}'s shard, Tensor[{hi - lo}, d] (rows {lo}..{hi} of {n}), "
                         f"got {tuple(feats.shape)}")
    held = assignment.perm.clone()
    _same_on_every_rank(held, "held", rank, world)
    # the held objective and the sum of all targets (each is held once), on the uncentred shard
    sums = _objective_and_target_sum(feats, targets, held[lo:hi])
    sums = torch.cat([sums[0].reshape(1), sums[1]])
    mean = feature_mean(feats, n, world)
    if world > 1:
        dist.all_reduce(sums)
    objective_held, target_sum = float(sums[0]), sums[1:]
    centre_features(feats, mean, inplace=True)
    # what centring took off every assignment's total (with the mean as subtracted, in feats' dtype)
    offset = float(mean.to(feats.dtype).double() @ target_sum)
    stats: dict = {}
    wait = float(os.environ.get(TEST_SOLVE_SLEEP, "0") or 0)
    if wait > 0:
        _test_wait(wait, should_stop, deadline, feats.device, world)
    # the sparse solve runs on rank 0 while every rank waits: it takes every cpu rank 0 may use
    # (torchrun leaves one thread per rank)
    col4row, u, v = assign_sharded(feats, lo, n, targets, held.cpu(), warm=warm, deadline=deadline,
                                   should_stop=should_stop, stats=stats, solve_threads=usable_cpus())
    new = col4row.to(held.device)
    _same_on_every_rank(new, "new", rank, world)
    centred = torch.tensor([_objective_and_target_sum(feats, targets, new[lo:hi])[0]], dtype=torch.float64,
                           device=feats.device)
    if world > 1:
        dist.all_reduce(centred)
    info = {"objective_held": objective_held, "objective": float(centred) + offset,
            "rounds": int(stats.get("rounds", 0)), "warm": warm is not None,
            "solve_seconds": time.perf_counter() - t0}
    if "warm_moved" in stats:  # whether the old prices ranked the pass, and why (assign_sharded)
        info.update(warm_prices=bool(stats["warm"]), warm_moved=float(stats["warm_moved"]))
    changed = assignment.update(torch.arange(n, device=held.device), new)
    return changed, info, (col4row, u, v)
