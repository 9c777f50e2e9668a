"""Assignment state: stays a permutation; reassignment is optimal for fixed features."""
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from conftest import cpu_and_cuda
from nat_ext.faults import SolverFaultError
from nat_ext.ops import assign_ex
from nat_ext.state import Assignment
from nat_ext.targets import Targets


def _batch_loss(feats, targets):
    return (feats - targets).pow(2).sum(1).sum().item()


def test_permutation_invariant_after_many_reassignments():
    seed, n, d, b = 1, 500, 16, 32
    g = torch.Generator().manual_seed(seed)
    targets = Targets(n, d, seed=seed)
    state = Assignment(n, seed=seed)
    state.check()
    changed = 0
    for _ in range(300):
        idx = torch.randperm(n, generator=g)[:b]
        feats = F.normalize(torch.randn(b, d, generator=g), dim=1)
        changed += state.update(idx, state.reassign(idx, feats, targets.rows))
        state.check()
    assert changed > 0, f"seed {seed}: no target ever moved"
    assert torch.equal(torch.sort(state.perm).values, torch.arange(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reassignment_never_increases_batch_loss(seed, dtype):
    n, d, b = 300, 8, 40
    g = torch.Generator().manual_seed(seed)
    targets = Targets(n, d, seed=seed)
    state = Assignment(n, seed=seed)
    idx = torch.randperm(n, generator=g)[:b]
    feats = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    before = _batch_loss(feats, targets.rows(state.perm[idx]).double())
    new = state.reassign(idx, feats.to(dtype), targets.rows)
    assert torch.equal(new.sort().values, state.perm[idx].sort().values), "not a redistribution"
    state.update(idx, new)
    after = _batch_loss(feats, targets.rows(state.perm[idx]).double())
    assert after <= before + 1e-6, f"seed {seed}: loss rose {before} -> {after}"
    # Independent oracle: scipy's optimal loss over all redistributions of the batch's targets.
    held = targets.rows(new).double()
    r, c = linear_sum_assignment((feats @ held.t()).numpy(), maximize=True)
    best = _batch_loss(feats[r], held[c])
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    assert after <= best + tol, f"seed {seed}: {after} above the optimum {best}"


def test_check_detects_corruption_and_state_roundtrip():
    state = Assignment(20, seed=4)
    saved = state.state_dict()
    state.perm[3] = state.perm[4]
    with pytest.raises(RuntimeError, match="permutation"):
        state.check()
    state.load_state_dict(saved)
    state.check()
    bad = {"perm": torch.zeros(20, dtype=torch.int64)}
    with pytest.raises(RuntimeError, match="permutation"):
        state.load_state_dict(bad)
    with pytest.raises(ValueError, match="perm"):
        state.load_state_dict({"perm": torch.arange(5)})


def test_reassign_shape_error():
    state = Assignment(10)
    with pytest.raises(ValueError, match="feats"):
        state.reassign(torch.arange(3), torch.randn(4, 2), Targets(10, 2, seed=0).rows)


def test_update_ignores_padding_and_counts_changes():
    seed, n = 6, 30
    state = Assignment(n, seed=seed)
    idx = torch.tensor([4, 9, 17])
    held = state.perm[idx].clone()
    new = held[[2, 0, 1]]
    before = state.perm.clone()
    changed = state.update(torch.cat([idx, torch.tensor([-1, -1])]), torch.cat([new, torch.tensor([-1, -1])]))
    assert int(changed) == 3, f"seed {seed}: changed {int(changed)}"
    state.check()
    assert torch.equal(state.perm[idx], new)
    rest = torch.ones(n, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(state.perm[rest], before[rest]), "padding entries wrote into the permutation"
    assert int(state.update(idx, new)) == 0


def test_failed_solve_keeps_the_targets_and_is_reported_at_check():
    seed, n, b, d = 2, 50, 8, 4
    targets = Targets(n, d, seed=seed)
    state = Assignment(n, seed=seed)
    idx = torch.arange(b)
    held = state.perm[idx].clone()
    feats = torch.full((b, d), float("nan"))  # assign_ex reports info 2, rows -1
    new = state.reassign(idx, feats, targets.rows)
    assert torch.equal(new, held), f"seed {seed}: a failed solve moved targets"
    state.update(idx, new)
    with pytest.raises(RuntimeError, match=r"failed: 1 invalid entry \(status 2\); the features "
                                           "have diverged"):
        state.check()
    state.check()  # the report is cleared once raised


def faulty_solver(fail_calls: set[int], status: int = 4):
    """assign_ex that reports a solver fault (rows -1, info `status`) on the given calls."""
    calls = []

    def solve(feats, targets):
        calls.append(1)
        col4row, info = assign_ex(feats, targets)
        if len(calls) in fail_calls:
            return torch.full_like(col4row, -1), torch.full_like(info, status)
        return col4row, info
    return solve


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_solver_faults_keep_targets_and_are_reported_by_name(device, monkeypatch):
    seed, n, b, d = 4, 64, 8, 4
    targets = Targets(n, d, seed=seed)
    state = Assignment(n, seed=seed, assign_fn=faulty_solver({2, 3}), device=device)
    g = torch.Generator().manual_seed(seed)
    for call in range(1, 5):
        idx = torch.arange((call - 1) * b, call * b)
        held = state.perm[idx.to(device)].clone()
        feats = F.normalize(torch.randn(b, d, generator=g), dim=1).to(device)
        new = state.reassign(idx, feats, lambda t: targets.rows(t.cpu()).to(device))
        if call in (2, 3):
            assert torch.equal(new, held), f"seed {seed}: a faulted solve moved targets"
        state.update(idx, new)
    monkeypatch.delenv("NAT_CUDA_FALLBACK", raising=False)
    with pytest.warns(RuntimeWarning, match=r"failed in the solver: 2 certificate failed \(status 4\)"
                                            r".*kept their targets.*training goes on"):
        state.check()
    state.check()  # counted once, then cleared
    state.reassign(torch.arange(b), F.normalize(torch.randn(b, d, generator=g), dim=1).to(device),
                   lambda t: targets.rows(t.cpu()).to(device))  # call 5: fine
    state.assign_fn = faulty_solver({1}, status=3)
    state.reassign(torch.arange(b), F.normalize(torch.randn(b, d, generator=g), dim=1).to(device),
                   lambda t: targets.rows(t.cpu()).to(device))
    monkeypatch.setenv("NAT_CUDA_FALLBACK", "raise")
    with pytest.raises(SolverFaultError, match=r"1 iteration limit \(status 3\).*NAT_CUDA_FALLBACK=raise"):
        state.check()


@pytest.mark.cuda
@pytest.mark.parametrize("generator", ["philox", "pcg64"])
def test_reassign_and_update_do_not_sync_on_cuda(generator):
    seed, n, b, d = 3, 1000, 64, 16
    g = torch.Generator().manual_seed(seed)
    targets = Targets(n, d, seed=seed, materialize=generator == "pcg64", device="cuda", generator=generator)
    state = Assignment(n, seed=seed, device="cuda")
    idx = torch.randperm(n, generator=g)[:b].cuda()  # inputs reach the GPU before the check starts
    feats = F.normalize(torch.randn(b, d, generator=g), dim=1).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        changed = state.update(idx, state.reassign(idx, feats, targets.rows))
        loss = (feats - targets.rows(state.targets_of(idx))).pow(2).sum(1).mean()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    state.check()
    assert int(changed) > 0 and loss.item() < 2, f"seed {seed}: changed {int(changed)}, loss {loss.item()}"
