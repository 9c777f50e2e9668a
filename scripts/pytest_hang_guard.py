"""A pytest plugin for the GPU check's test stage: a test whose failure matches $NAT_HANG_RE (the
op's NAT_CUDA_TIMEOUT_S deadline, or pytest-timeout's 'Timeout (>Ns)') is a hang. The kernel is
still running and every later CUDA test would queue behind it, so the plugin prints a HANG line
and ends the session there; pytest then writes its report and the JUnit XML, with the hung test
failed in it, instead of being killed with nothing written (pytest-timeout's thread method ends
the process with os._exit).

It also fits the selection to the stage's time: under scripts/gpu_check.sh (NAT_STAGE_LIMIT set,
or NAT_TESTS_ALLOWANCE_S for the dry run's stand-in), when scripts/gpu_plan.py's model of the
selected tests is over what the limit holds, it keeps the smallest case of each test first, then
the next smallest of each, and so on while they fit, and says so in a `select:` line. A failed
test that is not a hang gets a `WRONG ANSWER [tests] nodeid` line for the summary.

    PYTHONPATH=scripts python -m pytest -p pytest_hang_guard -m cuda --timeout 60 \
        -o timeout_method=signal tests
"""

import os
import re

import pytest

import gpu_plan

DEFAULT = r"did not finish within NAT_CUDA_TIMEOUT_S|Timeout \(?>"


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.failed:
        return
    text = report.longreprtext or ""
    line = text.strip().splitlines()[-1] if text.strip() else ""
    if re.search(os.environ.get("NAT_HANG_RE") or DEFAULT, text):
        print(f"\nHANG {report.nodeid} ({report.when}): {line}", flush=True)
        _session.shouldstop = f"a GPU hang in {report.nodeid}; later tests not run"
    elif report.when == "call":
        print(f"\nWRONG ANSWER [tests] {report.nodeid}: {line}", flush=True)


def _size(item: pytest.Item) -> int:
    """The largest problem a parametrised case names: the product of an int tuple (a shape) or
    an int (n) among its parameters; 0 when none."""
    sizes = [0]
    for v in getattr(getattr(item, "callspec", None), "params", {}).values():
        if isinstance(v, int) and not isinstance(v, bool):
            sizes.append(v * v)
        elif isinstance(v, tuple) and v and all(isinstance(x, int) for x in v):
            n = 1
            for x in v:
                n *= x
            sizes.append(n)
    return max(sizes)


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected theirs
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    allowance = os.environ.get("NAT_TESTS_ALLOWANCE_S")
    if allowance is None and os.environ.get("NAT_STAGE_LIMIT"):
        allowance = gpu_plan.allowance(float(os.environ["NAT_STAGE_LIMIT"]))
    if allowance is None:
        return
    allowance = float(allowance)
    runnable = [it for it in items if not it.get_closest_marker("skip")]
    cost = {it.nodeid: gpu_plan.test_seconds(it.nodeid, _size(it)) for it in runnable}
    compiles = any("compile" in it.nodeid for it in runnable)
    total = sum(cost.values()) + (gpu_plan.TEST_COMPILE_COLD_S if compiles else 0)
    if total <= allowance:
        print(f"\nselect: all {len(runnable)} tests fit ({total:.0f} s modelled of {allowance:.0f} s)")
        return
    groups: dict[str, list[pytest.Item]] = {}  # by test function, each smallest case first
    for it in runnable:
        groups.setdefault(it.nodeid.split("[")[0], []).append(it)
    for g in groups.values():
        g.sort(key=_size)
    keep, spent, cold = set(), 0.0, False
    for rank in range(max(len(g) for g in groups.values())):
        for g in groups.values():
            if rank < len(g):
                it = g[rank]
                extra = cost[it.nodeid] + (gpu_plan.TEST_COMPILE_COLD_S if "compile" in it.nodeid and not cold else 0)
                if spent + extra <= allowance:
                    keep.add(it.nodeid)
                    spent += extra
                    cold = cold or "compile" in it.nodeid
    dropped = [it for it in runnable if it.nodeid not in keep]
    items[:] = [it for it in items if it not in dropped]
    config.hook.pytest_deselected(items=dropped)
    print(f"\nselect: {len(keep)} of {len(runnable)} tests ({spent:.0f} s modelled of the {allowance:.0f} s "
          f"the limit holds; {total:.0f} s for all); each test's smallest cases first, {len(dropped)} left out")


_session = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _session
    _session = session
