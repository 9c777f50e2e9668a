"""--reassign-scope dataset: the whole-dataset reassignment (nat_ext.assign_full) in the loop.

The solve is checked against scipy on the dense scores; the loop's exact resume, the
objective bookkeeping, the distributed agreement check and the settings' errors."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from nat_ext import train as nat_train
from nat_ext.checkpoint import load_checkpoint
from nat_ext.config import Config
from nat_ext.full_assign import close_process_group
from nat_ext.state import Assignment
from nat_ext.targets import Targets

from conftest import init_rank, refused, run_processes
from test_nat_train import _cut_and_resume

needs_data = pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist")
                                and "NAT_FASHION_MNIST_DIR" not in os.environ,
                                reason="needs `apt-get install dataset-fashion-mnist`")

TIMING = ("images_per_s", "assign_frac", "seconds", "solve_seconds", "extract_seconds", "objective_seconds")


@pytest.mark.parametrize("seed", [0, 1])
def test_reassign_dataset_reaches_scipys_optimum(seed):
    n, d = 300, 8
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n, d, generator=g), dim=1)
    targets = Targets(n, d, seed=seed).matrix
    state = Assignment(n, seed=seed)
    held = state.perm.clone()
    changed, info, (col4row, u, v) = nat_train.reassign_dataset(state, targets, feats.clone())  # centred in place
    state.check()
    assert torch.equal(col4row, state.perm) and u.dtype == v.dtype == torch.float64, f"seed {seed}"
    scores = (feats.double() @ targets.double().T).numpy()
    rows, cols = linear_sum_assignment(scores, maximize=True)
    best = scores[rows, cols].sum()
    assert info["objective"] == pytest.approx(best, rel=1e-6, abs=1e-6), f"seed {seed}"
    assert info["objective"] == pytest.approx(nat_train.assignment_objective(feats, targets, state.perm))
    assert info["objective_held"] == pytest.approx(scores[torch.arange(n), held].sum(), rel=1e-9)
    assert int(changed) == int((state.perm != held).sum()) > 0, f"seed {seed}"
    # from the optimum, a second solve (warm from the first one's matching and prices) changes nothing
    changed, info2, _ = nat_train.reassign_dataset(state, targets, feats.clone(), warm=(col4row, u, v))
    assert int(changed) == 0 and info2["objective"] == pytest.approx(info["objective"]), f"seed {seed}"
    assert info2["warm"] and not info["warm"]


def test_a_shard_of_the_wrong_size_is_refused():
    state = Assignment(10, seed=0)
    with pytest.raises(ValueError, match=r"feats should be rank 1's shard, Tensor\[5, d\] \(rows 5..10 of 10\), "
                                         r"got \(10, 4\)"):
        nat_train.reassign_dataset(state, torch.zeros(10, 4), torch.zeros(10, 4), rank=1, world=2)


def test_bad_scope_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="--reassign-scope should be one of"):
        nat_train.train(Config(reassign_scope="global", out=str(tmp_path / "run")))
    assert not os.path.exists(tmp_path / "run")
    with pytest.raises(SystemExit):
        nat_train.main(["--reassign-scope", "global", "--out", str(tmp_path / "run")])


TINY = ["--limit", "256", "--batch-size", "32", "--dim", "16", "--epochs", "2", "--reassign-every", "1",
        "--no-eval", "--seed", "4"]


def _rows(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


@needs_data
def test_dataset_scope_run_records_the_objective_and_refuses_another_scope(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert nat_train.main(TINY + ["--reassign-scope", "dataset", "--track-objective", "--out", out]) == 0
    rows = _rows(out)
    assert len(rows) == 2
    for r in rows:
        assert r["reassigned"] and 0 < r["changed_frac"] <= 1 and r["rounds"] >= 1, r
        # the solve is the optimum from the held permutation on the same features
        assert r["objective"] >= r["objective_held"] - 1e-6 * abs(r["objective_held"]), r
        assert "objective_end" in r, r
    with refused(capsys, "'dataset'-scope run, this run's reassign_scope is 'batch'"):
        nat_train.main(TINY + ["--epochs", "3", "--out", out, "--resume"])


@needs_data
def test_tracking_the_objective_changes_nothing_in_batch_scope(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert nat_train.main(TINY + ["--out", a, "--track-objective"]) == 0
    assert nat_train.main(TINY + ["--out", b]) == 0  # off by default since issue 17
    ca, cb = (load_checkpoint(os.path.join(p, "checkpoint.pt")) for p in (a, b))
    assert torch.equal(ca["assignment"]["perm"], cb["assignment"]["perm"])
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    ra, rb = _rows(a), _rows(b)
    assert all("objective_end" in r for r in ra) and not any("objective_end" in r for r in rb)
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


@needs_data
@pytest.mark.slow
def test_dataset_scope_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path):
    args = ["--limit", "1024", "--batch-size", "32", "--dim", "16", "--epochs", "3",
            "--reassign-every", "1", "--reassign-scope", "dataset", "--no-eval", "--seed", "5"]
    # past epoch 2's dataset solve (its checkpoint holds it), into its steps
    a, b, out, ck = _cut_and_resume(args, tmp_path, settle=0.2, ready=_solved_epoch(1))
    assert ck["epoch_stats"]["reassign_info"]["rounds"] >= 1, "the checkpoint lost the epoch's solve"
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ra, rb = _rows(out), _rows(str(tmp_path / "ref"))
    assert [r["epoch"] for r in ra] == [0, 1, 2]
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in (*ra, *rb)]
    assert strip[:3] == strip[3:], "resumed metrics differ from the uninterrupted run's"


def _solved_epoch(epoch):
    # a `ready` of _cut_and_resume: the checkpoint written right after `epoch`'s dataset-wide solve is in place
    def ready(out):
        try:
            ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
        except (RuntimeError, FileNotFoundError):  # (not yet there)
            return False
        return (ck.get("dataset_solve") or {}).get("epoch") == epoch
    return ready


def _train_worker(rank, world, port, out):
    init_rank(rank, world, port)
    cfg = Config(limit=512, batch_size=32, dim=16, epochs=2, reassign_every=1, eval=False,
                 device="cpu", out=out, seed=7, reassign_scope="dataset")
    res = nat_train.train(cfg)
    torch.save(res["perm"], os.path.join(out, f"perm{rank}.pt"))


@needs_data
def test_two_process_dataset_scope_matches_one_process(tmp_path):
    run_processes(_train_worker, str(tmp_path), timeout=200)
    p0 = torch.load(tmp_path / "perm0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "perm1.pt", weights_only=True)
    assert torch.equal(p0, p1), "ranks ended with different permutations"
    assert torch.equal(p0.sort().values, torch.arange(512))
    rows = _rows(str(tmp_path))
    assert len(rows) == 2 and all(r["changed_frac"] > 0.3 for r in rows), rows
    # the first solve sees the initial weights: the same features, hence the same
    # optimum, as a single process's
    single = str(tmp_path / "single")
    assert nat_train.main(["--limit", "512", "--batch-size", "32", "--dim", "16", "--epochs", "1",
                           "--reassign-every", "1", "--reassign-scope", "dataset", "--no-eval",
                           "--seed", "7", "--out", single]) == 0
    one = _rows(single)[0]
    assert rows[0]["objective"] == pytest.approx(one["objective"], rel=1e-5), (rows[0], one)
    assert rows[0]["changed_frac"] == one["changed_frac"]


def _disagree_worker(rank, world, port, out):
    init_rank(rank, world, port)
    import torch.distributed as dist
    dist.init_process_group("gloo")
    n, d = 64, 8
    feats = F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(0)), dim=1)
    targets = Targets(n, d, seed=0).matrix
    state = Assignment(n, seed=rank)  # rank 1 holds another permutation: the state has diverged
    try:  # each rank its own shard, as dataset_features gives it
        nat_train.reassign_dataset(state, targets, feats[rank * 32:(rank + 1) * 32].clone(), rank, world)
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    with open(os.path.join(out, f"err{rank}.txt"), "w") as f:
        f.write(msg)
    close_process_group()


def test_ranks_that_disagree_raise_on_every_rank(tmp_path):
    run_processes(_disagree_worker, str(tmp_path), timeout=180)
    for rank in (0, 1):
        msg = open(tmp_path / f"err{rank}.txt").read()
        assert f"rank {rank}: the held permutation differs between ranks" in msg, msg
