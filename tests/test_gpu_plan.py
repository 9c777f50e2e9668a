"""The GPU check's budget model (scripts/gpu_plan.py): its tables stay within the budget, every
deadline fires before its stage is cut, and a source build takes its time from the least
valuable stages. The harness itself runs in CI as `bash scripts/gpu_check.sh --dry-run`."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import gpu_plan  # noqa: E402

ALL = [s for s in gpu_plan.RUN_ORDER if s != "build"]


@pytest.mark.parametrize("build", [False, True])
@pytest.mark.parametrize("budget", [300, gpu_plan.BUDGET_S, 900])
def test_plan_within_budget_and_deadlines_before_limits(build, budget):
    stages = ALL + (["build"] if build else [])
    limits, notes = gpu_plan.plan(budget, [s for s in gpu_plan.RUN_ORDER if s in stages])
    assert sum(limits.values()) <= budget, (budget, build, limits)
    assert list(limits) == [s for s in gpu_plan.RUN_ORDER if s in stages]  # run order kept
    wants = gpu_plan.wants()
    for s, lim in limits.items():
        assert lim == 0 or lim >= wants[s][1], f"{s}: {lim} s is under its least useful {wants[s][1]} s"
        if lim and s not in gpu_plan.FIXED:
            cold = s if s in gpu_plan.COLD_S else "plain"
            assert gpu_plan.deadline(s, lim) + gpu_plan.COLD_S[cold] < lim - gpu_plan.GRACE_S, (s, lim)


def test_a_build_takes_from_the_least_valuable_stages_first():
    plain, _ = gpu_plan.plan(gpu_plan.BUDGET_S, ALL)
    built, _ = gpu_plan.plan(gpu_plan.BUDGET_S, ALL + ["build"])
    assert built["build"] == gpu_plan.build_seconds() > 0
    cut = [s for s in gpu_plan.VALUE_ORDER if built[s] < plain[s]]
    assert cut, "a build should cost some stage its time"
    # Once a stage is cut, every less valuable one is cut too (or was already empty).
    first = gpu_plan.VALUE_ORDER.index(cut[0])
    assert all(built[s] < plain[s] or plain[s] == 0 for s in gpu_plan.VALUE_ORDER[first:])
    for s in ("smoke-jv", "smoke-block-auction", "smoke-coop-auction", "synccheck"):
        assert built[s] == plain[s], f"{s} should keep its time ahead of the benchmark and tests"


def test_fixed_stages_over_the_budget_refuse():
    with pytest.raises(ValueError, match="over the 100 s budget"):
        gpu_plan.plan(100, ALL + ["build"])


def test_fit_and_bench_skip_select_less_when_cut():
    assert gpu_plan.fit([1, 2, 3], 3.5) == 2
    assert gpu_plan.fit([5, 1], 1) == 1  # at least one case runs
    assert gpu_plan.bench_skip(gpu_plan.wants()["bench"][0], []) == ""
    small = gpu_plan.bench_skip(gpu_plan.wants()["bench"][1], ["coop_auction"])
    assert "4096x4096" in small and "64x1024x1024" in small
