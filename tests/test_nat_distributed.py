"""Two gloo processes: reassignment within each rank's batch, all-gathered updates,
identical valid permutations on both ranks at the end."""
import os

import pytest
import torch

from conftest import init_rank, run_processes

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist")
                                and "NAT_FASHION_MNIST_DIR" not in os.environ,
                                reason="needs `apt-get install dataset-fashion-mnist`")


def _worker(rank, world, port, out):
    init_rank(rank, world, port)
    from nat_ext.train import Config, train
    cfg = Config(limit=512, batch_size=32, dim=16, epochs=2, reassign_every=1, eval=False,
                 device="cpu", out=out, seed=7)
    res = train(cfg)
    torch.save(res["perm"], os.path.join(out, f"perm{rank}.pt"))


def test_two_process_gloo_run_keeps_one_permutation(tmp_path):
    run_processes(_worker, str(tmp_path))
    p0 = torch.load(tmp_path / "perm0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "perm1.pt", weights_only=True)
    assert torch.equal(p0, p1), "ranks ended with different permutations"
    assert torch.equal(p0.sort().values, torch.arange(512))
    assert not torch.equal(p0, torch.randperm(512, generator=torch.Generator().manual_seed(7))), \
        "no reassignment happened"
    import json
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    # Both ranks' updates count: 2 ranks x 8 batches x 32 images can all move.
    assert len(rows) == 2 and all(0.3 < r["changed_frac"] <= 1 for r in rows), rows
