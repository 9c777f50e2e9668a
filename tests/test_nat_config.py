"""Settings: one dataclass field per setting builds the CLI; old flags parse as before; the
supervised baseline takes the evaluated run's whole config."""
import dataclasses

import pytest

from nat_ext.config import (Config, EvalConfig, ProbeConfig, build_parser, check_choices,
                            config_from_dict, parse_config, to_argv)
from nat_ext.supervised import supervised_config


def _leaves(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            yield from _leaves(f.default_factory, prefix + f.name + ".")
        else:
            yield prefix + f.name, f


@pytest.mark.parametrize("cls", [Config, EvalConfig])
def test_every_setting_has_help_and_an_option(cls):
    parser = build_parser(cls, "x", "")
    dests = {a.dest for a in parser._actions}
    for name, f in _leaves(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{name} has no help text"
        assert name in dests, f"{cls.__name__}.{name} has no command-line option"


def test_old_training_flags_parse_as_before():
    cfg = parse_config(Config, [
        "--data", "/x", "--arch", "resnet18", "--dim", "8", "--epochs", "3", "--batch-size", "7",
        "--lr", "0.5", "--momentum", "0", "--weight-decay", "0", "--schedule", "constant",
        "--reassign-every", "0", "--objective", "supervised", "--workers", "2", "--device", "cpu", "--amp",
        "--out", "o", "--resume", "--seed", "4", "--limit", "99", "--image-size", "32", "--sobel",
        "--targets-from-seed", "--skip-corrupt", "--no-eval", "--eval-layer", "conv3", "--eval-grid", "1",
        "--eval-limit", "600", "--eval-baselines", "random"])
    assert cfg == Config(data="/x", arch="resnet18", dim=8, epochs=3, batch_size=7, lr=0.5, momentum=0.0,
                         weight_decay=0.0, schedule="constant", reassign_every=0, objective="supervised",
                         workers=2, device="cpu", amp=True, out="o", resume=True, seed=4, limit=99,
                         image_size=32, sobel=True, targets_from_seed=True, skip_corrupt=True, eval=False,
                         probe=ProbeConfig(layer="conv3", grid=1, limit=600, baselines="random"))
    with pytest.raises(SystemExit):
        parse_config(Config, ["--arch", "vgg"])


def test_old_eval_flags_parse_as_before():
    ecfg = parse_config(EvalConfig, [
        "--checkpoint", "c.pt", "--data", "d", "--arch", "convnet", "--dim", "5", "--layer", "conv2",
        "--grid", "3", "--limit", "10", "--baselines", "", "--supervised-epochs", "2", "--knn-k", "5",
        "--probe-iters", "7", "--probe-wd", "0.1", "--batch-size", "9", "--device", "cpu", "--workers", "1",
        "--seed", "2", "--skip-corrupt", "--out", "e.json"])
    assert ecfg == EvalConfig(checkpoint="c.pt", data="d", arch="convnet", dim=5, device="cpu", workers=1,
                              seed=2, skip_corrupt=True, out="e.json",
                              probe=ProbeConfig(layer="conv2", grid=3, limit=10, baselines="",
                                                supervised_epochs=2, knn_k=5, probe_iters=7, probe_wd=0.1,
                                                batch_size=9))


def test_to_argv_parses_back_to_the_same_config():
    cfg = Config(lr=0.003, amp=True, eval=False, image_size=48, target_generator="philox",
                 probe=ProbeConfig(layer="conv2", probe_wd=0.25, baselines=""))
    assert parse_config(Config, to_argv(cfg)) == cfg
    assert to_argv(Config()) == []


def test_check_choices_names_the_setting():
    with pytest.raises(ValueError, match="arch should be one of"):
        check_choices(Config(arch="vgg"))
    with pytest.raises(ValueError, match="target_generator"):
        check_choices(Config(target_generator="mt"))
    check_choices(Config())


def test_supervised_baseline_takes_the_runs_whole_config():
    # A checkpoint's config dict, as written before the probe settings were composed (flat eval_*
    # keys, no target_generator) plus the run facts train() adds.
    run = dict(dataclasses.asdict(Config(data="/imgs", image_size=64, skip_corrupt=True, limit=300, sobel=True,
                                         arch="resnet18", batch_size=32, lr=0.05, seed=3)),
               n_images=300, in_channels=3, num_classes=2, world_size=1, eval_layer="layer3")
    del run["probe"], run["target_generator"]
    sup = supervised_config(run, out="/tmp/s", epochs=2, device="cpu")
    assert (sup.objective, sup.epochs, sup.out, sup.eval, sup.resume) == ("supervised", 2, "/tmp/s", False, False)
    for k in ("data", "image_size", "skip_corrupt", "limit", "sobel", "arch", "batch_size", "lr", "seed"):
        assert getattr(sup, k) == run[k], k
    argv = to_argv(sup)
    assert "--image-size" in argv and "--skip-corrupt" in argv and "--no-eval" in argv
    assert config_from_dict(Config, {"probe": {"grid": 3}}).probe.grid == 3
