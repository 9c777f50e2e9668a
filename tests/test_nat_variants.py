"""Issue 11's NAT variants: target sets, Sinkhorn alignment, two views; their checks and training runs."""
import json
import math
import os

import pytest
import scipy.optimize
import torch
import torch.nn.functional as F

from conftest import cpu_and_cuda, refused
from nat_ext import train as nat_train
from nat_ext.align import round_plan, sinkhorn_plan
from nat_ext.checkpoint import load_checkpoint
from nat_ext.config import Config
from nat_ext.state import Assignment
from nat_ext.targets import Targets

needs_data = pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist")
                                and "NAT_FASHION_MNIST_DIR" not in os.environ,
                                reason="needs `apt-get install dataset-fashion-mnist`")


def _unit(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# ----------------------------------------------------------------------------- Sinkhorn

@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("eps", [0.5, 0.1])
def test_sinkhorn_plan_is_the_entropic_optimum(device, eps):
    # Sinkhorn's theorem: the plan with unit row and column sums of the form diag(a) exp(S / eps) diag(b)
    # is unique and is the entropic optimum. Check both: the marginals, and that log P - S / eps is
    # r_i + c_j (its double-centred residual vanishes).
    scores = (_unit(3, 40, 16, seed=1) @ _unit(3, 40, 16, seed=2).transpose(1, 2)).to(device)
    plan = sinkhorn_plan(scores, eps, iters=2000)
    assert plan.shape == scores.shape and plan.dtype == scores.dtype and plan.device == scores.device
    assert (plan >= 0).all()
    torch.testing.assert_close(plan.sum(-1), torch.ones(3, 40, dtype=plan.dtype, device=device), atol=1e-9, rtol=0)
    torch.testing.assert_close(plan.sum(-2), torch.ones(3, 40, dtype=plan.dtype, device=device), atol=1e-9, rtol=0)
    gap = plan.log() - scores / eps
    residual = gap - gap.mean(-1, keepdim=True) - gap.mean(-2, keepdim=True) + gap.mean((-2, -1), keepdim=True)
    assert residual.abs().max() < 1e-6


@pytest.mark.parametrize("seed", range(5))
def test_rounded_plan_reaches_the_exact_optimum_as_eps_goes_to_0(seed):
    scores = _unit(30, 8, seed=seed) @ _unit(30, 8, seed=seed + 100).t()
    rows, cols = scipy.optimize.linear_sum_assignment(scores.numpy(), maximize=True)
    best = scores.numpy()[rows, cols].sum()
    gaps = []
    for eps in (0.3, 0.03, 1e-3):
        col4row, info = round_plan(sinkhorn_plan(scores, eps, iters=5000))
        assert int(info) == 0 and sorted(col4row.tolist()) == list(range(30))
        gaps.append(best - float(scores[torch.arange(30), col4row].sum()))
    assert all(g >= -1e-12 for g in gaps), gaps  # nothing beats the optimum
    assert gaps[-1] < 1e-12, gaps                  # and the smallest eps reaches it
    assert gaps[0] >= gaps[-1]


def test_sinkhorn_bad_arguments_name_what_is_wrong():
    s = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="sinkhorn_eps should be a finite number > 0, got 0"):
        sinkhorn_plan(s, 0, 10)
    with pytest.raises(ValueError, match="sinkhorn_eps .* got nan"):
        sinkhorn_plan(s, float("nan"), 10)
    with pytest.raises(ValueError, match="sinkhorn_iters should be an int >= 1, got 0"):
        sinkhorn_plan(s, 0.1, 0)
    with pytest.raises(ValueError, match=r"scores should be a floating Tensor\[..., b, b\], got torch.float32 "
                                         r"Tensor\[4, 3\]"):
        sinkhorn_plan(torch.zeros(4, 3), 0.1, 10)
    with pytest.raises(ValueError, match="got torch.int64"):
        sinkhorn_plan(torch.zeros(4, 4, dtype=torch.int64), 0.1, 10)


def test_reassign_plan_follows_the_plan_and_counts_a_nan_plan():
    state = Assignment(6, seed=0)
    held = state.perm.clone()
    idx = torch.tensor([5, 0, 3])
    plan = torch.eye(3)[[2, 0, 1]]  # image idx[0] takes the target idx[2] holds, ...
    new = state.reassign_plan(idx, plan)
    assert new.tolist() == held[idx[[2, 0, 1]]].tolist()
    state.update(idx, new)
    state.check()
    plan[1, 1] = float("nan")
    assert torch.equal(state.reassign_plan(idx, plan), state.perm[idx])  # failed: targets kept
    with pytest.raises(RuntimeError, match=r"failed: 1 invalid entry \(status 2\)"):
        state.check()
    with pytest.raises(ValueError, match=r"plan should be Tensor\[3, 3\], got \(3, 2\)"):
        state.reassign_plan(idx, torch.zeros(3, 2))


# ----------------------------------------------------------------------------- target sets

@pytest.mark.parametrize("generator", ["pcg64", "philox"])
def test_onehot_targets_are_balanced_prototypes(generator):
    t = Targets(60, 8, seed=3, kind="onehot", num_prototypes=6, generator=generator)
    assert torch.equal(t.matrix, torch.eye(8)[torch.arange(60) % 6])
    assert torch.equal(t.matrix.sum(0)[:6], torch.full((6,), 10.0))  # n / k each
    lazy = Targets(60, 8, seed=3, kind="onehot", num_prototypes=6, generator=generator, materialize=False)
    assert torch.equal(lazy.rows(torch.tensor([7, 59])), t.matrix[[7, 59]])


@pytest.mark.parametrize("generator", ["pcg64", "philox"])
def test_clustered_targets_lie_around_their_centres(generator):
    n, d, k, spread = 400, 64, 4, 0.5
    t = Targets(n, d, seed=2, kind="clustered", num_prototypes=k, spread=spread, generator=generator)
    torch.testing.assert_close(t.matrix.norm(dim=1), torch.ones(n))
    centre_of = torch.arange(n) % k
    cos = (t.matrix * t.centres[centre_of]).sum(1)
    # u is uniform and independent of the centre: cos = (1 + s c.u) / |c + s u| ~ 1 / sqrt(1 + s^2).
    assert abs(float(cos.mean()) - 1 / math.sqrt(1 + spread ** 2)) < 0.02
    other = (t.matrix * t.centres[(centre_of + 1) % k]).sum(1)
    assert float(cos.min()) > float(other.max())  # every target is nearest its own centre
    # regenerable from (seed, index); the centres are not rows of the run's sphere set
    lazy = Targets(n, d, seed=2, kind="clustered", num_prototypes=k, spread=spread, generator=generator,
                   materialize=False)
    torch.testing.assert_close(lazy.rows(torch.tensor([0, 399])), t.matrix[[0, 399]], rtol=0, atol=1e-6)
    sphere = Targets(n, d, seed=2, generator=generator).matrix
    assert (sphere @ t.centres.t()).abs().max() < 0.99
    # spread 0: the centres themselves
    zero = Targets(n, d, seed=2, kind="clustered", num_prototypes=k, spread=0.0, generator=generator)
    torch.testing.assert_close(zero.matrix, t.centres[centre_of])


@pytest.mark.parametrize("kind, k, spread, message", [
    ("onehot", 7, 0.0, "num_prototypes should divide the 60 images"),
    ("onehot", 12, 0.0, r"num_prototypes should lie in \[2, dim = 8\]"),
    ("onehot", 1, 0.0, r"num_prototypes should lie in \[2, dim = 8\]"),
    ("clustered", 0, 0.5, r"num_prototypes should lie in \[1, 60\]"),
    ("clustered", 3, -1.0, "target_spread should be finite and >= 0, got -1.0"),
    ("clustered", 3, float("inf"), "target_spread should be finite"),
    ("cube", 3, 0.0, "targets should be one of"),
])
def test_bad_target_sets_are_named(kind, k, spread, message):
    with pytest.raises(ValueError, match=message):
        Targets(60, 8, seed=0, kind=kind, num_prototypes=k, spread=spread)


# ----------------------------------------------------------------------------- alignment of a batch

def _batch_setup(b=6, d=5, seed=0):
    targets = Targets(b, d, seed=seed)
    state = Assignment(b, seed=seed)
    idx = torch.arange(b)
    held = targets.rows(state.targets_of(idx)).double()
    return targets, state, idx, held


def test_two_views_exact_swaps_the_alignments():
    targets, state, idx, held = _batch_setup()
    p1, p2 = torch.tensor([1, 0, 3, 2, 5, 4]), torch.tensor([2, 3, 4, 5, 0, 1])
    held_ids = state.targets_of(idx).clone()
    cfg = Config(views=2)
    loss_rows, changed = nat_train.align_batch(cfg, state, targets, idx, [held[p1], held[p2]], world=1)
    # view 0's loss targets come from view 1's solve and vice versa
    torch.testing.assert_close(loss_rows[0].double(), held[p2])
    torch.testing.assert_close(loss_rows[1].double(), held[p1])
    # the kept permutation is the exact solve on the summed scores
    scores = ((held[p1] + held[p2]) @ held.t()).numpy()
    _, cols = scipy.optimize.linear_sum_assignment(scores, maximize=True)
    assert state.perm.tolist() == held_ids[torch.from_numpy(cols)].tolist()
    assert int(changed) == int((state.perm != held_ids).sum())
    state.check()


def test_sinkhorn_alignment_soft_loss_targets_and_rounded_state():
    targets, state, idx, held = _batch_setup()
    p = torch.tensor([3, 4, 5, 0, 1, 2])
    held_ids = state.targets_of(idx).clone()
    feats = held[p].float()
    cfg = Config(align="sinkhorn", sinkhorn_eps=0.05, sinkhorn_iters=200)
    loss_rows, _ = nat_train.align_batch(cfg, state, targets, idx, [feats], world=1)
    plan = sinkhorn_plan(feats @ held.float().t(), 0.05, 200)
    torch.testing.assert_close(loss_rows[0], plan @ held.float())  # plan-weighted targets
    assert state.perm.tolist() == held_ids[p].tolist()               # rounded: the clear optimum
    state.check()


# ----------------------------------------------------------------------------- settings and training

@pytest.mark.parametrize("args, message", [
    (["--targets", "onehot", "--num-prototypes", "7"], "num_prototypes should divide the 128 images"),
    (["--targets", "onehot", "--num-prototypes", "32"], r"num_prototypes should lie in \[2, dim = 16\]"),
    (["--targets", "clustered", "--target-spread=-0.5"], "--target-spread should be a finite number >= 0"),
    (["--align", "sinkhorn", "--sinkhorn-eps", "0"], "--sinkhorn-eps should be a finite number > 0"),
    (["--align", "sinkhorn", "--sinkhorn-iters", "0"], "--sinkhorn-iters should be a positive integer"),
    (["--align", "sinkhorn", "--reassign-scope", "dataset"], "--align sinkhorn works on a batch"),
    (["--targets", "onehot", "--num-prototypes", "8", "--reassign-scope", "dataset"],
     "--targets onehot with --reassign-scope dataset"),
    (["--objective", "supervised", "--views", "2"], "--views 2 apply to NAT only"),
])
@needs_data
def test_bad_variant_settings_fail_before_training(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    with refused(capsys, message):
        nat_train.main(["--limit", "128", "--batch-size", "32", "--dim", "16", "--epochs", "1", "--no-eval",
                        "--out", str(out)] + args)
    assert not (out / "checkpoint.pt").exists()


def test_unknown_choices_are_refused_by_the_cli(capsys):
    for args in (["--targets", "cube"], ["--align", "greedy"], ["--views", "3"]):
        with pytest.raises(SystemExit):
            nat_train.main(args)
        assert "invalid choice" in capsys.readouterr().err


@needs_data
@pytest.mark.parametrize("variant", [
    ["--targets", "onehot", "--num-prototypes", "8"],
    ["--targets", "clustered", "--num-prototypes", "4", "--target-spread", "0.3"],
    ["--align", "sinkhorn", "--sinkhorn-iters", "20"],
    ["--views", "2"],
    ["--views", "2", "--align", "sinkhorn", "--targets", "clustered", "--targets-from-seed"],
])
def test_variant_runs_train_and_resume(tmp_path, variant):
    out = str(tmp_path / "run")
    args = ["--limit", "128", "--batch-size", "32", "--dim", "16", "--reassign-every", "1", "--no-eval",
            "--out", out] + variant
    assert nat_train.main(args + ["--epochs", "1"]) == 0
    assert nat_train.main(args + ["--epochs", "2", "--resume"]) == 0
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == 2 and all(r["reassigned"] and 0 < r["changed_frac"] <= 1 and 0 < r["loss"] < 4
                                  for r in rows), rows
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert torch.equal(ck["assignment"]["perm"].sort().values, torch.arange(128))
    assert ck["config"]["target_set"] == nat_train.target_set(nat_train.parse_config(Config, args))


@needs_data
def test_resume_refuses_another_target_set(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["--limit", "128", "--batch-size", "32", "--dim", "16", "--no-eval", "--out", out]
    assert nat_train.main(args + ["--epochs", "1", "--targets", "onehot", "--num-prototypes", "8"]) == 0
    with refused(capsys, "target_set: checkpoint 'onehot:8', this run 'onehot:4'"):
        nat_train.main(args + ["--epochs", "2", "--targets", "onehot", "--num-prototypes", "4", "--resume"])
    with refused(capsys, "target_set: checkpoint 'onehot:8', this run 'sphere'"):
        nat_train.main(args + ["--epochs", "2", "--resume"])


def test_two_views_from_an_image_folder(tmp_path):
    from PIL import Image
    g = torch.Generator().manual_seed(4)
    for c in ("a", "b"):
        os.makedirs(tmp_path / "imgs" / c)
        for i in range(8):
            arr = torch.randint(0, 256, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / "imgs" / c / f"{i}.png")
    out = str(tmp_path / "run")
    assert nat_train.main(["--data", str(tmp_path / "imgs"), "--image-size", "16", "--batch-size", "8",
                           "--dim", "8", "--epochs", "1", "--reassign-every", "1", "--views", "2",
                           "--no-eval", "--out", out]) == 0
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert row["reassigned"] and 0 < row["loss"] < 4 and row["images_per_s"] > 0, row


@pytest.mark.cuda
@needs_data
def test_variant_cuda_step_never_syncs(tmp_path):
    args = ["--limit", "256", "--batch-size", "64", "--dim", "16", "--epochs", "1", "--reassign-every", "1",
            "--device", "cuda", "--sync-debug", "--log-every", "0", "--no-eval", "--views", "2",
            "--align", "sinkhorn", "--targets", "clustered", "--num-prototypes", "4", "--out", str(tmp_path / "run")]
    assert nat_train.main(args) == 0
