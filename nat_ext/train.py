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
features extracted in eval mode without augmentation (:func:`nat_ext.reassign.dataset_features`).

The module holds the loop; NAT's reassignment steps are in :mod:`nat_ext.reassign`, the run
plumbing (processes, signals, resume, schedule, outputs) in :mod:`nat_ext.run`. Their public
names are re-exported here, as before the split.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .auxiliary import (AuxNet, RotationHead, koleo_loss, local_count, local_crops, resolve_crops, rotate_batch,
                        stage_width)
from .checkpoint import save_checkpoint
from .faults import SolverFaultError
from .config import Config, EvalConfig, SettingError, parse_config, progress, refuse, validate
from .data import EpochBatches, batch_augment, get_dataset, make_loader
from .eval import default_layer, evaluate
from .models import build_model
from .presets import DeviceTransform
from .reassign import (align_batch, assignment_objective, centre_features, check_settings, dataset_features,
                       dataset_objective, reassign, reassign_dataset, reassigns_on, target_generator, target_set)
from .run import (EpochStats, StopFlag, agreed_signal, amp_settings, build_scheduler, continue_schedule,
                  epoch_batches, held_perm, no_sync_allowed, plot_metrics, prepare_out, resume, rng_state,
                  scaled_lr, setup_processes, stopped, write_summary)
from .state import Assignment
from .targets import Targets

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
    # processes, data, model, targets, optimizer
    device, rank, world = setup_processes(cfg)
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
    # auxiliary self-supervision (issue 19): a rotation head on the last conv stage, local crops; none by default
    aux_layer, n_local = default_layer(cfg.arch), local_count(cfg)
    rotation = RotationHead(stage_width(model, aux_layer)).to(device) if cfg.rotation_loss > 0 else None
    # What a checkpoint must agree on to be resumed (see checkpoint.COMPAT_KEYS).
    run_info = dict(dataclasses.asdict(cfg), target_generator=target_generator(cfg), n_images=n,
                    in_channels=info.in_channels, num_classes=info.num_classes,
                    small_input=info.small_input, world_size=world, target_set=target_set(cfg))
    # the targets: generated once, on this rank's device (or never, with --targets-from-seed)
    targets = Targets(n, cfg.dim, seed=cfg.seed, materialize=not cfg.targets_from_seed, device=device,
                      generator=run_info["target_generator"], kind=cfg.targets,
                      num_prototypes=cfg.num_prototypes, spread=cfg.target_spread) if nat else None
    assignment = Assignment(n, seed=cfg.seed, device=device) if nat else None
    # the dataset-wide passes (reassignment and objective) read unaugmented images
    whole = nat and cfg.reassign_every > 0 and (cfg.reassign_scope == "dataset" or cfg.track_objective)
    plain = dataset if info.batch_augment or not whole else \
        get_dataset(cfg.data, "train", augment=False, limit=cfg.limit or None, image_size=cfg.image_size,
                    skip_corrupt=cfg.skip_corrupt, seed=cfg.seed, uint8=True,
                    worker_resize=device.type == "cpu")[0]
    # uint8 -> the model's input; called without a generator (the unaugmented passes) it does not flip
    finish = DeviceTransform(cfg.image_size) if info.uint8 else None
    params = list(model.parameters()) + (list(rotation.parameters()) if rotation is not None else [])
    opt = torch.optim.SGD(params, lr=scaled_lr(cfg, world), momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    steps_per_epoch = len(epoch_batches(n, cfg.batch_size, cfg.seed, 0, rank, world))
    sched = build_scheduler(cfg, opt, cfg.epochs * steps_per_epoch)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed * 7919 + rank)
    amp_dtype, use_scaler = amp_settings(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    # resume (a longer --epochs stretches the cosine schedule from the step reached)
    parts = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}
    if nat:
        parts["assignment"] = assignment
    if rotation is not None:  # its own part of the checkpoint: the encoder's state stays what nat-eval loads
        parts["aux"] = rotation
    at = {"epoch": 0, "step": 0, "global_step": 0, "epoch_stats": None, "train_seconds": 0.0}
    if cfg.resume and os.path.exists(ckpt_path):
        at = resume(cfg, ckpt_path, run_info, parts, aug_gen)
        stretched = continue_schedule(sched, opt, cfg.epochs * steps_per_epoch)
        if master:
            print(f"resumed from {ckpt_path} at epoch {at['epoch']} step {at['step']}"
                  + (f"; cosine schedule now over {cfg.epochs} epochs" if stretched else ""), flush=True)
    start_step, global_step, train_seconds = at["step"], at["global_step"], at["train_seconds"]
    writer = prepare_out(cfg.out, run_info, at["epoch"]) if master else None
    # the run's one loader (persistent workers) over a sampler that follows the epoch
    sampler = EpochBatches(lambda e: epoch_batches(n, cfg.batch_size, cfg.seed, e, rank, world))
    loader = make_loader(dataset, sampler, device, workers=0 if info.batch_augment and cfg.workers < 0
                         else cfg.workers)

    forward = torch.compile(model) if cfg.compile else model  # the checkpoint keeps `model`'s weights
    # with auxiliary inputs the encoder and the head run in one module, so DDP wraps (and all-reduces) both
    aux_net = AuxNet(model, forward, rotation, aux_layer) if rotation is not None or n_local else None
    # gradient_as_bucket_view: the gradients live in DDP's buckets, not in a second copy (one model's size per rank)
    net = torch.nn.parallel.DistributedDataParallel(aux_net or forward,
                                                    device_ids=[device] if device.type == "cuda" else None,
                                                    gradient_as_bucket_view=True) if world > 1 else aux_net or forward
    stop = StopFlag()
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    no_sync = cfg.sync_debug and device.type == "cuda"

    def checkpoint(epoch: int, step: int, stats: EpochStats | None) -> None:
        if master:
            state = {name: part.state_dict() for name, part in parts.items()}
            save_checkpoint(dict(state, target_seed=cfg.seed, epoch=epoch, step=step, global_step=global_step,
                                 epoch_stats=stats.state_dict() if stats else None,
                                 train_seconds=train_seconds, rng=rng_state(aug_gen), config=run_info),
                            ckpt_path)
        if world > 1:
            dist.barrier()

    def max_steps_reached() -> bool:
        return cfg.max_steps > 0 and global_step >= cfg.max_steps

    finished = False  # the loop ran to its end: the process group stays up for the evaluation
    try:
        if max_steps_reached():
            return stopped(f"--max-steps {cfg.max_steps} reached before this run", 0, ckpt_path, at["epoch"],
                           start_step, assignment, train_seconds, master)
        for epoch in range(at["epoch"], cfg.epochs):
            sampler.set_epoch(epoch, start_step)
            batches = sampler.batches()
            reassigning = reassigns_on(cfg, epoch)
            stats = EpochStats(device, at["epoch_stats"] if epoch == at["epoch"] else None)
            # reassign over the whole dataset, once, at the epoch start (done already when resuming mid-epoch)
            if reassigning and cfg.reassign_scope == "dataset" and start_step == 0:
                t0 = time.perf_counter()
                feats = dataset_features(model, plain, cfg.dim, cfg.probe.batch_size, device, rank, world,
                                         dtype=getattr(torch, cfg.gather_dtype), prepare=finish)
                t_extract = time.perf_counter() - t0
                changed, stats.reassign_info = reassign_dataset(assignment, targets, feats, rank, world)
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
                with no_sync_allowed(no_sync):
                    # forward: every view of the batch in one pass (local crops and the rotated copy beside it)
                    raw = x
                    if info.batch_augment:  # in-memory data: augment on the device, batched
                        x = torch.cat([batch_augment(x, aug_gen) for _ in range(cfg.views)])
                    elif info.uint8:  # uint8 crops: resize, flip, normalise on the device (views view-major)
                        x = finish(x, aug_gen)
                    elif cfg.views > 1:  # the dataset stacked the views: Tensor[b, views, C, H, W]
                        x = x.transpose(0, 1).flatten(0, 1)
                    x = x.contiguous(memory_format=memory_format)
                    out_local = rot_logits = None
                    if aux_net is not None:
                        local = local_crops(raw if info.batch_augment else x[:idx.numel()], n_local, aug_gen
                                            ).contiguous(memory_format=memory_format) if n_local else None
                        rotated, rot_labels = rotate_batch(x[:idx.numel()], cfg.rotation_fraction) \
                            if rotation is not None else (None, None)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                        if aux_net is None:
                            out = net(x)
                        else:
                            out, out_local, rot_logits = net(x, local, rotated)
                    views = list(out.chunk(cfg.views))
                    # reassign: on scheduled epochs the batch's images share out their targets anew
                    if per_batch:
                        t0 = time.perf_counter()
                        loss_rows, changed = align_batch(cfg, assignment, targets, idx, views, world)
                        stats.changed += changed
                        stats.assign_seconds += time.perf_counter() - t0
                    elif nat:
                        loss_rows = [targets.rows(assignment.targets_of(idx))] * cfg.views
                    # loss: squared distance to the targets (NAT; views and local crops averaged, the local
                    # crops against the targets their image holds after the step), or cross-entropy (supervised)
                    if nat:
                        pairs = list(zip(views, loss_rows))
                        if out_local is not None:
                            held = targets.rows(assignment.targets_of(idx))
                            pairs += [(v, held) for v in out_local.chunk(n_local)]
                        loss = nat_loss(pairs)
                    else:
                        loss = F.cross_entropy(out.float(), y)
                    # auxiliary terms (issue 19), weighted; not computed at weight 0
                    if rot_logits is not None:
                        rot_loss = F.cross_entropy(rot_logits.float(), rot_labels)
                        loss = loss + cfg.rotation_loss * rot_loss
                        stats.add_aux("rotation_loss", rot_loss, idx.numel())
                        stats.add_aux("rotation_acc", (rot_logits.argmax(1) == rot_labels).double().mean(),
                                      idx.numel())
                    if cfg.koleo > 0:
                        koleo = sum(koleo_loss(v) for v in views) / len(views)
                        loss = loss + cfg.koleo * koleo
                        stats.add_aux("koleo", koleo, idx.numel())
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

                # stop on SIGINT/SIGTERM (checked every step alone, at log steps with several processes),
                # or at --max-steps inside the epoch (at its last step the epoch ends first, below)
                if (world == 1 or log_step) and agreed_signal(stop, world, device):
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
                                                         cfg.probe.batch_size, device, rank, world,
                                                         prepare=finish)
                row["objective_seconds"] = time.perf_counter() - t0
            train_seconds += stats.seconds
            start_step = 0
            if master:
                write_summary(row, cfg.out, writer, cfg.epochs)
            checkpoint(epoch + 1, 0, None)
            if world > 1 and agreed_signal(stop, world, device):
                return stopped(f"signal {stop.signum}", stop.signum, ckpt_path, epoch + 1, 0, assignment,
                               train_seconds, master)
            if max_steps_reached() and epoch + 1 < cfg.epochs:
                return stopped(f"--max-steps {cfg.max_steps} reached", 0, ckpt_path, epoch + 1, 0, assignment,
                               train_seconds, master)
        finished = True
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if writer is not None:
            writer.close()
        if world > 1 and not (finished and cfg.eval):
            dist.destroy_process_group()

    # evaluate: every rank shares the sgd probe; the L-BFGS probe is rank 0's (the others return None)
    result = None
    if cfg.eval:
        try:
            result = evaluate(EvalConfig(checkpoint=ckpt_path, probe=cfg.probe, device=str(device),
                                         workers=cfg.workers, out=os.path.join(cfg.out, "eval.json")))
        finally:
            if world > 1:
                dist.destroy_process_group()
    return {"checkpoint": ckpt_path, "interrupted": 0, "perm": held_perm(assignment),
            "train_seconds": train_seconds, "eval": result}


def nat_loss(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """NAT's loss: the batch mean of ``||f_i - t_i||^2``, averaged over the pairs.

    Args:
        pairs: (Tensor[b, d] outputs, Tensor[b, d] their targets), one pair per global view and local crop.

    Returns:
        Tensor[] float32.
    """
    loss = sum((v.float() - t).pow(2).sum(dim=1).mean() for v, t in pairs)
    return loss / len(pairs)


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
            "seconds": stats.seconds, "step": global_step, **stats.reassign_info,
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
