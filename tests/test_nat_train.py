"""Training CLI: tiny end-to-end train + eval, checkpoints, refusal, kill and resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nat_ext import eval as nat_eval
from nat_ext import train as nat_train
from nat_ext.checkpoint import load_checkpoint
from nat_ext.faults import SolverFaultError

from conftest import refused

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist")
                                and "NAT_FASHION_MNIST_DIR" not in os.environ,
                                reason="needs `apt-get install dataset-fashion-mnist`")

TINY = ["--limit", "512", "--batch-size", "64", "--dim", "16", "--eval-limit", "600"]


def test_end_to_end_train_then_eval(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert nat_train.main(TINY + ["--epochs", "2", "--reassign-every", "1", "--out", out, "--seed", "3"]) == 0
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["reassigned"] and 0 < r["changed_frac"] <= 1 and r["images_per_s"] > 0 for r in rows)
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))  # weights_only=True inside
    assert ck["epoch"] == 2 and ck["step"] == 0 and ck["target_seed"] == 3
    assert torch.equal(ck["assignment"]["perm"].sort().values, torch.arange(512))
    report = json.load(open(os.path.join(out, "eval.json")))
    names = {r["encoder"]: r for r in report["results"]}
    assert set(names) == {"nat", "random", "pixels"}
    # 10 classes: a working probe is far above chance even on 600 images.
    assert all(r["linear_top1"] > 0.4 and r["knn_top1"] > 0.4 for r in names.values()), names
    assert "linear" in capsys.readouterr().out
    # nat-eval on the same checkpoint reproduces the probe exactly (deterministic L-BFGS),
    # and trains + probes a supervised baseline of the same architecture.
    assert nat_eval.main(["--checkpoint", os.path.join(out, "checkpoint.pt"), "--limit", "600",
                          "--baselines", "supervised", "--supervised-epochs", "2",
                          "--out", str(tmp_path / "eval2.json")]) == 0
    res = json.load(open(tmp_path / "eval2.json"))["results"]
    assert res[0]["linear_top1"] == names["nat"]["linear_top1"]
    assert res[1]["encoder"] == "supervised" and res[1]["linear_top1"] > 0.5, res


def test_resume_refuses_other_dim_or_size(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["--limit", "128", "--batch-size", "64", "--dim", "16", "--epochs", "1", "--no-eval", "--out", out]
    assert nat_train.main(args) == 0
    with refused(capsys, "dim: checkpoint 16, this run 8"):
        nat_train.main(args[:5] + ["8"] + args[6:] + ["--resume"])
    with refused(capsys, "n_images"):
        nat_train.main(["--limit", "192"] + args[2:] + ["--resume"])
    with refused(capsys, "arch"):
        nat_train.main(args + ["--arch", "resnet18", "--resume"])


def _spawn(args, cwd):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "nat_ext.train"] + args, cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path, proc, timeout=90):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no {path}: {proc.communicate()[0][-2000:]}")
        time.sleep(0.05)


def _cut_and_resume(args, tmp_path, settle=0.3, ready=None):
    """Run ``args`` twice: uninterrupted (ref) and SIGTERM'd mid-epoch 2 then resumed (cut).
    The signal is sent ``settle`` seconds after the first checkpoint is written (batch scope: at the end of
    epoch 1) and ``ready(out)`` turns true (a dataset-scope run checkpoints after each solve too).
    Returns the two final checkpoints (cut, ref) and the cut run's output folder."""
    ref = _spawn(args + ["--out", str(tmp_path / "ref")], tmp_path)
    out = str(tmp_path / "cut")
    proc = _spawn(args + ["--out", out], tmp_path)
    _wait_for(os.path.join(out, "checkpoint.pt"), proc)
    deadline = time.time() + 90
    while ready is not None and not ready(out):
        assert proc.poll() is None and time.time() < deadline, "the run never got ready to be cut"
        time.sleep(0.02)
    time.sleep(settle)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, log[-2000:]
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["epoch"] >= 1 and ck["step"] > 0, "the signal did not land mid-epoch"
    resumed = _spawn(args + ["--out", out, "--resume"], tmp_path)
    log = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, log[-2000:]
    assert "resumed from" in log
    assert ref.wait(timeout=120) == 0
    a = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    b = load_checkpoint(str(tmp_path / "ref" / "checkpoint.pt"))
    assert a["global_step"] == b["global_step"]
    assert torch.equal(a["assignment"]["perm"], b["assignment"]["perm"])
    return a, b, out, ck


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    args = ["--limit", "1024", "--batch-size", "32", "--dim", "16", "--epochs", "3",
            "--reassign-every", "1", "--no-eval", "--seed", "5"]
    a, b, out, _ = _cut_and_resume(args, tmp_path)
    for k in b["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5), k
    epochs = [json.loads(l)["epoch"] for l in open(os.path.join(out, "metrics.jsonl"))]
    assert epochs == [0, 1, 2]


def test_sigkill_leaves_a_loadable_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    args = ["--limit", "512", "--batch-size", "32", "--dim", "16", "--epochs", "2", "--no-eval", "--out", out]
    proc = _spawn(args, tmp_path)
    _wait_for(os.path.join(out, "checkpoint.pt"), proc)
    proc.kill()
    proc.communicate()
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["epoch"] in (1, 2)
    resumed = _spawn(args + ["--resume"], tmp_path)
    log = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, log[-2000:]
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["epoch"] == 2


def test_amp_and_targets_from_seed_run(tmp_path):
    out = str(tmp_path / "run")
    assert nat_train.main(["--limit", "128", "--batch-size", "32", "--dim", "16", "--epochs", "1", "--amp",
                           "--targets-from-seed", "--reassign-every", "1", "--no-eval", "--out", out]) == 0
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert 0 < row["loss"] < 4 and row["changed_frac"] > 0, row  # |f - t|^2 of unit vectors is in [0, 4]


def test_image_folder_with_a_corrupt_file(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(8)
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        os.makedirs(root / c)
        for i in range(10):
            arr = torch.randint(0, 256, (24, 24, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")
    (root / "dog" / "bad.jpg").write_bytes(b"\x00garbage")
    common = ["--data", str(root), "--image-size", "16", "--batch-size", "7", "--dim", "8", "--epochs", "1",
              "--reassign-every", "1"]
    with pytest.raises(RuntimeError, match="bad.jpg"):
        nat_train.main(common + ["--out", str(tmp_path / "a"), "--no-eval"])
    out = str(tmp_path / "b")
    assert nat_train.main(common + ["--out", out, "--skip-corrupt", "--eval-baselines", "random"]) == 0
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[0]["skipped"] == 1  # 21 files, 3 batches of 7: the bad file is always seen
    report = json.load(open(os.path.join(out, "eval.json")))
    # no val folder: the 21 files split 80/20 (16 training rows, the unreadable one among them, and 5 test images)
    assert [(r["n_train"], r["n_test"]) for r in report["results"]] == [(16, 5)] * 2


def test_redirected_output_has_lines_not_bars(tmp_path):
    out = str(tmp_path / "run")
    proc = _spawn(["--limit", "256", "--batch-size", "32", "--dim", "8", "--epochs", "2", "--log-every", "3",
                   "--no-eval", "--out", out], tmp_path)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log[-2000:]
    assert "\r" not in log, "progress-bar updates in a redirected log"
    assert log.startswith("rank 0: 0 loader worker(s)\n"), log
    lines = log.splitlines()[1:]
    # 8 steps per epoch: progress lines at steps 3 and 6, then the epoch line.
    assert [l.split(" loss")[0] for l in lines] == ["epoch 1/2 step 3/8", "epoch 1/2 step 6/8", "epoch 1/2",
                                                   "epoch 2/2 step 3/8", "epoch 2/2 step 6/8", "epoch 2/2"], log
    losses = [float(l.split("loss ")[1].split()[0]) for l in lines]
    assert all(0 < v < 4 for v in losses), losses


def _as_old_checkpoint(path):
    """Rewrite a checkpoint's config as the training layer before issue 12 wrote it."""
    ck = load_checkpoint(path)
    c = ck["config"]
    probe = c.pop("probe")
    for k in ("target_generator", "log_every", "sync_debug"):
        c.pop(k)
    c.update(eval_layer=probe["layer"], eval_grid=probe["grid"], eval_limit=probe["limit"],
             eval_baselines=probe["baselines"])
    torch.save(ck, path)


def test_old_checkpoints_resume_or_name_the_generator(tmp_path, capsys):
    args = ["--limit", "128", "--batch-size", "32", "--dim", "8", "--reassign-every", "1", "--no-eval"]
    # Materialised targets: the same (pcg64) rows as before, so an old checkpoint resumes.
    out = str(tmp_path / "a")
    assert nat_train.main(args + ["--epochs", "1", "--out", out]) == 0
    _as_old_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert nat_train.main(args + ["--epochs", "2", "--out", out, "--resume"]) == 0
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["epoch"] == 2
    # --targets-from-seed now draws philox rows: an old from-seed (pcg64) checkpoint is refused by name,
    # and resumes when the old generator is asked for.
    out = str(tmp_path / "b")
    assert nat_train.main(args + ["--epochs", "1", "--targets-from-seed", "--target-generator", "pcg64",
                                  "--out", out]) == 0
    _as_old_checkpoint(os.path.join(out, "checkpoint.pt"))
    with refused(capsys, "target_generator: checkpoint 'pcg64', this run 'philox'"):
        nat_train.main(args + ["--epochs", "2", "--targets-from-seed", "--out", out, "--resume"])
    assert nat_train.main(args + ["--epochs", "2", "--targets-from-seed", "--target-generator", "pcg64",
                                  "--out", out, "--resume"]) == 0
    # nat-eval reads the old config too.
    assert nat_eval.main(["--checkpoint", os.path.join(out, "checkpoint.pt"), "--limit", "200",
                          "--baselines", "", "--out", str(tmp_path / "e.json")]) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("from_seed", [False, True])
def test_reassigning_cuda_step_never_syncs(tmp_path, from_seed):
    # --sync-debug runs every step (after the batch's copy to the GPU) under
    # torch.cuda.set_sync_debug_mode("error"): any host sync in forward, reassignment, loss or update raises.
    args = ["--limit", "512", "--batch-size", "64", "--dim", "16", "--epochs", "2", "--reassign-every", "1",
            "--device", "cuda", "--sync-debug", "--log-every", "0", "--no-eval", "--out", str(tmp_path / "run")]
    assert nat_train.main(args + (["--targets-from-seed"] if from_seed else [])) == 0
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 2 and all(r["reassigned"] and 0 < r["changed_frac"] <= 1 and 0 < r["loss"] < 4
                                  for r in rows), rows


def test_solver_fault_in_training_keeps_targets_reports_and_stops_with_a_checkpoint(tmp_path, monkeypatch):
    """A batch whose solve faulted keeps its held targets; the epoch end reports the status by
    name and trains on (NAT_CUDA_FALLBACK=cpu) or stops with a checkpoint of that epoch (raise)."""
    from nat_ext import state as nat_state
    real = nat_state._default_assign
    calls = []

    def fault_on_third_batch(feats, targets):
        calls.append(1)
        col4row, info = real(feats, targets)
        if len(calls) == 3:
            return torch.full_like(col4row, -1), torch.full_like(info, 4)
        return col4row, info

    monkeypatch.setattr(nat_state, "_default_assign", fault_on_third_batch)
    args = TINY + ["--epochs", "2", "--reassign-every", "1", "--no-eval", "--seed", "5"]
    monkeypatch.delenv("NAT_CUDA_FALLBACK", raising=False)
    with pytest.warns(RuntimeWarning, match=r"1 certificate failed \(status 4\)"):
        assert nat_train.main(args + ["--out", str(tmp_path / "cpu")]) == 0
    rows = [json.loads(l) for l in open(tmp_path / "cpu" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [0, 1]  # trained on past the fault
    calls.clear()
    monkeypatch.setenv("NAT_CUDA_FALLBACK", "raise")
    with pytest.raises(SolverFaultError, match=r"status 4"):
        nat_train.main(args + ["--out", str(tmp_path / "raise")])
    ck = load_checkpoint(os.path.join(tmp_path / "raise", "checkpoint.pt"))
    assert ck["epoch"] == 1 and ck["step"] == 0  # the faulted epoch's work is kept
    assert torch.equal(ck["assignment"]["perm"].sort().values, torch.arange(512))
