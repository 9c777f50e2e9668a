"""The fake (meta) kernels fail as the eager ops do: same exception type, same message, for every
op and every argument check, side by side on an eager CPU tensor, a meta tensor and a fake tensor
(FakeTensorMode, what torch.compile traces with)."""

import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import nat_ext  # noqa: F401  (registers the ops and their fake kernels)

nat = torch.ops.nat


def z(*shape, dtype=torch.float32):
    return lambda device: torch.zeros(*shape, dtype=dtype, device=device)


# (op, argument makers / plain values, the exception type eager raises)
COST_CASES = [
    ((z(4),), ValueError),                          # 1-D
    ((z(2, 2, 2, 2),), ValueError),                 # 4-D
    ((z(2, 2, dtype=torch.int64),), TypeError),     # integer cost
    ((z(2, 2, dtype=torch.complex64),), TypeError),
    ((z(2, 2, dtype=torch.bool),), TypeError),
    ((z(3, 2),), ValueError),                       # n > m
    ((z(2, 5, 3),), ValueError),                    # batched n > m
    ((z(2, 2), False, "hungarian"), ValueError),    # unknown solver
    ((z(2, 3), False, "auction"), ValueError),      # auction on a rectangle
    ((z(2, 2, 3), True, "auction"), ValueError),
]
ASSIGN_CASES = [
    ((z(4), z(5, 3)), ValueError),
    ((z(4, 3), z(1, 5, 3)), ValueError),
    ((z(4, 3, dtype=torch.int32), z(5, 3, dtype=torch.int32)), TypeError),
    ((z(4, 3), z(5, 3, dtype=torch.float64)), TypeError),
    ((z(4, 3), z(5, 2)), ValueError),
    ((z(2, 4, 3), z(3, 5, 3)), ValueError),
    ((z(5, 3), z(4, 3)), ValueError),
    ((z(4, 3), z(5, 3), "hungarian"), ValueError),
    ((z(4, 3), z(5, 3), "auction"), ValueError),
]
TEAM_CASES = [
    ((z(3, 2), False, 2, "jv"), ValueError),
    ((z(2, 2, dtype=torch.int64), False, 2, "jv"), TypeError),
    ((z(2, 2), False, 0, "jv"), ValueError),
    ((z(2, 2), False, 65, "jv"), ValueError),
    ((z(2, 2), False, 2, "hungarian"), ValueError),
    ((z(2, 2), False, 2, "auto"), ValueError),
    ((z(2, 3), False, 2, "auction"), ValueError),
]
CERTIFY_CASES = [
    ((z(3, 2), z(3, dtype=torch.int64), z(2)), ValueError),                    # n > m
    ((z(2, 2, dtype=torch.int64), z(2, dtype=torch.int64), z(2)), TypeError),  # integer cost
    ((z(2, 3), z(3, dtype=torch.int64), z(3)), ValueError),                    # col4row shape
    ((z(2, 3), z(2), z(3)), TypeError),                                        # float col4row
    ((z(2, 2, 3), z(2, 2, dtype=torch.int64), z(3)), ValueError),              # v unbatched
    ((z(2, 3), z(2, dtype=torch.int64), z(3, dtype=torch.int64)), TypeError),  # integer v
]
CASES = (
    [(op, args, exc) for op in ("linear_sum_assignment", "linear_sum_assignment_with_duals",
                                "linear_sum_assignment_ex") for args, exc in COST_CASES]
    + [(op, args, exc) for op in ("certify", "_certify_or_fall_back") for args, exc in CERTIFY_CASES]
    + [(op, args, exc) for op in ("assign", "assign_ex") for args, exc in ASSIGN_CASES]
    + [("_linear_sum_assignment_team", args, exc) for args, exc in TEAM_CASES]
)


def build(args, device):
    return tuple(a(device) if callable(a) else a for a in args)


def raised(op, args):
    """(exception type, message) that op(*args) raises."""
    with pytest.raises(Exception) as info:
        getattr(nat, op)(*args)
    return info.type, str(info.value)


@pytest.fixture(autouse=True)
def quiet_fake_tensor_log():
    # FakeTensorMode logs every exception a fake kernel raises at ERROR level; these are expected.
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest.mark.parametrize("op,args,exc", CASES,
                         ids=[f"{op}-{i}" for i, (op, _, _) in enumerate(CASES)])
def test_fake_kernel_raises_as_eager(op, args, exc):
    eager = raised(op, build(args, "cpu"))
    assert eager[0] is exc, eager
    assert eager == raised(op, build(args, "meta"))
    with FakeTensorMode():
        fake_args = build(args, "cpu")
        assert eager == raised(op, fake_args)


def test_assign_devices_differ_message():
    """The device check, with a meta and a CPU tensor (eager kernels cannot run on meta, so the
    fake kernel's message is compared with the C++ check's wording)."""
    with pytest.raises(ValueError, match=r"^assign: feats and targets should be on the same "
                                         r"device, got feats on meta and targets on cpu$"):
        nat.assign(torch.zeros(2, 3, device="meta"), torch.zeros(2, 3))


@pytest.mark.parametrize("op,args", [
    ("linear_sum_assignment", (z(2, 3, 4), True, "jv")),
    ("linear_sum_assignment_with_duals", (z(3, 3), False, "auction")),
    ("linear_sum_assignment_ex", (z(2, 3, 3), False, "auto", True)),
    ("assign", (z(2, 3, 4), z(2, 5, 4))),
    ("assign_ex", (z(3, 4), z(3, 4), "auction")),
    ("_linear_sum_assignment_team", (z(3, 4), False, 2, "jv")),
    ("certify", (z(2, 3, 4), lambda d: torch.tensor([[0, 1, 2]] * 2, device=d), z(2, 4), True)),
    ("certify", (z(3, 3), lambda d: torch.tensor([2, 0, 1], device=d), z(3))),
])
def test_fake_kernel_shapes_match_eager(op, args):
    """Valid input: no error on either path, same output shapes and dtypes."""
    eager = getattr(nat, op)(*build(args, "cpu"))
    meta = getattr(nat, op)(*build(args, "meta"))
    eager, meta = (x if isinstance(x, tuple) else (x,) for x in (eager, meta))
    assert [(t.shape, t.dtype) for t in eager] == [(t.shape, t.dtype) for t in meta]
