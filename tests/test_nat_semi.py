"""Semi-supervised NAT (issue 26): the labelled set (balanced, seeded, or named by a file), the label
term and its head, the semi row of the evaluation, an exact resume with labels, and --nat-weight 0."""
import dataclasses
import json
import os

import pytest
import torch
from PIL import Image

from conftest import refused
from nat_ext import train as nat_train
from nat_ext.checkpoint import load_checkpoint
from nat_ext.config import Config, ProbeConfig, SettingError
from nat_ext.data import get_dataset
from nat_ext.labels import balanced_subset, labelled_batches, labelled_from_file

needs_data = pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist")
                                and "NAT_FASHION_MNIST_DIR" not in os.environ,
                                reason="needs `apt-get install dataset-fashion-mnist`")


@pytest.mark.parametrize("seed", [0, 1])
def test_the_labelled_set_is_class_balanced_and_seeded(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((300, 100, 40, 1))])[torch.randperm(441, generator=g)]
    picked = balanced_subset(labels, 0.1, seed)
    assert torch.equal(picked, picked.sort().values) and len(set(picked.tolist())) == len(picked)
    assert torch.bincount(labels[picked], minlength=4).tolist() == [30, 10, 4, 1], f"seed {seed}"
    assert torch.equal(picked, balanced_subset(labels, 0.1, seed))
    assert not torch.equal(picked, balanced_subset(labels, 0.1, seed + 2))
    assert torch.equal(balanced_subset(labels, 1.0, seed), torch.arange(441))


def test_labelled_draws_are_a_function_of_seed_epoch_and_rank():
    labelled = torch.tensor([3, 8, 13, 21])
    a = labelled_batches(labelled, 5, seed=0, epoch=2, steps=3, rank=1)
    assert len(a) == 3 and all(len(b) == 5 and set(b) <= {3, 8, 13, 21} for b in a)
    assert a == labelled_batches(labelled, 5, seed=0, epoch=2, steps=3, rank=1)
    assert a != labelled_batches(labelled, 5, seed=0, epoch=2, steps=3, rank=0)


def test_a_label_file_names_images_of_a_folder(tmp_path):
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / "train" / c)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "train" / c / f"{c}_{i}.JPEG")
    ds, _ = get_dataset(str(tmp_path), "train", augment=False, image_size=8, uint8=True)
    listed = tmp_path / "one_percent.txt"
    listed.write_text("dog_2.JPEG\n\ncat_0.JPEG\n")
    idx = labelled_from_file(ds, str(listed))
    assert sorted(os.path.basename(ds.samples[i][0]) for i in idx.tolist()) == ["cat_0.JPEG", "dog_2.JPEG"]
    listed.write_text("cat_0.JPEG\nbird_1.JPEG\n")
    with pytest.raises(SettingError, match=r"line 2: no image 'bird_1.JPEG'"):
        labelled_from_file(ds, str(listed))
    fmnist = get_dataset("synthetic:64", "train", augment=False, image_size=8, uint8=True)[0]
    with pytest.raises(SettingError, match="--label-file names images of an image folder"):
        labelled_from_file(fmnist, str(listed))


SEMI = ["--limit", "4096", "--batch-size", "256", "--dim", "16", "--epochs", "1", "--eval-limit", "1000",
        "--eval-baselines", "", "--seed", "2"]


@needs_data
def test_one_epoch_with_5_percent_labels_gives_a_head_well_above_chance(tmp_path):
    out = str(tmp_path / "run")
    assert nat_train.main(SEMI + ["--label-fraction", "0.05", "--out", out]) == 0
    ck = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert len(ck["labelled"]) == sum(ck["labelled_per_class"]) and min(ck["labelled_per_class"]) >= 15
    assert set(ck["labels"]) == {"fc.weight", "fc.bias"} and "labels" not in ck["model"]
    report = json.load(open(os.path.join(out, "eval.json")))
    rows = {r["encoder"]: r for r in report["results"]}
    # 10 classes: chance is 0.1; 16 steps of 32 labelled images already give about 0.25
    assert rows["semi"]["linear_top1"] > 0.18 and rows["semi"]["n_labelled"] == len(ck["labelled"]), rows
    assert rows["nat"]["linear_top1"] > 0.4
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert 0 < row["label_acc"] <= 1 and row["label_loss"] > 0


@needs_data
def test_labels_with_rotation_resume_exactly(tmp_path):
    kw = dict(limit=1024, batch_size=128, dim=16, epochs=2, eval=False, label_fraction=0.05, rotation_loss=0.5,
              seed=4)
    ref = nat_train.train(Config(out=str(tmp_path / "ref"), **kw))
    nat_train.train(Config(out=str(tmp_path / "cut"), max_steps=11, **kw))  # 8 steps an epoch: stops mid epoch 2
    done = nat_train.train(Config(out=str(tmp_path / "cut"), **kw))
    a, b = load_checkpoint(ref["checkpoint"]), load_checkpoint(done["checkpoint"])
    for part in ("model", "aux", "labels"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert torch.equal(a["assignment"]["perm"], b["assignment"]["perm"])
    with pytest.raises(SettingError, match="label head"):
        nat_train.train(Config(out=str(tmp_path / "cut"), **dict(kw, label_fraction=0.0, epochs=3)))


@needs_data
def test_nat_weight_0_trains_rotation_alone_and_names_its_rows(tmp_path):
    out = str(tmp_path / "run")
    res = nat_train.train(Config(out=out, limit=1024, batch_size=128, dim=16, epochs=1, nat_weight=0.0,
                                 rotation_loss=1.0, probe=ProbeConfig(limit=600, baselines="")))
    assert [r["encoder"] for r in res["eval"]["results"]] == ["rotation"]
    ck = load_checkpoint(res["checkpoint"])
    assert torch.equal(ck["assignment"]["perm"], torch.randperm(1024, generator=torch.Generator().manual_seed(0)))
    row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert row["changed_frac"] == 0 and row["rotation_acc"] > 0.25


@needs_data
@pytest.mark.parametrize("args, message", [
    (["--nat-weight", "0"], "--nat-weight 0 leaves no term to train"),
    (["--label-fraction", "0.1", "--label-file", "x.txt"], "--label-fraction and --label-file both"),
    (["--label-file", "x.txt"], "--label-file names images of an image folder"),
    (["--objective", "supervised", "--nat-weight", "0.5"], "--nat-weight 0.5 apply to NAT only"),
    (["--nat-weight", "0", "--rotation-loss", "1", "--crops", "1,2"], "local crops regress to NAT's targets"),
])
def test_bad_label_settings_are_refused_before_training(tmp_path, capsys, args, message):
    with refused(capsys, message):
        nat_train.main(["--limit", "128", "--batch-size", "32", "--dim", "16", "--epochs", "1", "--no-eval",
                        "--out", str(tmp_path / "run")] + args)
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_the_supervised_baseline_of_a_labelled_run_trains_on_its_labels_alone_as_long():
    from nat_ext.supervised import supervised_config
    run = dataclasses.asdict(Config(label_fraction=0.01, epochs=30, rotation_loss=1.0, nat_weight=0.0))
    cfg = supervised_config(run, out="/tmp/s", epochs=5)
    assert (cfg.objective, cfg.label_fraction, cfg.epochs, cfg.rotation_loss, cfg.nat_weight) == \
        ("supervised", 0.01, 30, 0.0, 1.0)
    assert supervised_config(dataclasses.asdict(Config(epochs=30)), out="/tmp/s", epochs=5).epochs == 5


@needs_data
def test_a_labelled_run_reports_the_probes_fit_on_its_labels_and_a_labels_only_supervised_model(tmp_path):
    out = str(tmp_path / "run")
    assert nat_train.main(["--limit", "2048", "--batch-size", "128", "--dim", "16", "--epochs", "1",
                           "--label-fraction", "0.05", "--eval-limit", "2048", "--eval-baselines", "supervised",
                           "--eval-probe-iters", "50", "--seed", "1", "--out", out]) == 0
    rows = {r["encoder"]: r for r in json.load(open(os.path.join(out, "eval.json")))["results"]}
    assert {"semi", "nat", "nat@labelled", "supervised", "supervised@labelled"} <= set(rows)
    assert rows["nat@labelled"]["n_train"] == rows["semi"]["n_labelled"] < rows["nat"]["n_train"]
    sup = load_checkpoint(str(tmp_path / "run" / "supervised" / "checkpoint.pt"))
    assert sup["config"]["label_fraction"] == 0.05 and sup["global_step"] == 2048 // 128  # the NAT run's steps


@needs_data
def test_nat_eval_fits_the_probe_on_the_labelled_share_a_labelled_run_would_have(tmp_path):
    from nat_ext import eval as nat_eval
    from nat_ext.labels import labelled_set
    out = str(tmp_path / "run")
    nat_train.train(Config(out=out, limit=1024, batch_size=128, dim=16, epochs=1, eval=False, seed=3))
    assert nat_eval.main(["--checkpoint", os.path.join(out, "checkpoint.pt"), "--limit", "1024", "--baselines", "",
                          "--label-fraction", "0.05", "--probe-iters", "50", "--out", str(tmp_path / "e.json")]) == 0
    rows = {r["encoder"]: r for r in json.load(open(tmp_path / "e.json"))["results"]}
    same = labelled_set(get_dataset("fashion-mnist", "train", augment=False, limit=1024, seed=3)[0], 0.05, "", 3)
    assert rows["nat@labelled"]["n_train"] == len(same) == rows["nat@labelled"]["knn_bank"] < rows["nat"]["n_train"]
