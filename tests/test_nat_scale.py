"""Issue 17, training at ImageNet scale: chunked target regeneration and objective, --max-steps with
resume, the learning-rate scaling, a resume with more epochs, and the bf16 autocast step on CUDA."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from nat_ext import train as nat_train
from nat_ext.checkpoint import load_checkpoint
from nat_ext.config import Config, parse_config
from nat_ext.data import get_dataset
from nat_ext.models import build_model
from nat_ext.reassign import assignment_objective, dataset_features, dataset_objective
from nat_ext.run import scaled_lr
from nat_ext.state import Assignment
from nat_ext.targets import Targets

needs_data = pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist")
                                and "NAT_FASHION_MNIST_DIR" not in os.environ,
                                reason="needs `apt-get install dataset-fashion-mnist`")


@pytest.mark.parametrize("generator,kind", [("philox", "sphere"), ("pcg64", "sphere"), ("philox", "clustered")])
@pytest.mark.parametrize("chunk_elems", [1, 100, 1 << 22])
def test_chunked_regeneration_equals_the_table(generator, kind, chunk_elems):
    n, d, seed = 301, 37, 5
    kw = dict(generator=generator, kind=kind, num_prototypes=7 if kind == "clustered" else 0, spread=0.5)
    table = Targets(n, d, seed=seed, materialize=True, **kw).matrix
    lazy = Targets(n, d, seed=seed, materialize=False, **kw)
    msg = f"{generator} {kind} chunk_elems {chunk_elems}"
    assert torch.equal(lazy.full(chunk_elems=chunk_elems), table), msg
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    got = torch.cat([rows for _, rows in lazy.chunks(perm, chunk_elems=chunk_elems)])
    assert torch.equal(got, table[perm]), msg
    # chunks are consecutive and of chunk_rows rows
    offsets = [lo for lo, _ in lazy.chunks(chunk_elems=chunk_elems)]
    step = lazy.chunk_rows(chunk_elems)
    assert offsets == list(range(0, n, step)), msg


@pytest.mark.parametrize("seed", [0, 1])
def test_objective_chunked_equals_unchunked(seed):
    n, d = 500, 24
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n, d, generator=g), dim=1)
    targets = Targets(n, d, seed=seed, materialize=False, generator="philox")
    perm = torch.randperm(n, generator=g)
    table = targets.full()
    unchunked = float((feats.double() * table[perm].double()).sum())
    for chunk_elems in (d, 7 * d, 1 << 22):
        for t in (targets, table):
            got = assignment_objective(feats, t, perm, chunk_elems=chunk_elems)
            assert got == pytest.approx(unchunked, rel=1e-12, abs=1e-12), (seed, chunk_elems, type(t))


def test_dataset_objective_streams_what_the_features_give():
    # the batch-by-batch objective of a model equals the objective of its gathered features
    torch.manual_seed(0)
    data, info = get_dataset("synthetic:150", "train", augment=False, image_size=16)
    model = build_model("convnet", 12, info.in_channels, small_input=True)
    targets = Targets(len(data), 12, seed=3, materialize=False, generator="philox")
    perm = Assignment(len(data), seed=3).perm
    feats = dataset_features(model, data, 12, 64, torch.device("cpu"))
    want = float((feats.double() * targets.full()[perm].double()).sum())
    got = dataset_objective(model, data, targets, perm, 32, torch.device("cpu"))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def _weights(path):
    ck = load_checkpoint(path)
    return ck["model"], ck["assignment"]["perm"], ck


@needs_data
def test_max_steps_then_resume_is_bit_identical(tmp_path):
    # 256 images, batch 32: 8 steps an epoch, 2 epochs = 16 steps
    args = ["--limit", "256", "--batch-size", "32", "--dim", "8", "--epochs", "2", "--reassign-every", "1",
            "--no-eval", "--seed", "2", "--targets-from-seed"]
    ref = str(tmp_path / "ref")
    assert nat_train.main(args + ["--out", ref]) == 0
    out = str(tmp_path / "run")
    assert nat_train.main(args + ["--out", out, "--max-steps", "5"]) == 0  # stops mid-epoch 1, exit 0
    _, perm, ck = _weights(os.path.join(out, "checkpoint.pt"))
    assert (ck["epoch"], ck["step"], ck["global_step"]) == (0, 5, 5)
    assert torch.equal(perm.sort().values, torch.arange(256))
    assert not os.path.exists(os.path.join(out, "metrics.jsonl")) or not open(os.path.join(out, "metrics.jsonl")).read()
    # K is the total across resumes: --max-steps 8 runs 3 more and ends exactly at the epoch end
    assert nat_train.main(args + ["--out", out, "--resume", "--max-steps", "8"]) == 0
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert (ck["epoch"], ck["step"], ck["global_step"]) == (1, 0, 8)
    # a resume at the limit does nothing
    assert nat_train.main(args + ["--out", out, "--resume", "--max-steps", "8"]) == 0
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["global_step"] == 8
    assert nat_train.main(args + ["--out", out, "--resume", "--max-steps", "10"]) == 0
    assert nat_train.main(args + ["--out", out, "--resume"]) == 0
    a, pa, cka = _weights(os.path.join(out, "checkpoint.pt"))
    b, pb, ckb = _weights(os.path.join(ref, "checkpoint.pt"))
    assert cka["global_step"] == ckb["global_step"] == 16
    assert torch.equal(pa, pb)
    for k in b:
        assert torch.equal(a[k], b[k]), k
    rows_a = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    rows_b = [json.loads(l) for l in open(os.path.join(ref, "metrics.jsonl"))]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for k in ("loss", "changed_frac", "lr", "step"):
            assert ra[k] == rb[k], (k, ra, rb)


def test_lr_scale_linear():
    cfg = Config(lr=0.1, batch_size=64)
    assert scaled_lr(cfg, 8) == 0.1
    cfg.lr_scale = "linear"
    assert scaled_lr(cfg, 8) == pytest.approx(0.1 * 64 * 8 / 256)
    assert scaled_lr(cfg, 1) == pytest.approx(0.1 / 4)


@needs_data
def test_lr_scale_reaches_the_optimizer(tmp_path):
    out = str(tmp_path / "run")
    assert nat_train.main(["--limit", "128", "--batch-size", "32", "--dim", "8", "--epochs", "1", "--no-eval",
                           "--schedule", "constant", "--lr", "0.08", "--lr-scale", "linear", "--out", out]) == 0
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert row["lr"] == pytest.approx(0.08 * 32 / 256)


@needs_data
def test_resume_with_more_epochs_continues_the_schedule(tmp_path):
    args = ["--limit", "128", "--batch-size", "32", "--dim", "8", "--reassign-every", "1", "--no-eval"]
    ref = str(tmp_path / "ref")
    assert nat_train.main(args + ["--epochs", "3", "--out", ref]) == 0
    out = str(tmp_path / "run")
    assert nat_train.main(args + ["--epochs", "1", "--out", out]) == 0
    first = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert first["lr"] == pytest.approx(0.0, abs=1e-12)  # the 1-epoch cosine ends at 0
    assert nat_train.main(args + ["--epochs", "3", "--out", out, "--resume"]) == 0
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    want = [json.loads(l) for l in open(os.path.join(ref, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    # after the resume the lr is the 3-epoch schedule's, not a climb back from 0
    for r, w in zip(rows[1:], want[1:]):
        assert r["lr"] == pytest.approx(w["lr"], rel=1e-9, abs=1e-12), (r, w)
    steps = 3 * 4
    assert rows[1]["lr"] == pytest.approx(0.01 * (1 + math.cos(math.pi * 8 / steps)) / 2, rel=1e-9)


def test_new_settings_parse_and_old_flags_still_work():
    cfg = parse_config(Config, ["--amp", "--no-track-objective", "--max-steps", "20", "--lr-scale", "linear",
                                "--dist-timeout", "30", "--channels-last", "--compile", "--gather-dtype", "bfloat16"])
    assert cfg.amp and cfg.amp_dtype == "bf16" and not cfg.track_objective and cfg.max_steps == 20
    assert cfg.lr_scale == "linear" and cfg.dist_timeout == 30 and cfg.channels_last and cfg.compile
    assert cfg.gather_dtype == "bfloat16"
    assert parse_config(Config, ["--track-objective", "--amp-dtype", "fp16"]).track_objective
    with pytest.raises(SystemExit):
        parse_config(Config, ["--amp-dtype", "fp32"])


@needs_data
def test_cpu_bf16_amp_run(tmp_path):
    out = str(tmp_path / "run")
    assert nat_train.main(["--limit", "128", "--batch-size", "32", "--dim", "8", "--epochs", "1", "--no-eval",
                           "--amp", "--channels-last", "--out", out]) == 0
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert math.isfinite(row["loss"]) and row["changed_frac"] > 0


@pytest.mark.cuda
@needs_data
def test_bf16_amp_cuda_step_never_syncs(tmp_path):
    # bf16 autocast needs no GradScaler, so no host sync per step (the fp16 scaler's inf check syncs).
    out = str(tmp_path / "run")
    assert nat_train.main(["--limit", "512", "--batch-size", "64", "--dim", "16", "--epochs", "2",
                           "--reassign-every", "1", "--device", "cuda", "--amp", "--amp-dtype", "bf16",
                           "--channels-last", "--sync-debug", "--log-every", "0", "--no-eval",
                           "--targets-from-seed", "--out", out]) == 0
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
