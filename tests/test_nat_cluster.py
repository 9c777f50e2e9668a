"""A run on a cluster (issue 25): every process signalled at once leaves a checkpoint, the same
command continues it exactly (2 ranks under torchrun, loader workers on), ranks that disagree about
the checkpoint or a changed world size are refused before a collective can hang, stuck loaders and
faulting solvers end or change the run loudly, and the loader's figures are printed."""
import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from conftest import init_rank, refused, run_processes
from nat_ext import train as nat_train
from nat_ext.checkpoint import load_checkpoint, previous_path, save_checkpoint
from nat_ext.config import Config, SettingError
from nat_ext.data import EpochBatches, check_shm, make_loader
from nat_ext.faults import SolverFaultError
from nat_ext.run import StopFlag, build_scheduler, prepare_out

SYNTH = ["--data", "synthetic:2048", "--image-size", "32", "--batch-size", "32", "--dim", "16", "--epochs", "2",
         "--workers", "1", "--no-eval", "--log-every", "4", "--seed", "3"]


def _torchrun(args, out, cwd):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "nat_ext.train"] + args + ["--out", out]
    # a session of its own: the test signals every process of it at once, as SLURM does a job step's
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), as SLURM's step sees them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_a_signal_handled_during_the_agreement_is_kept_for_the_next_step(monkeypatch):
    stop = StopFlag()
    stop.world = 2

    def reduce(flag, op=None, group=None):  # the signal lands while the collective runs
        stop(signal.SIGTERM, None)
    monkeypatch.setattr(dist, "all_reduce", reduce)
    assert stop.agreed() == 0 and stop.signum == signal.SIGTERM
    monkeypatch.setattr(dist, "all_reduce", lambda flag, op=None, group=None: None)
    assert stop.agreed() == signal.SIGTERM


@pytest.mark.slow
def test_every_process_signalled_then_the_same_command_resumes_exactly(tmp_path):
    ref = _torchrun(SYNTH, str(tmp_path / "ref"), tmp_path)
    assert ref.wait(timeout=300) == 0, ref.stdout.read()[-3000:]
    out = str(tmp_path / "cut")
    proc = _torchrun(SYNTH, out, tmp_path)
    lines, last_logged = [], None
    for line in proc.stdout:  # SIGTERM to torchrun, both ranks and their loader workers at once, mid epoch 2
        lines.append(line)
        if line.startswith("epoch 2/2 step 8/"):
            last_logged = 8
            for pid in [proc.pid] + _descendants(proc.pid):  # torchrun puts each rank in a session of its own
                os.kill(pid, signal.SIGTERM)
            t_signal = time.monotonic()
            break
    assert last_logged, "".join(lines)[-3000:]
    log = "".join(lines) + proc.communicate(timeout=60)[0]
    assert time.monotonic() - t_signal < 30, "not done within SLURM's default 30 s before SIGKILL"
    assert "rank 0: 1 loader worker(s)" in log and "rank 1: 1 loader worker(s)" in log, log[-3000:]
    assert "img/s/rank data wait" in log
    # torchrun itself reports the signal with a traceback of its own; the ranks and their workers do not fail
    assert "signal 15: saved" in log and "DataLoader worker" not in log, log[-3000:]
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["epoch"] == 1 and ck["step"] >= last_logged, (ck["epoch"], ck["step"], log[-3000:])
    assert len(ck["rng_ranks"]) == 2 and not torch.equal(ck["rng_ranks"][0]["aug"], ck["rng_ranks"][1]["aug"])
    again = _torchrun(SYNTH, out, tmp_path)  # the same command: no --resume needed
    log = again.communicate(timeout=300)[0]
    assert again.returncode == 0, log[-3000:]
    assert f"resumed from {out}/checkpoint.pt at epoch 1 step {ck['step']}" in log, log[-3000:]
    a = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    b = load_checkpoint(str(tmp_path / "ref" / "checkpoint.pt"))
    assert a["global_step"] == b["global_step"]
    assert torch.equal(a["assignment"]["perm"], b["assignment"]["perm"])
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    epochs = [json.loads(l)["epoch"] for l in open(os.path.join(out, "metrics.jsonl"))]
    assert epochs == [0, 1]


def _tiny(tmp_path, **kw):
    return Config(**dict(dict(data="synthetic:256", image_size=32, batch_size=32, dim=16, epochs=1, eval=False,
                              out=str(tmp_path / "run"), workers=0), **kw))


def test_no_resume_moves_the_old_run_aside_and_a_finished_run_says_so(tmp_path, capsys):
    first = nat_train.train(_tiny(tmp_path))
    assert nat_train.train(_tiny(tmp_path, resume=False))["interrupted"] == 0
    out = capsys.readouterr().out
    aside = [d for d in os.listdir(tmp_path / "run") if d.startswith("previous-")]
    assert len(aside) == 1 and "--no-resume: the previous run's files are now in" in out
    old = load_checkpoint(str(tmp_path / "run" / aside[0] / "checkpoint.pt"))
    assert torch.equal(old["assignment"]["perm"], first["perm"])
    # the same command over the finished run: nothing trained, the run said complete
    mtime = os.path.getmtime(tmp_path / "run" / "checkpoint.pt")
    nat_train.train(_tiny(tmp_path))
    assert "is complete (1 epochs)" in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / "run" / "checkpoint.pt") == mtime


def test_an_incompatible_run_is_refused_naming_every_difference(tmp_path, capsys):
    nat_train.train(_tiny(tmp_path))
    argv = ["--data", "synthetic:256", "--image-size", "32", "--batch-size", "32", "--epochs", "1", "--no-eval",
            "--workers", "0", "--out", str(tmp_path / "run")]
    with refused(capsys, r"dim: checkpoint 16, this run 8.*seed: checkpoint has target seed 0, --seed is 2"):
        nat_train.main(argv + ["--dim", "8", "--seed", "2"])


def _refusing_worker(rank, world, port, out, local_out=False, epochs=1):
    init_rank(rank, world, port)
    # local_out: rank 1's --out holds no checkpoint (a node-local folder); both ranks must refuse, neither hang
    folder = out + "-local" if local_out and rank == 1 else out
    try:
        nat_train.train(Config(data="synthetic:256", image_size=32, batch_size=32, dim=16, epochs=epochs, eval=False,
                               workers=0, out=folder))
    except SettingError as e:
        with open(os.path.join(out, f"error{rank}.txt"), "w") as f:
            f.write(str(e))


def test_ranks_that_see_another_checkpoint_or_a_changed_world_size_are_refused(tmp_path):
    nat_train.train(_tiny(tmp_path))  # one process wrote it
    out = str(tmp_path / "run")
    run_processes(functools.partial(_refusing_worker, epochs=2), out, timeout=120)
    for r in (0, 1):
        assert "world size: checkpoint written by 1 processes, this run has 2" in open(f"{out}/error{r}.txt").read()
        os.unlink(f"{out}/error{r}.txt")
    run_processes(functools.partial(_refusing_worker, local_out=True), out, timeout=120)
    for r in (0, 1):
        message = open(f"{out}/error{r}.txt").read()
        assert "rank 0: epoch 1 step 0; rank 1: no checkpoint" in message and "shared" in message, message


class _Stuck(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, key):
        i = key[1] if isinstance(key, tuple) else key
        if i == 5:
            time.sleep(30)  # a dead NFS read
        return torch.zeros(1, 4, 4), 0, i, 0


def test_a_stuck_read_ends_the_run_naming_rank_and_step():
    sampler = EpochBatches(lambda e: [[0, 1], [2, 3], [4, 5], [6, 7]], keys=False)
    loader = make_loader(_Stuck(), sampler, "cpu", workers=1, prefetch_factor=1, timeout=2, shield_workers=True)
    sampler.set_epoch(0, 0)
    with pytest.raises(RuntimeError, match=r"rank 3: the loader failed at epoch 1 step 3 \(a stuck read: see "
                                           r"--loader-timeout\).*timed out"):
        for _ in nat_train.named_batches(loader, 3, 0, 0):
            pass


def test_a_shielded_worker_outlives_a_sigterm_then_exits_quietly(monkeypatch):
    from nat_ext import data
    monkeypatch.setattr(data, "WORKER_STOP_GRACE_S", 2)  # the forked worker reads it
    sampler = EpochBatches(lambda e: [[0, 1], [2, 3], [6, 7]], keys=False)
    loader = make_loader(_Stuck(), sampler, "cpu", workers=1, prefetch_factor=1, shield_workers=True)
    sampler.set_epoch(0, 0)
    batches = iter(loader)
    next(batches)
    worker = batches._workers[0]
    os.kill(worker.pid, signal.SIGTERM)  # what SLURM sends every process of the step
    time.sleep(1)
    assert worker.is_alive(), "the worker died of the signal: its rank could not checkpoint"
    worker.join(timeout=20)  # and it does not outlive its parent's shutdown (a SIGTERM) for ever
    assert worker.exitcode == 0


def test_a_full_dev_shm_is_refused_with_the_fix(tmp_path):
    with pytest.raises(RuntimeError, match="--shm-size"):
        check_shm(1 << 60, str(tmp_path))
    check_shm(1, str(tmp_path))


@pytest.mark.parametrize("action", ["cpu", "stop"])
def test_a_faulting_solver_switches_to_the_cpu_or_stops(tmp_path, monkeypatch, action):
    from nat_ext import state as nat_state

    def always_fault(feats, targets):
        col4row, info = nat_state.assign_ex(feats, targets)
        return torch.full_like(col4row, -1), torch.full_like(info, 4)

    monkeypatch.setattr(nat_state, "_default_assign", always_fault)
    monkeypatch.delenv("NAT_CUDA_FALLBACK", raising=False)
    cfg = _tiny(tmp_path, epochs=2, reassign_every=1, on_solver_faults=action)
    with pytest.warns(RuntimeWarning, match="certificate failed"):
        if action == "stop":
            with pytest.raises(SolverFaultError, match=r"8 of the epoch's 8 batch solves faulted.*checkpoint of epoch 1"):
                nat_train.train(cfg)
        else:
            nat_train.train(cfg)
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[0]["solver_faults"] == 8 and rows[0]["solver_fault_action"] == action
    if action == "stop":
        assert len(rows) == 1 and load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["epoch"] == 1
    else:  # epoch 2 solved on the CPU: no faults, targets moved
        assert rows[1]["solver"] == "cpu" and rows[1]["solver_faults"] == 0 and rows[1]["changed_frac"] > 0


def test_warmup_then_the_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = build_scheduler(Config(), opt, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert lrs[4] == pytest.approx(0.4) and lrs[9] == pytest.approx(0.4 * (1 + torch.cos(torch.tensor(5 / 6 * torch.pi)).item()) / 2)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_previous_checkpoint_kept_and_used_when_the_new_one_is_unreadable(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint({"config": {}, "epoch": 1}, path)
    save_checkpoint({"config": {}, "epoch": 2}, path)
    assert load_checkpoint(previous_path(path))["epoch"] == 1 and load_checkpoint(path)["epoch"] == 2
    from nat_ext.run import _read_run
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 cut")  # a zip torch.load cannot read
    assert _read_run(path)["epoch"] == 1


def test_metrics_keep_finished_epochs_and_skip_a_cut_line(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2, "lo')
    prepare_out(str(tmp_path), {}, 2)
    assert [json.loads(l)["epoch"] for l in open(tmp_path / "metrics.jsonl")] == [0, 1]
