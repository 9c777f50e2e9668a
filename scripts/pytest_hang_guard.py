"""A pytest plugin for the GPU check's test stage: a test whose failure matches $NAT_HANG_RE (the
op's NAT_CUDA_TIMEOUT_S deadline, or pytest-timeout's 'Timeout (>Ns)') is a hang. The kernel is
still running and every later CUDA test would queue behind it, so the plugin prints a HANG line
and ends the session there; pytest then writes its report and the JUnit XML, with the hung test
failed in it, instead of being killed with nothing written (pytest-timeout's thread method ends
the process with os._exit).

    PYTHONPATH=scripts python -m pytest -p pytest_hang_guard -m cuda --timeout 60 \
        -o timeout_method=signal tests
"""

import os
import re

import pytest

DEFAULT = r"did not finish within NAT_CUDA_TIMEOUT_S|Timeout \(?>"


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not report.failed:
        return
    text = report.longreprtext or ""
    if re.search(os.environ.get("NAT_HANG_RE") or DEFAULT, text):
        line = text.strip().splitlines()[-1] if text.strip() else ""
        print(f"\nHANG {report.nodeid} ({report.when}): {line}", flush=True)
        _session.shouldstop = f"a GPU hang in {report.nodeid}; later tests not run"


_session = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _session
    _session = session
