"""scipy's own test module for linear_sum_assignment (scipy/optimize/tests/
test_linear_assignment.py, as installed), run whole against nat_ext.linear_sum_assignment: its
test functions are collected here as they are, with the name `linear_sum_assignment` in their
module rebound to ours for each test, and every test must have called ours."""

import importlib

import pytest

import nat_ext

scipy_tests = importlib.import_module("scipy.optimize.tests.test_linear_assignment")
SCIPY_TEST_NAMES = sorted(name for name in vars(scipy_tests) if name.startswith("test_"))

# Collected by pytest from this module's namespace, with their parametrisations.
globals().update({name: getattr(scipy_tests, name) for name in SCIPY_TEST_NAMES})


@pytest.fixture(autouse=True)
def ours_in_scipys_module(monkeypatch, request):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return nat_ext.linear_sum_assignment(*args, **kwargs)

    monkeypatch.setattr(scipy_tests, "linear_sum_assignment", counted)
    yield
    if request.node.originalname != "test_every_scipy_test_is_collected":
        assert calls, "the scipy test did not call nat_ext.linear_sum_assignment"


def test_every_scipy_test_is_collected():
    # Guards the harness: scipy's module has its tests (constant matrix included) and all of
    # them are in this module's namespace, where pytest collects them.
    assert "test_constant_cost_matrix" in SCIPY_TEST_NAMES and len(SCIPY_TEST_NAMES) >= 10
    assert all(globals()[name] is getattr(scipy_tests, name) for name in SCIPY_TEST_NAMES)
