"""Issue 19's self-supervision added to NAT: rotation head, KoLeo, multi-crop; their checks and runs."""
import json
import math
import os
import pytest
import torch

from conftest import init_rank, run_processes
from nat_ext import auxiliary
from nat_ext import eval as nat_eval
from nat_ext import terms
from nat_ext import train as nat_train
from nat_ext.checkpoint import load_checkpoint
from nat_ext.config import Config, ProbeConfig, validate
from nat_ext.models import build_model

needs_data = pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist")
                                and "NAT_FASHION_MNIST_DIR" not in os.environ,
                                reason="needs `apt-get install dataset-fashion-mnist`")

SMALL = dict(limit=512, batch_size=64, dim=16, epochs=2, reassign_every=1, eval=False, device="cpu", seed=5)


def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


# ----------------------------------------------------------------------------- the pieces

def test_koleo_matches_a_hand_computed_value():
    # Four points on the unit circle at 0, 60, 180 and 270 degrees (rows scaled by 3: the loss normalises).
    # Nearest neighbours: 0 <-> 60 (chord 2 sin 30 = 1, both ways), 180 -> 270 and 270 -> 0 or 180
    # (chord 2 sin 45 = sqrt 2). Loss = -(log 1 + log 1 + log sqrt2 + log sqrt2) / 4 = -log(2) / 4.
    angles = torch.tensor([0.0, 60.0, 180.0, 270.0], dtype=torch.float64) * math.pi / 180
    feats = 3 * torch.stack([angles.cos(), angles.sin()], dim=1)
    loss = auxiliary.koleo_loss(feats)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(float(loss) - (-math.log(2) / 4)) < 1e-6, float(loss)
    # spreading the points lowers it: the square (every neighbour at sqrt 2) gives -log(sqrt 2)
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert abs(float(auxiliary.koleo_loss(square)) + math.log(2) / 2) < 1e-6
    with pytest.raises(ValueError, match=r"b >= 2, got \(1, 2\)"):
        auxiliary.koleo_loss(square[:1])


def test_koleo_gradient_pushes_nearest_neighbours_apart():
    f = torch.tensor([[1.0, 0.0], [0.995, 0.0998], [-1.0, 0.0]], requires_grad=True)
    auxiliary.koleo_loss(f).backward()
    # a gradient step moves the close pair apart along the circle
    g = f - 0.1 * f.grad
    before = torch.nn.functional.normalize(f.detach(), dim=1)
    after = torch.nn.functional.normalize(g.detach(), dim=1)
    assert (after[0] - after[1]).norm() > (before[0] - before[1]).norm()


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.1])
def test_rotate_batch_rotates_by_index_mod_4(fraction):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 1, 6, 6, generator=g)
    rotated, labels = auxiliary.rotate_batch(x, fraction)
    m = math.ceil(fraction * 10)
    assert rotated.shape == (m, 1, 6, 6) and labels.shape == (m,) and labels.dtype == torch.int64
    # grouped by rotation: for r in 0..3 the images r, r + 4, ... of the first m, rotated r x 90 degrees
    expect = torch.cat([torch.rot90(x[r:m:4], r, dims=(2, 3)) for r in range(4)])
    order = torch.cat([torch.arange(m)[r::4] for r in range(4)])
    assert torch.equal(rotated, expect)
    assert torch.equal(labels, order % 4)
    with pytest.raises(ValueError, match="square"):
        auxiliary.rotate_batch(torch.zeros(2, 1, 4, 5))


@pytest.mark.parametrize("size,side", [(28, 12), (224, 96), (64, 27)])
def test_local_crops_shape_and_side(size, side):
    x = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(0))
    crops = auxiliary.local_crops(x, 3, torch.Generator().manual_seed(1))
    assert auxiliary.local_side(size) == side
    assert crops.shape == (15, 3, side, side)
    # crop k of image i is row k b + i: a constant image gives constant crops of its value
    const = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, size, size).contiguous()
    out = auxiliary.local_crops(const, 2, torch.Generator().manual_seed(2))
    torch.testing.assert_close(out.mean((1, 2, 3)), torch.arange(5.0).repeat(2))


@pytest.mark.parametrize("arch,width", [("convnet", 64), ("alexnet", 256), ("resnet18", 512)])
def test_stage_width_is_the_last_conv_stage_channels(arch, width):
    model = build_model(arch, 8, 1 if arch == "convnet" else 3, small_input=arch != "alexnet")
    layer = nat_eval.default_layer(arch)
    assert auxiliary.stage_width(model, layer) == width
    size = 28 if arch != "alexnet" else 96  # alexnet: the local-crop size of 224 inputs
    maps = model.trunk(torch.randn(2, 1 if arch == "convnet" else 3, size, size), layer)
    assert maps.shape[1] == width
    assert auxiliary.RotationHead(width)(maps).shape == (2, 4)


def test_settings_are_checked_by_name():
    assert auxiliary.parse_crops("2,6") == (2, 6)
    for bad in ("0,2", "3,1", "1,-1", "2", "a,b", "1,2,3"):
        with pytest.raises(ValueError, match="--crops"):
            auxiliary.parse_crops(bad)
    assert auxiliary.resolve_crops(Config(crops="2,4")).views == 2  # --crops wins over the default --views 1
    assert auxiliary.resolve_crops(Config(crops="2,4", views=2)).views == 2
    cfg = Config()
    assert auxiliary.resolve_crops(cfg) is cfg
    with pytest.raises(ValueError, match="--crops 1,2 sets 1 global view.*--views is 2"):
        auxiliary.resolve_crops(Config(crops="1,2", views=2))
    for kw, match in ((dict(koleo=-1.0), "--koleo"), (dict(rotation_loss=float("nan")), "--rotation-loss"),
                      (dict(rotation_fraction=0.0), "--rotation-fraction"), (dict(crops="0,2"), "--crops")):
        with pytest.raises(ValueError, match=match):
            validate(Config(**kw))
    with pytest.raises(ValueError, match="--rotation-loss 1.0, --koleo 0.1, --crops 1,2 apply to NAT only"):
        nat_train.check_settings(Config(objective="supervised", rotation_loss=1.0, koleo=0.1, crops="1,2"), 512)


# ----------------------------------------------------------------------------- training runs

@needs_data
def test_weight_0_builds_nothing_and_trains_as_the_defaults(tmp_path, monkeypatch):
    ref = nat_train.train(Config(out=str(tmp_path / "ref"), **SMALL))

    def forbidden(*a, **k):
        raise AssertionError("built or computed at weight 0")
    monkeypatch.setattr(nat_train, "AuxNet", forbidden)
    for name in ("RotationHead", "koleo_loss", "local_crops", "rotate_batch"):
        monkeypatch.setattr(terms, name, forbidden)
    zero = nat_train.train(Config(out=str(tmp_path / "zero"), rotation_loss=0.0, koleo=0.0, crops="1,0", **SMALL))
    a, b = (load_checkpoint(os.path.join(r["checkpoint"])) for r in (ref, zero))
    assert "aux" not in a and "aux" not in b
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(ref["perm"], zero["perm"])
    assert [r["loss"] for r in _rows(tmp_path / "ref")] == [r["loss"] for r in _rows(tmp_path / "zero")]
    assert not any(k in r for r in _rows(tmp_path / "zero") for k in ("rotation_loss", "rotation_acc", "koleo"))


@needs_data
@pytest.mark.parametrize("views", [1, 2])
def test_local_crops_take_their_image_s_targets(tmp_path, monkeypatch, views):
    seen = {}
    real_crops, real_loss = terms.local_crops, terms.nat_loss

    def crops(x, count, generator):
        out = real_crops(x, count, generator)
        seen.setdefault("crops", []).append((tuple(x.shape), tuple(out.shape)))
        return out

    def loss(pairs):
        seen.setdefault("pairs", []).append([(v.detach().clone(), t.clone()) for v, t in pairs])
        return real_loss(pairs)
    monkeypatch.setattr(terms, "local_crops", crops)
    monkeypatch.setattr(terms, "nat_loss", loss)
    res = nat_train.train(Config(out=str(tmp_path / "run"), crops=f"{views},3",
                                 **dict(SMALL, epochs=1)))
    assert seen["crops"] and all(src == (64, 1, 28, 28) and out == (192, 1, 12, 12) for src, out in seen["crops"])
    for pairs in seen["pairs"]:
        assert len(pairs) == views + 3
        held = pairs[views][1]
        assert all(v.shape == (64, 16) and torch.equal(t, held) for v, t in pairs[views:])
        if views == 1:  # exact, one view: the local crops regress to the global view's new targets
            assert torch.equal(pairs[0][1], held)
    assert torch.equal(res["perm"].sort().values, torch.arange(512))


@needs_data
def test_rotation_head_learns_and_lives_in_its_own_checkpoint_key(tmp_path):
    out = str(tmp_path / "rot")
    nat_train.train(Config(out=out, rotation_loss=1.0, **dict(SMALL, limit=2048, epochs=3, lr=0.05,
                                                               batch_size=128)))
    rows = _rows(out)
    assert rows[-1]["rotation_acc"] > 0.4, rows  # chance: 0.25 (0.48 after these 48 steps, seed 5)
    assert rows[-1]["rotation_loss"] < rows[0]["rotation_loss"]
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert set(ck["aux"]) == {"fc.weight", "fc.bias"} and ck["aux"]["fc.weight"].shape == (4, 64)
    assert not any(k.startswith(("fc.", "rotation")) for k in ck["model"])
    assert ck["config"]["rotation_loss"] == 1.0


@needs_data
def test_every_option_resumes_exactly_and_evaluates(tmp_path):
    kw = dict(SMALL, epochs=2)
    opts = dict(rotation_loss=0.5, rotation_fraction=0.5, koleo=0.1, crops="2,2")
    ref = nat_train.train(Config(out=str(tmp_path / "ref"), **opts, **kw))
    cut = str(tmp_path / "cut")
    first = nat_train.train(Config(out=cut, max_steps=11, **opts, **kw))  # stops mid epoch 2 (8 steps an epoch)
    assert first["eval"] is None
    with pytest.raises(ValueError, match="--rotation-loss 0.5, this run has 0.0"):
        nat_train.train(Config(out=cut, resume=True, **dict(opts, rotation_loss=0.0), **kw))
    done = nat_train.train(Config(out=cut, resume=True, **opts, **kw))
    a, b = load_checkpoint(ref["checkpoint"]), load_checkpoint(done["checkpoint"])
    for part in ("model", "aux"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert torch.equal(ref["perm"], done["perm"])
    rows = _rows(tmp_path / "ref")
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "rotation_loss", "rotation_acc", "koleo"))
    assert [r["loss"] for r in _rows(cut)] == [r["loss"] for r in rows]
    # nat-eval loads the encoder as before (the head is ignored)
    res = nat_eval.evaluate(nat_eval.EvalConfig(checkpoint=ref["checkpoint"], device="cpu",
                                                probe=ProbeConfig(limit=600, baselines="")))
    assert res["results"][0]["linear_top1"] > 0.4, res


@needs_data
def test_multi_crop_runs_on_synthetic_folder_style_data(tmp_path):
    # uint8 crops finished on the device (DeviceTransform): the local crops are cut from the first view
    res = nat_train.train(Config(data="synthetic:96", image_size=32, arch="resnet18", crops="1,2", rotation_loss=1.0,
                                 out=str(tmp_path / "syn"), workers=0, **dict(SMALL, limit=0, batch_size=32,
                                                                              epochs=1)))
    row = _rows(tmp_path / "syn")[0]
    assert math.isfinite(row["loss"]) and math.isfinite(row["rotation_loss"])
    assert load_checkpoint(res["checkpoint"])["aux"]["fc.weight"].shape == (4, 512)


@needs_data
def test_two_gloo_processes_keep_encoder_and_head_in_sync(tmp_path):
    # every rank's head and encoder parameters must end equal: DDP all-reduces the gradients of both
    # (the head is inside AuxNet, which DDP wraps); outside it the heads would drift apart
    run_processes(_worker_save, str(tmp_path))
    w0 = torch.load(tmp_path / "weights0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights1.pt", weights_only=True)
    assert w0.keys() == w1.keys() and any(k.startswith("aux.") for k in w0)
    assert all(torch.equal(w0[k], w1[k]) for k in w0), [k for k in w0 if not torch.equal(w0[k], w1[k])]
    ck = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert not torch.equal(ck["aux"]["fc.weight"], torch.zeros_like(ck["aux"]["fc.weight"]))
    rows = _rows(tmp_path)
    assert math.isfinite(rows[0]["rotation_loss"]) and math.isfinite(rows[0]["koleo"])


def _worker_save(rank, world, port, out):
    init_rank(rank, world, port)
    heads = []
    real = terms.RotationHead

    def keep(width):
        heads.append(real(width))
        return heads[-1]
    terms.RotationHead = keep  # this spawned process only
    models = []
    real_build = nat_train.build_model

    def build(*a, **k):
        models.append(real_build(*a, **k))
        return models[-1]
    nat_train.build_model = build
    nat_train.train(Config(out=out, rotation_loss=1.0, koleo=0.1, crops="1,2",
                           **dict(SMALL, batch_size=32, epochs=1)))
    # parameters only: batch-norm running statistics are per rank (DDP broadcasts rank 0's at each forward)
    state = {f"model.{k}": v.detach() for k, v in models[0].named_parameters()}
    state.update({f"aux.{k}": v.detach() for k, v in heads[0].named_parameters()})
    torch.save(state, os.path.join(out, f"weights{rank}.pt"))
