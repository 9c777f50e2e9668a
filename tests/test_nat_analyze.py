"""nat-analyze (issue 27): the numbers against hand-built cases, the figures as images, the command end to end."""
import json
import math
import os
import shutil
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from nat_ext import analyze as nat_analyze
from nat_ext import eval as nat_eval
from nat_ext import train as nat_train
from nat_ext.config import EvalConfig, ProbeConfig
from nat_ext.eval import Probed
from nat_ext.models import build_model
from nat_ext.probes import KnnBank
from test_nat_eval import FMNIST, _image_tree

PIL = pytest.importorskip("PIL.Image")


def _bank(feats, labels):
    bank = KnnBank(len(labels), feats.shape[1], torch.device("cpu"))
    bank.put(torch.arange(len(labels)), feats, labels)
    bank.finish()
    return bank


@pytest.mark.parametrize("seed", [0, 1])
def test_one_hot_features_have_purity_one(seed):
    # features that are exactly the one-hot labels: every image's 10 nearest (cosine) share its label
    g = torch.Generator().manual_seed(seed)
    train_y = torch.arange(200) % 10
    test_y = torch.randint(0, 10, (50,), generator=g)
    bank = _bank(F.one_hot(train_y, 10).float(), train_y)
    _, rows = bank.neighbours(F.one_hot(test_y, 10).float(), nat_analyze.PURITY_K)
    assert nat_analyze.purity(bank.labels[rows], test_y) == 1.0, f"seed {seed}"
    # the same features with the bank's labels shuffled: about 1 in 10 neighbours agree
    shuffled = train_y[torch.randperm(200, generator=g)]
    assert nat_analyze.purity(shuffled[rows], test_y) < 0.4, f"seed {seed}"


def test_purity_counts_the_neighbours_that_agree():
    near = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0]])
    assert nat_analyze.purity(near, torch.tensor([0, 2])) == (2 / 4 + 3 / 4) / 2
    with pytest.raises(ValueError, match="neighbour_labels should be Tensor"):
        nat_analyze.purity(near, torch.tensor([0, 2, 1]))


@pytest.mark.parametrize("spectrum, expected", [
    ((4.0, 2.0, 1.0, 1.0), 2 ** 1.75),  # p = (1/2, 1/4, 1/8, 1/8): entropy 1.75 ln 2
    ((3.0, 3.0, 3.0), 3.0),              # equal singular values: the rank itself
    ((5.0,), 1.0),                       # one direction
    ((1.0, 1e-30), 1.0),                 # a negligible second direction adds nothing
])
def test_effective_rank_of_a_known_spectrum(spectrum, expected):
    seed = 0
    g = torch.Generator().manual_seed(seed)
    r = len(spectrum)
    u = torch.linalg.qr(torch.randn(40, r, generator=g, dtype=torch.float64))[0]  # orthonormal columns
    v = torch.linalg.qr(torch.randn(12, r, generator=g, dtype=torch.float64))[0]
    x = u @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ v.t()  # [40, 12] with this spectrum
    assert math.isclose(nat_analyze.effective_rank(x), expected, rel_tol=1e-9), f"seed {seed}"


def test_pick_queries_is_seeded_and_per_class():
    labels = torch.arange(300) % 30
    a = nat_analyze.pick_queries(labels, 2, seed=5)
    assert torch.equal(a, nat_analyze.pick_queries(labels, 2, seed=5))
    picked = labels[a]
    assert len(a) == 20 and picked.unique().numel() == 10  # 10 of the 30 classes, 2 each, ordered by class
    assert torch.equal(picked, picked.sort().values) and all(int((picked == c).sum()) == 2 for c in picked.unique())
    assert not torch.equal(a, nat_analyze.pick_queries(labels, 2, seed=6))
    small = torch.tensor([0, 1, 1, 2, 2, 2])
    assert sorted(small[nat_analyze.pick_queries(small, 2, seed=0)].tolist()) == [0, 1, 1, 2, 2]


def _check_png(path):
    """The figure opens as an image at least 400 px a side and is not blank."""
    img = PIL.open(path)
    img.load()
    assert min(img.size) >= 400, (path, img.size)
    x = torch.frombuffer(bytearray(img.convert("L").tobytes()), dtype=torch.uint8).float()
    assert float(x.std()) > 10 and float((x < 128).float().mean()) > 0.005, path  # drawn on, not one colour


def test_sobel_filters_are_said_on_the_figure(tmp_path):
    torch.manual_seed(0)
    model = build_model("convnet", 8, sobel=True)
    grid = nat_analyze._filter_grid(nat_analyze._first_conv(model).weight, sobel=True)
    # 16 cells of 3 x (3 + 1 + 3), each filter's two channels side by side, 1 px apart: 6 rows of 3, about square
    assert grid.shape == (6 * (3 + 1) + 1, 3 * (7 + 1) + 1, 3)
    assert torch.allclose(grid[1:4, 1:4, 0], 0.5 + 0.5 * model.stages.conv1[0].weight[0, 0].detach()
                          / model.stages.conv1[0].weight[0].detach().abs().max())
    prep = types.SimpleNamespace(encoders=[Probed("nat", model, []), Probed("pixels", None, [])], run={"sobel": True})
    name = nat_analyze.filters_figure(prep, str(tmp_path / "filters.png"))
    assert name == "filters.png"
    _check_png(tmp_path / "filters.png")


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny NAT run (2 reassigning epochs on 256 images) and a tiny supervised one, trained here."""
    if not FMNIST:
        pytest.skip("needs `apt-get install dataset-fashion-mnist`")
    root = tmp_path_factory.mktemp("runs")
    tiny = ["--limit", "256", "--batch-size", "64", "--no-eval", "--seed", "1"]
    assert nat_train.main(tiny + ["--dim", "16", "--epochs", "2", "--reassign-every", "1",
                                  "--out", str(root / "nat")]) == 0
    assert nat_train.main(tiny + ["--objective", "supervised", "--epochs", "1", "--out", str(root / "sup")]) == 0
    return root


def test_end_to_end_on_fashion_mnist(runs, tmp_path, capsys):
    nat, sup = str(runs / "nat" / "checkpoint.pt"), str(runs / "sup" / "checkpoint.pt")
    out = tmp_path / "an"
    probe = ["--limit", "200", "--knn-bank", "150", "--probe-iters", "30"]
    assert nat_analyze.main(["--checkpoint", nat, "--out", str(out), "--k", "5", "--per-class", "2",
                             "--tsne-points", "60", "--baselines", "random,pixels,supervised",
                             "--supervised-checkpoint", sup] + probe) == 0
    rep = json.load(open(out / "analysis.json"))
    assert list(rep["encoders"]) == ["nat", "random", "supervised", "pixels"]
    assert rep["figures"] == ["filters.png", "neighbours.png", "tsne.png", "per_class.png", "history.png"]
    for f in rep["figures"]:
        _check_png(out / f)
    assert rep["layer"] == "conv4" and rep["seed"] == 1 and rep["notes"] == []
    sub = rep["subsample"]
    assert sub == {"probe_train": 200, "probe_test": 200, "probe_method": "lbfgs", "bank": 150,
                   "purity_queries": 200, "purity_k": 10, "tsne_points": 60, "neighbours_shown": 5}
    assert len(rep["queries"]["test_rows"]) == 20 and sorted(set(rep["queries"]["labels"])) == list(range(10))
    # the probe is nat-eval's: the same top-1, and the per-class accuracies weighted by the class sizes give it
    ev = nat_eval.evaluate(EvalConfig(checkpoint=nat, device="cpu", workers=0,
                                      probe=ProbeConfig(baselines="random,pixels,supervised", supervised_checkpoint=sup,
                                                        limit=200, knn_bank=150, probe_iters=30)))
    for r in ev["results"]:
        e = rep["encoders"][r["encoder"]]
        assert e["linear_top1"] == r["linear_top1"] and e["knn_top1"] == r["knn_top1"], r["encoder"]
        per = sum(e["per_class_top1"][c] * e["per_class_test_images"][c] for c in rep["class_names"])
        assert math.isclose(per / 200, e["linear_top1"], abs_tol=1e-12), r["encoder"]
        assert 0 <= e["purity"] <= 1 and 1 <= e["effective_rank"] <= e["feature_dim"], e
    assert rep["class_names"][0] == "T-shirt/top" and rep["encoders"]["pixels"]["feature_dim"] == 784
    assert "purity@10" in capsys.readouterr().out


def test_without_sklearn_and_metrics_the_rest_is_written(runs, tmp_path, monkeypatch, capsys):
    # scikit-learn fails to import (None in sys.modules), and the checkpoint sits alone in its folder
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(runs / "nat" / "checkpoint.pt", alone / "checkpoint.pt")
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    assert nat_analyze.main(["--checkpoint", str(alone / "checkpoint.pt"), "--limit", "200", "--baselines", "",
                             "--probe-iters", "30"]) == 0
    rep = json.load(open(alone / "analysis" / "analysis.json"))  # the default --out
    assert rep["figures"] == ["filters.png", "neighbours.png", "per_class.png"]
    assert rep["subsample"]["tsne_points"] == 0 and list(rep["encoders"]) == ["nat"]
    assert any("t-SNE map skipped: scikit-learn is not installed" in n for n in rep["notes"])
    assert any("history skipped: no metrics.jsonl" in n for n in rep["notes"])
    text = capsys.readouterr().out
    assert "t-SNE map skipped" in text and "history skipped" in text
    for f in rep["figures"]:
        _check_png(alone / "analysis" / f)


@pytest.mark.parametrize("args, message", [
    (["--k", "0"], "--k should be a positive integer, got 0"),
    (["--per-class", "-1"], "--per-class should be a positive integer, got -1"),
    (["--tsne-points", "-5"], "--tsne-points should be an integer >= 0, got -5"),
    (["--knn-bank", "0"], "--knn-bank should be a positive integer, got 0"),
    (["--baselines", "random,noise"], r"--baselines should be a comma list of"),
    (["--layer", "conv9"], r"--layer should be one stage of \['conv1', 'conv2', 'conv3', 'conv4', 'pool'\]"),
    (["--layer", "all"], r"--layer should be one stage of .* \(nat-analyze reads one layer\), got 'all'"),
])
def test_bad_settings_exit_with_argparse_errors(runs, tmp_path, capsys, args, message):
    import re
    with pytest.raises(SystemExit) as e:
        nat_analyze.main(["--checkpoint", str(runs / "nat" / "checkpoint.pt"), "--out", str(tmp_path / "x")] + args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search("nat-analyze: error: " + message, err), err
    assert "Traceback" not in err and not (tmp_path / "x").exists()  # refused before any work


def test_missing_checkpoint_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        nat_analyze.main(["--checkpoint", str(tmp_path / "none.pt")])
    assert "nat-analyze: error: --checkpoint " in capsys.readouterr().err


def test_image_folder_bank_subsample_and_colour(tmp_path):
    # an ImageFolder tree (3 classes named by their folders, RGB, no test split: 80/20 of train): the bank is a
    # subsample, said in analysis.json and on the neighbour figure's caption
    data = tmp_path / "data"
    _image_tree(data, False)
    shutil.rmtree(data / "val")
    assert nat_train.main(["--data", str(data), "--image-size", "16", "--batch-size", "4", "--dim", "8",
                           "--epochs", "1", "--no-eval", "--out", str(tmp_path / "run")]) == 0
    rep = nat_analyze.analyze(nat_analyze.AnalyzeConfig(
        checkpoint=str(tmp_path / "run" / "checkpoint.pt"), k=3, device="cpu", workers=0,
        probe=ProbeConfig(knn_bank=6, baselines="random", probe_iters=20)))
    assert rep["class_names"] == ["n01", "n02", "n03"]
    assert rep["subsample"]["probe_train"] == 9 and rep["subsample"]["bank"] == 6
    assert "tsne.png" not in rep["figures"] and any("only 3 test images" in n for n in rep["notes"])
    for f in rep["figures"]:
        _check_png(tmp_path / "run" / "analysis" / f)


def test_a_thousand_classes(tmp_path):
    # synthetic ImageNet-shaped data at 32 px (1000 classes, RGB): 10 seeded classes in the neighbour figure, the
    # per-class figure as sorted curves over the classes that have test images, the map without a legend
    assert nat_train.main(["--data", "synthetic:200", "--image-size", "32", "--batch-size", "50", "--dim", "8",
                           "--epochs", "1", "--no-eval", "--out", str(tmp_path / "run")]) == 0
    assert nat_analyze.main(["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--probe-iters", "10",
                             "--baselines", "random", "--device", "cpu", "--workers", "0"]) == 0
    rep = json.load(open(tmp_path / "run" / "analysis" / "analysis.json"))
    assert len(rep["class_names"]) == 1000 and rep["class_names"][7] == "class 7"
    labels = rep["queries"]["labels"]
    assert len(labels) == len(set(labels)) == min(10, rep["subsample"]["purity_queries"])
    assert rep["figures"] == ["filters.png", "neighbours.png", "tsne.png", "per_class.png", "history.png"]
    for f in rep["figures"]:
        _check_png(tmp_path / "run" / "analysis" / f)
