import contextlib
import os
import re
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp


def cpu_and_cuda():
    """Device parametrisation: the CUDA case is always listed and skipped without a GPU."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def run_processes(worker, out: str, world: int = 2, timeout: float = 150) -> None:
    """Run ``worker(rank, world, port, out)`` in ``world`` spawned processes on a free local port;
    fail if they do not all finish within ``timeout`` seconds (the stragglers are killed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(worker, args=(world, port, out), nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                raise AssertionError(f"distributed run did not finish in {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def init_rank(rank: int, world: int, port: int) -> None:
    """In a worker of :func:`run_processes`: the environment torchrun would set, one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


@contextlib.contextmanager
def refused(capsys, match: str):
    """Inside, a CLI ``main`` must stop on a bad setting as argparse does: exit status 2 and
    ``prog: error: ...`` matching ``match`` on stderr, no traceback."""
    with pytest.raises(SystemExit) as stop:
        yield
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert re.search(match, err), err
    assert "Traceback" not in err, err
