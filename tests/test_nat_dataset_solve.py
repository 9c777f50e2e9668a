"""Issue 24 item 5, the dataset-wide solve inside a training run: every rank extracts its own shard and
takes part (2 gloo ranks under torchrun, the same optimum as 1 process), a solve past
--dataset-solve-budget falls back to batch scope and says so, a SIGTERM during the solve leaves a
checkpoint and the same command resumes without solving that epoch again, a resume right after a
finished solve does not repeat it, and the next solve starts warm from the checkpoint's matching and
prices. Synthetic images: no data set needed."""
import json
import os
import signal
import time

import pytest
import torch

from nat_ext import train as nat_train
from nat_ext.checkpoint import load_checkpoint, save_checkpoint
from nat_ext.reassign import TEST_SOLVE_SLEEP

from test_nat_cluster import _descendants, _torchrun

RUN = ["--data", "synthetic:512", "--image-size", "32", "--batch-size", "32", "--dim", "16", "--reassign-every", "1",
       "--reassign-scope", "dataset", "--workers", "0", "--no-eval", "--log-every", "0", "--seed", "3"]


def _rows(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def _finish(proc, timeout=240):
    try:
        log = proc.communicate(timeout=timeout)[0]
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return log


def test_two_ranks_each_extract_their_shard_and_match_one_process(tmp_path):
    out = str(tmp_path / "two")
    proc = _torchrun(RUN + ["--epochs", "2"], out, tmp_path)
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    # each rank embedded its own half (the shards are never gathered)
    for rank, rows in ((0, "0..256"), (1, "256..512")):
        assert f"rank {rank}: extracted the features of images {rows}" in log, log[-3000:]
    assert "epoch 1: solving the exact assignment of 512 images on 2 rank(s), cold" in log
    assert "epoch 2: solving the exact assignment of 512 images on 2 rank(s), warm from epoch 1's solve" in log
    rows = _rows(out)
    assert [r["dataset_solve"] for r in rows] == ["solved", "solved"], rows
    assert [r["warm"] for r in rows] == [False, True], rows
    # whether the old prices ranked the second solve's pass, and the share of rows that moved
    assert "warm_prices" not in rows[0] and isinstance(rows[1]["warm_prices"], bool), rows
    assert 0.0 <= rows[1]["warm_moved"] <= 1.0, rows
    # the checkpoint keeps the last solve: its matching is the held permutation, its duals float64
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    rec = ck["dataset_solve"]
    assert rec["epoch"] == rec["solved_epoch"] == 1 and rec["outcome"] == "solved"
    assert torch.equal(rec["col4row"], ck["assignment"]["perm"])
    assert rec["u"].dtype == rec["v"].dtype == torch.float64 and rec["v"].numel() == 512
    # the first solve sees the initial weights: the same features, hence the same optimum, as one process's
    single = str(tmp_path / "one")
    assert nat_train.main(RUN + ["--epochs", "1", "--out", single]) == 0
    one = _rows(single)[0]
    assert rows[0]["objective_held"] == pytest.approx(one["objective_held"], rel=1e-6), (rows[0], one)
    assert rows[0]["objective"] == pytest.approx(one["objective"], rel=1e-6), (rows[0], one)


def test_a_tiny_budget_falls_back_to_batch_scope_and_says_so(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert nat_train.main(RUN + ["--epochs", "2", "--dataset-solve-budget", "1e-6", "--out", out]) == 0
    log = capsys.readouterr().out
    assert "warning: epoch 1: the dataset-wide solve passed its budget (" in log, log
    assert "--dataset-solve-budget 1e-06 s); this epoch reassigns in batch scope instead" in log, log
    rows = _rows(out)
    assert [r["dataset_solve"] for r in rows] == ["budget", "budget"], rows
    # the batches reassigned instead: targets moved, as --reassign-scope batch moves them
    assert all(r["changed_frac"] > 0.3 and r["solve_budget"] == 1e-6 for r in rows), rows
    assert not any("objective" in r for r in rows), rows
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["dataset_solve"]["outcome"] == "budget"
    # cut inside epoch 2 (16 steps an epoch), then resumed: the epoch goes on in batch scope, bit for bit
    cut = str(tmp_path / "cut")
    args = RUN + ["--epochs", "2", "--dataset-solve-budget", "1e-6", "--out", cut]
    assert nat_train.main(args + ["--max-steps", "20"]) == 0
    assert "at epoch 1 step 4" in capsys.readouterr().out
    assert nat_train.main(args) == 0
    assert "epoch 2: its dataset-wide solve" not in capsys.readouterr().out  # resumed mid-epoch: nothing to say
    a, b = (load_checkpoint(os.path.join(p, "checkpoint.pt")) for p in (cut, out))
    assert torch.equal(a["assignment"]["perm"], b["assignment"]["perm"])
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_two_ranks_survive_a_solve_longer_than_its_budget(tmp_path):
    out = str(tmp_path / "run")
    os.environ[TEST_SOLVE_SLEEP] = "60"  # the solve would take a minute; its budget is 1 s
    try:
        proc = _torchrun(RUN + ["--epochs", "1", "--dataset-solve-budget", "1"], out, tmp_path)
    finally:
        del os.environ[TEST_SOLVE_SLEEP]
    t0 = time.monotonic()
    log = _finish(proc)
    assert proc.returncode == 0, log[-3000:]
    assert time.monotonic() - t0 < 45, "the budget did not cut the solve"
    assert "the dataset-wide solve passed its budget" in log and "reassigns in batch scope instead" in log, log
    assert _rows(out)[0]["dataset_solve"] == "budget"


def test_sigterm_during_the_solve_checkpoints_and_the_same_command_does_not_solve_again(tmp_path):
    out = str(tmp_path / "run")
    args = RUN + ["--epochs", "2"]
    os.environ[TEST_SOLVE_SLEEP] = "120"  # a long solve, so the signal lands inside it
    try:
        proc = _torchrun(args, out, tmp_path)
    finally:
        del os.environ[TEST_SOLVE_SLEEP]
    lines = []
    for line in proc.stdout:  # SIGTERM to torchrun and both ranks at once, as SLURM does, inside the solve
        lines.append(line)
        if line.startswith("epoch 1: solving the exact assignment"):
            for pid in [proc.pid] + _descendants(proc.pid):
                os.kill(pid, signal.SIGTERM)
            t_signal = time.monotonic()
            break
    else:
        raise AssertionError("".join(lines)[-3000:])
    log = "".join(lines) + _finish(proc, timeout=60)
    assert time.monotonic() - t_signal < 30, "not done within SLURM's default 30 s before SIGKILL"
    assert "signal 15 during the dataset-wide solve of epoch 1 (abandoned): saved" in log, log[-3000:]
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert (ck["epoch"], ck["step"]) == (0, 0)
    rec = ck["dataset_solve"]
    assert rec["epoch"] == 0 and rec["outcome"] == "stop" and "col4row" not in rec, rec
    # the same command (without the test's sleep): epoch 1 is not solved again but reassigns per batch,
    # epoch 2 solves
    again = _torchrun(args, out, tmp_path)
    log = _finish(again)
    assert again.returncode == 0, log[-3000:]
    assert "epoch 1: its dataset-wide solve was stopped by a signal after" in log, log[-3000:]
    assert "not solved again: this epoch reassigns in batch scope" in log
    assert "epoch 1: solving" not in log and "epoch 2: solving the exact assignment of 512 images on 2 rank(s), cold" in log
    rows = _rows(out)
    assert [r["dataset_solve"] for r in rows] == ["stop", "solved"], rows
    assert rows[0]["changed_frac"] > 0.3, "the fallback epoch did not reassign its batches"


def test_a_resume_right_after_a_finished_solve_does_not_repeat_it(tmp_path, capsys, monkeypatch):
    ref = str(tmp_path / "ref")
    args = RUN + ["--epochs", "2", "--reassign-every", "2"]  # solves at epoch 1 only
    saved = []

    def keep(state, path):  # every checkpoint the run writes, the one right after the solve among them
        save_checkpoint(state, path)
        saved.append(load_checkpoint(path))  # (a copy: the state's tensors are the live model's)
    monkeypatch.setattr(nat_train, "save_checkpoint", keep)
    assert nat_train.main(args + ["--out", ref]) == 0
    monkeypatch.undo()
    after_solve = saved[0]
    assert (after_solve["epoch"], after_solve["step"]) == (0, 0) and after_solve["dataset_solve"]["epoch"] == 0
    capsys.readouterr()
    for name, ck in (("cut", after_solve), ("legacy", {k: v for k, v in after_solve.items() if k != "dataset_solve"})):
        out = str(tmp_path / name)
        save_checkpoint(ck, os.path.join(out, "checkpoint.pt"))
        assert nat_train.main(args + ["--out", out]) == 0
        log = capsys.readouterr().out
        if name == "cut":
            assert "epoch 1: its dataset-wide assignment was solved in" in log and "not solved again" in log, log
            assert "solving the exact assignment" not in log, log
        else:  # a checkpoint from before the record: at step 0 the epoch solves (again), as it always did
            assert "epoch 1: solving the exact assignment of 512 images on 1 rank(s), cold" in log, log
        a, b = (load_checkpoint(os.path.join(p, "checkpoint.pt")) for p in (out, ref))
        assert torch.equal(a["assignment"]["perm"], b["assignment"]["perm"]), name
        for k in b["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
