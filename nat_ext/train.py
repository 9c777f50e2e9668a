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
the whole training set (``nat_ext.full_assign.assign_sharded``) at the start of each reassigning epoch, on
features extracted in eval mode without augmentation (:func:`nat_ext.reassign.dataset_features`), each
rank its own shard, solved by every rank together (:func:`solve_dataset`): within ``--dataset-solve-budget``
(past it the epoch reassigns in batch scope), stopping on a signal, and checkpointed as soon as it ends so that
a resume does not solve again.

The module holds the loop; NAT's reassignment steps are in :mod:`nat_ext.reassign`, the run
plumbing (processes, signals, resume, schedule, outputs) in :mod:`nat_ext.run`. Their public
names are re-exported here, as before the split.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from .auxiliary import AuxNet, local_count, resolve_crops, stage_width
from .checkpoint import save_checkpoint
from .faults import SolverFaultError
from .full_assign import SolveInterrupted
from .config import Config, EvalConfig, SettingError, parse_config, progress, refuse, validate
from .data import (EpochBatches, batch_augment, check_shm, get_dataset, make_loader, resolve_workers, shard_rows,
                   shm_needed, usable_cpus)
from .eval import default_layer, evaluate, report_tables
from .models import build_model
from .presets import DeviceTransform
from .reassign import (align_batch, assignment_objective, centre_features, check_settings, dataset_features,
                       dataset_objective, reassign, reassign_dataset, reassigns_on, target_generator, target_set)
from .full_assign import close_process_group
from .run import (EpochStats, StopFlag, amp_settings, build_scheduler, continue_schedule, epoch_batches, gather_rng,
                  held_perm, move_aside, no_sync_allowed, plot_metrics, prepare_out, resume, scaled_lr, setup_processes,
                  stopped, write_summary)
from .labels import class_counts, dataset_labels, labelled_batches, labelled_set
from .state import Assignment, cpu_assign
from .terms import Batch, NatTerm, build_terms, total_loss
from .targets import Targets

# batches each loader worker prepares ahead (what /dev/shm must hold, with the batch size)
PREFETCH = 4
# the label head's lr over the encoder's: a linear head on few labels learns in a few hundred steps
LABEL_HEAD_LR = 10.0

__all__ = ["Config", "train", "main", "epoch_batches", "reassigns_on", "reassign", "align_batch",
           "check_settings", "target_set", "target_generator", "dataset_features", "dataset_objective",
           "centre_features", "assignment_objective", "reassign_dataset", "plot_metrics"]


# ----------------------------------------------------------------------------- the loop

def train(cfg: Config) -> dict:
    """Train an encoder with NAT (or the supervised baseline) as set by ``cfg``.

    Writes to ``cfg.out``: ``checkpoint.pt`` (every epoch, on SIGINT/SIGTERM and at
    ``--max-steps``), ``metrics.jsonl``, ``curves.png``, ``config.json``, TensorBoard events when
    tensorboard is installed, and ``eval.json`` when ``cfg.eval``.

    Args:
        cfg: the run's settings.

    Returns:
        dict with ``checkpoint`` (path), ``interrupted`` (signal number or 0),
        ``perm`` (Tensor[n] final assignment, CPU), ``train_seconds`` and ``eval``
        (results or None; no evaluation when the run stopped at ``--max-steps``).
    """
    validate(cfg)  # before any process group or data: a bad setting fails at once
    cfg = resolve_crops(cfg)  # --crops G,L sets --views G
    device, rank, world = setup_processes(cfg)
    try:
        return _train_in_group(cfg, device, rank, world)
    finally:
        # on every way out (a refusal before the loop included: a group left to interpreter exit
        # aborts the process, "terminate called without an active exception")
        close_process_group()


def _train_in_group(cfg: Config, device: torch.device, rank: int, world: int) -> dict:
    # data, model, targets, optimizer
    master = rank == 0
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    torch.manual_seed(cfg.seed)  # same model init on every rank
    # uint8 from the workers, finished (resize, flip, normalise) on the device; Fashion-MNIST as before
    dataset, info = get_dataset(cfg.data, "train", augment=True, limit=cfg.limit or None,
                                image_size=cfg.image_size, skip_corrupt=cfg.skip_corrupt, seed=cfg.seed,
                                views=cfg.views, uint8=True, worker_resize=device.type == "cpu")
    n = len(dataset)
    check_settings(cfg, n)
    nat = cfg.objective == "nat"
    model = build_model(cfg.arch, cfg.dim if nat else info.num_classes, info.in_channels,
                        sobel=cfg.sobel, small_input=info.small_input, normalize=nat).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    # the step's terms (nat_ext.terms): NAT or supervised, then the auxiliary ones (issue 19), each with its head
    aux_layer, n_local = default_layer(cfg.arch), local_count(cfg)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + rank)
    # What a checkpoint must agree on to be resumed (see checkpoint.COMPAT_KEYS).
    run_info = dict(dataclasses.asdict(cfg), target_generator=target_generator(cfg), n_images=n,
                    in_channels=info.in_channels, num_classes=info.num_classes,
                    small_input=info.small_input, world_size=world, target_set=target_set(cfg))
    # the targets: generated once, on this rank's device (or never, with --targets-from-seed)
    targets = Targets(n, cfg.dim, seed=cfg.seed, materialize=not cfg.targets_from_seed, device=device,
                      generator=run_info["target_generator"], kind=cfg.targets,
                      num_prototypes=cfg.num_prototypes, spread=cfg.target_spread) if nat else None
    assignment = Assignment(n, seed=cfg.seed, device=device) if nat else None
    # semi-supervised NAT (issue 26): the labelled images as dataset indices, O(labelled)
    labelled = labelled_set(dataset, cfg.label_fraction, cfg.label_file, cfg.seed)
    label_counts = class_counts(dataset_labels(dataset)[labelled], info.num_classes) if labelled is not None else None
    terms = build_terms(cfg, assignment, targets, world, n_local, aug_gen, stage_width(model, aux_layer),
                        info.batch_augment, info.num_classes if nat and labelled is not None else 0)
    heads = {t.name: t.head.to(device) for t in terms if t.head is not None}
    nat_term = next((t for t in terms if isinstance(t, NatTerm)), None)
    # the dataset-wide passes (reassignment and objective) read unaugmented images
    whole = nat and cfg.reassign_every > 0 and (cfg.reassign_scope == "dataset" or cfg.track_objective)
    plain = dataset if info.batch_augment or not whole else \
        get_dataset(cfg.data, "train", augment=False, limit=cfg.limit or None, image_size=cfg.image_size,
                    skip_corrupt=cfg.skip_corrupt, seed=cfg.seed, uint8=True,
                    worker_resize=device.type == "cpu")[0]
    # uint8 -> the model's input; called without a generator (the unaugmented passes) it does not flip
    finish = DeviceTransform(cfg.image_size) if info.uint8 else None
    params = list(model.parameters()) + [p for name, head in heads.items() if name != "labels"
                                         for p in head.parameters()]
    if "labels" in heads:  # the label head learns at LABEL_HEAD_LR x the encoder's lr (a head of few labels)
        params = [{"params": params}, {"params": list(heads["labels"].parameters()),
                                       "lr": LABEL_HEAD_LR * scaled_lr(cfg, world)}]
    opt = torch.optim.SGD(params, lr=scaled_lr(cfg, world), momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    steps_per_epoch = len(epoch_batches(n, cfg.batch_size, cfg.seed, 0, rank, world))
    sched = build_scheduler(cfg, opt, cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch)
    amp_dtype, use_scaler = amp_settings(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    # the loader's workers: said per rank, and /dev/shm checked, before any collective
    workers = resolve_workers(0 if info.batch_augment and cfg.workers < 0 else cfg.workers)
    print(f"rank {rank}: {workers} loader worker(s)", flush=True)
    if workers == 0 and device.type == "cuda" and not info.batch_augment:
        print(f"warning: rank {rank} decodes its images in the training process (0 loader workers, "
              f"{usable_cpus()} cpus): the GPU will wait for data; give --workers", flush=True)
    if workers > 0:
        check_shm(shm_needed(workers, PREFETCH, cfg.batch_size * cfg.views * info.in_channels * cfg.image_size ** 2,
                             int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))

    # resume (a longer --epochs stretches the cosine schedule from the step reached)
    parts = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}
    if nat:
        parts["assignment"] = assignment
    if "rotation" in heads:  # its own part of the checkpoint: the encoder's state stays what nat-eval loads
        parts["aux"] = heads["rotation"]
    if "labels" in heads:
        parts["labels"] = heads["labels"]
    at = {"epoch": 0, "step": 0, "global_step": 0, "epoch_stats": None, "train_seconds": 0.0}
    resumed = resume(cfg, ckpt_path, run_info, parts, aug_gen, rank, world) if cfg.resume else None
    if resumed is not None:
        at = resumed
        stretched = continue_schedule(sched, opt, cfg.epochs * steps_per_epoch)
        if master:
            print(f"resumed from {ckpt_path} at epoch {at['epoch']} step {at['step']}"
                  + (f"; cosine schedule now over {cfg.epochs} epochs" if stretched else ""), flush=True)
        if at["epoch"] >= cfg.epochs and at["step"] == 0:
            return _complete(cfg, ckpt_path, assignment, at["train_seconds"], device, world, master)
    elif not cfg.resume and master:
        aside = move_aside(cfg.out)
        if aside:
            print(f"--no-resume: the previous run's files are now in {aside}", flush=True)
    start_step, global_step, train_seconds = at["step"], at["global_step"], at["train_seconds"]
    solve_record = at.get("dataset_solve")  # the last dataset-wide solve: its epoch, outcome, matching and duals
    writer = prepare_out(cfg.out, run_info, at["epoch"]) if master else None
    # the run's one loader (persistent workers) over a sampler that follows the epoch
    sampler = EpochBatches(lambda e: epoch_batches(n, cfg.batch_size, cfg.seed, e, rank, world))
    if not nat and labelled is not None:  # the supervised model of the labels alone: as many steps, labelled batches
        sampler = EpochBatches(lambda e: labelled_batches(labelled, cfg.batch_size, cfg.seed, e, steps_per_epoch,
                                                          rank))
    label_sampler = label_loader = None
    if nat and labelled is not None:  # labelled images drawn into every step, by a loader of their own
        if resumed is not None and resumed.get("labelled") is not None and not torch.equal(resumed["labelled"], labelled):
            raise SettingError(f"checkpoint {ckpt_path} has another labelled set than this run's "
                               "--label-fraction / --label-file (or --seed, --limit)")
        label_sampler = EpochBatches(lambda e: labelled_batches(labelled, cfg.label_batch, cfg.seed, e,
                                                                steps_per_epoch, rank))
        label_loader = make_loader(dataset, label_sampler, device, workers=-(-workers // 4),
                                   prefetch_factor=PREFETCH, timeout=cfg.loader_timeout, shield_workers=True)
        if master:
            print(f"labels: {len(labelled)} labelled images ({len(labelled) / n:.1%}), {cfg.label_batch} drawn into "
                  f"every step per process, head lr {LABEL_HEAD_LR} x the encoder's", flush=True)
    loader = make_loader(dataset, sampler, device, workers=workers, prefetch_factor=PREFETCH,
                         timeout=cfg.loader_timeout, shield_workers=True)

    forward = torch.compile(model) if cfg.compile else model  # the checkpoint keeps `model`'s weights
    # with auxiliary inputs the encoder and the head run in one module, so DDP wraps (and all-reduces) both
    aux_net = AuxNet(model, forward, heads, aux_layer) if heads or n_local else None
    # gradient_as_bucket_view: the gradients live in DDP's buckets, not in a second copy (one model's size per rank)
    net = torch.nn.parallel.DistributedDataParallel(aux_net or forward,
                                                    device_ids=[device] if device.type == "cuda" else None,
                                                    gradient_as_bucket_view=True,
                                                    # without NAT's term the encoder's last layers get no gradient
                                                    find_unused_parameters=nat and cfg.nat_weight == 0
                                                    ) if world > 1 else aux_net or forward
    stop = StopFlag(world)
    old_handlers = stop.install()
    no_sync = cfg.sync_debug and device.type == "cuda"

    def checkpoint(epoch: int, step: int, stats: EpochStats | None) -> None:
        rng = gather_rng(aug_gen, world)  # every rank's own random state (a collective)
        if master:
            state = {name: part.state_dict() for name, part in parts.items()}
            save_checkpoint(dict(state, target_seed=cfg.seed, epoch=epoch, step=step, global_step=global_step,
                                 epoch_stats=stats.state_dict() if stats else None,
                                 train_seconds=train_seconds, rng=rng[0], rng_ranks=rng, config=run_info,
                                 **({"labelled": labelled, "labelled_per_class": label_counts}
                                    if labelled is not None else {}),
                                 **({"dataset_solve": solve_record} if solve_record is not None else {})),
                            ckpt_path)
        if world > 1:
            dist.barrier()

    def max_steps_reached() -> bool:
        return cfg.max_steps > 0 and global_step >= cfg.max_steps

    try:
        if max_steps_reached():
            return stopped(f"--max-steps {cfg.max_steps} reached before this run", 0, ckpt_path, at["epoch"],
                           start_step, assignment, train_seconds, master)
        for epoch in range(at["epoch"], cfg.epochs):
            sampler.set_epoch(epoch, start_step)
            if label_sampler is not None:
                label_sampler.set_epoch(epoch, start_step)
            batches = sampler.batches()
            reassigning = reassigns_on(cfg, epoch)
            stats = EpochStats(device, at["epoch_stats"] if epoch == at["epoch"] else None)
            # reassign over the whole dataset, once, at the epoch start (not again when the checkpoint has it)
            scope = cfg.reassign_scope
            if reassigning and cfg.reassign_scope == "dataset":
                if solved_before(solve_record, epoch, start_step):
                    outcome = solve_record["outcome"] if solve_record and solve_record["epoch"] == epoch else "solved"
                    if master and start_step == 0:
                        print(resumed_solve_line(solve_record, epoch), flush=True)
                else:
                    solve_record = solve_dataset(cfg, epoch, model, plain, finish, assignment, targets, device,
                                                 rank, world, lambda: stop.signum != 0, solve_record, stats)
                    outcome = solve_record["outcome"]
                    if outcome == "budget" and master:
                        print(f"warning: epoch {epoch + 1}: the dataset-wide solve passed its budget "
                              f"({solve_record['seconds']:.1f} s spent, --dataset-solve-budget "
                              f"{cfg.dataset_solve_budget:g} s); this epoch reassigns in batch scope instead",
                              flush=True)
                    checkpoint(epoch, 0, stats)  # the solve (or its outcome) is kept: a resume does not repeat it
                    signum = stop.agreed()
                    if outcome == "stop" or signum:
                        return stopped(f"signal {signum} during the dataset-wide solve of epoch {epoch + 1}"
                                       + (" (abandoned)" if outcome == "stop" else ""), signum, ckpt_path, epoch,
                                       0, assignment, train_seconds, master)
                if outcome != "solved":
                    scope = "batch"
            per_batch = reassigning and scope == "batch"
            for term in terms:
                term.start_epoch(epoch, reassigning, scope)
            model.train()
            t_last = time.perf_counter()
            bar = progress(step_batches(loader, label_loader, rank, epoch, start_step), total=len(batches),
                           initial=start_step,
                           disable=not master, desc=f"epoch {epoch + 1}/{cfg.epochs}")
            for step, (x, y, idx, skipped, drawn) in enumerate(bar, start=start_step):
                stats.wait_seconds += time.perf_counter() - t_last  # the loader's share of the step
                x, y, idx = (t.to(device, non_blocking=True) for t in (x, y, idx))
                with no_sync_allowed(no_sync):
                    # forward: the global views, NAT's local crops and each head's images, in one module
                    batch = Batch(x, finish_views(x, info, cfg.views, finish, aug_gen).contiguous(
                        memory_format=memory_format), y, idx, cfg.views)
                    if drawn is not None:  # the labelled images of the step: their first view
                        xl, yl = drawn[0].to(device, non_blocking=True), drawn[1].to(device, non_blocking=True)
                        batch.labelled = (finish_views(xl, info, 1, finish, aug_gen)[:yl.numel()].contiguous(
                            memory_format=memory_format), yl)
                    local = nat_term.local_crops(batch) if nat_term is not None else None
                    if local is not None:
                        local = local.contiguous(memory_format=memory_format)
                    batch.head_inputs = {t.name: t.inputs(batch) for t in terms if t.head is not None}
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                        if aux_net is None:
                            batch.outputs = net(batch.x)
                        else:
                            batch.outputs, batch.local, batch.logits = net(
                                batch.x, local, {name: inp[0] for name, inp in batch.head_inputs.items()})
                    # loss: the weighted sum of the terms (NAT reassigns the batch inside its own)
                    loss = total_loss(terms, batch, stats)
                    # backward, update
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    stats.loss_sum += loss.detach().double() * batch.size
                global_step += 1
                stats.images += idx.numel()
                stats.skipped += skipped
                now = time.perf_counter()
                stats.seconds, t_last = stats.seconds + now - t_last, now

                # log every log_every steps (the only read of the device inside the epoch)
                log_step = cfg.log_every > 0 and (step + 1) % cfg.log_every == 0
                if log_step and master:
                    loss, rate, wait = stats.since_log()
                    if bar.disable:
                        print(f"epoch {epoch + 1}/{cfg.epochs} step {step + 1}/{len(batches)} loss {loss:.4f} "
                              f"{rate:.0f} img/s/rank data wait {100 * wait:.0f}%", flush=True)
                    else:
                        bar.set_postfix(loss=f"{loss:.4f}", data_wait=f"{100 * wait:.0f}%")

                # stop on SIGINT/SIGTERM/SIGUSR1 (the ranks agree at every step, on the CPU),
                # or at --max-steps inside the epoch (at its last step the epoch ends first, below)
                if stop.agreed():
                    checkpoint(epoch, step + 1, stats)
                    return stopped(f"signal {stop.signum}", stop.signum, ckpt_path, epoch, step + 1, assignment,
                                   train_seconds, master)
                if max_steps_reached() and step + 1 < len(batches):
                    checkpoint(epoch, step + 1, stats)
                    return stopped(f"--max-steps {cfg.max_steps} reached", 0, ckpt_path, epoch, step + 1,
                                   assignment, train_seconds, master)
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
                row["objective_end"] = dataset_objective(model, plain, targets, assignment.perm,
                                                         cfg.extract_batch_size, device, rank, world,
                                                         prepare=finish)
                row["objective_seconds"] = time.perf_counter() - t0
            train_seconds += stats.seconds
            start_step = 0
            solves = len(batches) * world if per_batch else 0
            fault_action = _solver_fault_action(cfg, row.get("solver_faults", 0), solves)
            if fault_action:
                row["solver_fault_action"] = fault_action
            if assignment is not None and assignment.assign_fn is cpu_assign:
                row["solver"] = "cpu"
            if master:
                write_summary(row, cfg.out, writer, cfg.epochs)
            checkpoint(epoch + 1, 0, None)
            if fault_action:  # said on every rank: the counts are all ranks' (summed in the summary)
                message = (f"rank {rank}: {row['solver_faults']} of the epoch's {solves} batch solves faulted in "
                           f"the solver, more than --solver-fault-share {cfg.solver_fault_share}")
                if fault_action == "stop":
                    raise SolverFaultError(f"{message}; stopping (--on-solver-faults stop) with the checkpoint of "
                                           f"epoch {epoch + 1} kept in {ckpt_path}")
                print(f"warning: {message}; the following epochs solve on the CPU (--on-solver-faults cpu)",
                      flush=True)
                assignment.assign_fn = cpu_assign
            if stop.agreed():
                return stopped(f"signal {stop.signum}", stop.signum, ckpt_path, epoch + 1, 0, assignment,
                               train_seconds, master)
            if max_steps_reached() and epoch + 1 < cfg.epochs:
                return stopped(f"--max-steps {cfg.max_steps} reached", 0, ckpt_path, epoch + 1, 0, assignment,
                               train_seconds, master)
    finally:
        stop.restore(old_handlers)
        if writer is not None:
            writer.close()

    # evaluate: every rank shares the sgd probe; the L-BFGS probe is rank 0's (the others return None)
    result = None
    if cfg.eval:
        result = evaluate(EvalConfig(checkpoint=ckpt_path, probe=cfg.probe, device=str(device),
                                     workers=cfg.workers, out=os.path.join(cfg.out, "eval.json")))
    return {"checkpoint": ckpt_path, "interrupted": 0, "perm": held_perm(assignment),
            "train_seconds": train_seconds, "eval": result}


# ----------------------------------------------------------------------------- the dataset-wide solve

def solve_dataset(cfg: Config, epoch: int, model: torch.nn.Module, plain, finish, assignment: Assignment,
                  targets: Targets, device: torch.device, rank: int, world: int, should_stop,
                  previous: dict | None, stats: EpochStats) -> dict:
    """An epoch's dataset-wide reassignment (``--reassign-scope dataset``), at its start: every rank
    extracts its shard of the features (``--extract-batch-size``, ``--gather-dtype``), then all solve
    together (:func:`nat_ext.reassign.reassign_dataset`), warm from the previous solve's matching and
    prices when there was one, within ``--dataset-solve-budget`` and stopping on a signal.

    Records the outcome in ``stats.reassign_info`` (``dataset_solve``: solved, budget or stop; the
    seconds of the extraction and the solve) and the changed targets in ``stats.changed``.

    Args:
        previous: the last record this returned (the checkpoint's ``dataset_solve``), or None.
        should_stop: the run's stop flag, polled by the solver.

    Returns:
        the record for the checkpoint's ``dataset_solve`` key: ``epoch``, ``outcome``, ``seconds``,
        ``budget`` and, from the last solve that finished (this one or an earlier one), ``col4row``,
        ``u``, ``v`` (CPU) and ``solved_epoch``.
    """
    t0 = time.perf_counter()
    feats = dataset_features(model, plain, cfg.dim, cfg.extract_batch_size, device, rank, world,
                             dtype=getattr(torch, cfg.gather_dtype), prepare=finish)
    t_extract = time.perf_counter() - t0
    lo, hi, _ = shard_rows(assignment.n, rank, world)
    print(f"rank {rank}: extracted the features of images {lo}..{hi} in {t_extract:.1f} s "
          f"({feats.numel() * feats.element_size() / 2 ** 20:.1f} MiB of {cfg.gather_dtype} on {device})", flush=True)
    warm = None
    record: dict = {"epoch": epoch, "budget": cfg.dataset_solve_budget}
    if previous is not None and "col4row" in previous:
        warm = (previous["col4row"], previous["u"], previous["v"])
        record.update({k: previous[k] for k in ("col4row", "u", "v", "solved_epoch")})
    if rank == 0:
        print(f"epoch {epoch + 1}: solving the exact assignment of {assignment.n} images on {world} rank(s), "
              + (f"warm from epoch {previous['solved_epoch'] + 1}'s solve" if warm else "cold")
              + (f", budget {cfg.dataset_solve_budget:g} s" if cfg.dataset_solve_budget > 0 else ""), flush=True)
    deadline = time.monotonic() + cfg.dataset_solve_budget if cfg.dataset_solve_budget > 0 else None
    try:
        changed, info, (col4row, u, v) = reassign_dataset(assignment, targets, feats, rank, world, warm=warm,
                                                          deadline=deadline, should_stop=should_stop)
    except SolveInterrupted as e:  # raised on every rank alike: the held permutation stays
        info = {"dataset_solve": e.reason, "solve_seconds": e.seconds, "warm": warm is not None}
        record.update(outcome=e.reason, seconds=e.seconds)
    else:
        info["dataset_solve"] = "solved"
        stats.changed += changed
        record.update(outcome="solved", seconds=info["solve_seconds"], col4row=col4row, u=u, v=v,
                      solved_epoch=epoch)
    del feats
    info["extract_seconds"] = t_extract
    if cfg.dataset_solve_budget > 0:
        info["solve_budget"] = cfg.dataset_solve_budget
    stats.reassign_info = info
    stats.assign_seconds += time.perf_counter() - t0
    stats.seconds += time.perf_counter() - t0
    return record


def solved_before(record: dict | None, epoch: int, start_step: int) -> bool:
    """Whether the checkpoint already holds ``epoch``'s dataset-wide solve (or its abandonment): its
    ``dataset_solve`` record names the epoch, or (checkpoints written before the record existed) the run
    resumes inside the epoch, past the solve at its start."""
    return (record is not None and record["epoch"] == epoch) or start_step > 0


def resumed_solve_line(record: dict | None, epoch: int) -> str:
    """What a resume at the start of an epoch whose dataset-wide solve the checkpoint holds says."""
    if record is None or record["epoch"] != epoch or record["outcome"] == "solved":
        seconds = f" in {record['seconds']:.1f} s" if record and record["epoch"] == epoch else ""
        return f"epoch {epoch + 1}: its dataset-wide assignment was solved{seconds} before the checkpoint; not solved again"
    why = "stopped by a signal" if record["outcome"] == "stop" else "cut at --dataset-solve-budget"
    return (f"epoch {epoch + 1}: its dataset-wide solve was {why} after {record['seconds']:.1f} s, before the "
            "checkpoint; not solved again: this epoch reassigns in batch scope, the next reassigning epoch solves")


def _solver_fault_action(cfg: Config, faults: int, solves: int) -> str | None:
    """``--on-solver-faults`` when more than ``--solver-fault-share`` of the epoch's batch solves faulted."""
    return cfg.on_solver_faults if solves and faults > cfg.solver_fault_share * solves else None


def step_batches(loader, label_loader, rank: int, epoch: int, start_step: int):
    """The step's ``(images, labels, indices, skipped, drawn)``: the loader's batch and, with labels, the
    labelled images drawn into it (``(images, labels, indices, skipped)`` from ``label_loader``), else None."""
    batches = named_batches(loader, rank, epoch, start_step)
    if label_loader is None:
        for b in batches:
            yield (*b, None)
        return
    for b, drawn in zip(batches, named_batches(label_loader, rank, epoch, start_step)):
        yield (*b, drawn)


def named_batches(loader, rank: int, epoch: int, start_step: int):
    """The loader's batches; a loader error (a stuck read past ``--loader-timeout``, a dead worker, an
    unreadable file) is raised again naming the rank and the step."""
    batches = iter(loader)
    step = start_step
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (RuntimeError, OSError) as e:
            hint = " (a stuck read: see --loader-timeout)" if "timed out" in str(e) else ""
            raise RuntimeError(f"rank {rank}: the loader failed at epoch {epoch + 1} step {step + 1}{hint}: "
                               f"{e}") from e
        yield batch
        step += 1


def _complete(cfg: Config, ckpt_path: str, assignment: Assignment | None, train_seconds: float,
              device: torch.device, world: int, master: bool) -> dict:
    """A run resumed at its end: say so and print its evaluation (evaluated now when it has none)."""
    eval_path = os.path.join(cfg.out, "eval.json")
    report = None
    if os.path.exists(eval_path):
        try:
            with open(eval_path) as f:
                report = json.load(f)
        except ValueError:  # cut mid-write: evaluate again
            report = None
    if master:
        print(f"the run in {cfg.out} is complete ({cfg.epochs} epochs)"
              + (f"; its evaluation ({eval_path}):\n{report_tables(report)}" if report else ""), flush=True)
    if report is None and cfg.eval:
        report = evaluate(EvalConfig(checkpoint=ckpt_path, probe=cfg.probe, device=str(device),
                                     workers=cfg.workers, out=eval_path))
    return {"checkpoint": ckpt_path, "interrupted": 0, "perm": held_perm(assignment),
            "train_seconds": train_seconds, "eval": report}


def finish_views(x: torch.Tensor, info, views: int, finish, generator: torch.Generator) -> torch.Tensor:
    """The batch's global views, view-major, ready for the encoder: in-memory data augmented on the
    device, uint8 crops resized, flipped and normalised on the device, or the views the dataset stacked."""
    if info.batch_augment:
        return torch.cat([batch_augment(x, generator) for _ in range(views)])
    if info.uint8:
        return finish(x, generator)
    if views > 1:  # Tensor[b, views, C, H, W]
        return x.transpose(0, 1).flatten(0, 1)
    return x


# ----------------------------------------------------------------------------- the epoch end

def _epoch_summary(stats: EpochStats, assignment: Assignment | None, epoch: int, reassigned: bool,
                   n: int, world: int, lr: float, global_step: int) -> dict:
    """The epoch's metrics row, summed over ranks; checks the assignment (solver outcome,
    invariant, same permutation on every rank). Waits for the device."""
    aux_names = sorted(stats.aux_sums)
    tot = torch.stack([stats.loss_sum, torch.tensor(float(stats.images), dtype=torch.float64,
                                                    device=stats.loss_sum.device),
                       torch.tensor(float(stats.skipped), dtype=torch.float64, device=stats.loss_sum.device),
                       *(stats.aux_sums[k] for k in aux_names)])
    if world > 1:
        dist.all_reduce(tot)
    loss_sum, images, skipped, *aux_sums = tot.tolist()
    faults = 0
    if assignment is not None:
        if world > 1:  # every rank reports (and raises) the failures of all ranks alike
            dist.all_reduce(assignment.solver_status)
        faults = assignment.check()
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
            "seconds": stats.seconds, "step": global_step, **stats.reassign_info,
            **({"solver_faults": faults} if assignment is not None else {}),
            **{k: v / max(images, 1) for k, v in zip(aux_names, aux_sums)}}


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``nat-train``. Returns the exit status."""
    cfg = parse_config(Config, argv, "nat-train", "Train an encoder with Noise As Targets.")
    try:
        res = train(cfg)
    except SettingError as e:  # a setting refused once a file or the data was read
        refuse("nat-train", e)
    if res["interrupted"]:
        return 128 + res["interrupted"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
