"""Settings: one dataclass field per setting builds the CLI; old flags parse as before; the
supervised baseline takes the evaluated run's whole config."""
import dataclasses

import pytest

from nat_ext.config import (Config, EvalConfig, ProbeConfig, SettingError, build_parser, config_from_dict,
                            parse_config, to_argv, validate)
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


def test_validate_names_the_setting_of_a_config_built_in_code():
    with pytest.raises(SettingError, match="--arch should be one of"):
        validate(Config(arch="vgg"))
    with pytest.raises(SettingError, match="--target-generator"):
        validate(Config(target_generator="mt"))
    with pytest.raises(SettingError, match=r"--eval-batch-size should be a positive integer, got 0"):
        validate(Config(probe=ProbeConfig(batch_size=0)))
    with pytest.raises(SettingError, match=r"--batch-size should be of type int, got '5'"):
        validate(Config(batch_size="5"))
    with pytest.raises(SettingError, match=r"--lr should be a finite number > 0, got inf"):
        validate(Config(lr=float("inf")))
    validate(Config())
    validate(EvalConfig())


# Every out-of-range value of every numeric or checked option of both CLIs: (cli, option, bad values).
BAD = {
    Config: {"--dim": ["0", "-3"], "--epochs": ["0", "-2"], "--batch-size": ["0", "-5"],
             "--lr": ["0", "-1", "nan", "inf"], "--momentum": ["-0.1", "1", "nan"],
             "--weight-decay": ["-1e-5", "nan"], "--reassign-every": ["-1"], "--num-prototypes": ["0"],
             "--target-spread": ["-0.5", "inf"], "--sinkhorn-eps": ["0", "-1", "nan"], "--sinkhorn-iters": ["0"],
             "--rotation-loss": ["-1", "nan"], "--rotation-fraction": ["0", "1.5", "nan"],
             "--koleo": ["-1", "inf"], "--label-fraction": ["-0.01", "1.5", "nan"],
             "--label-loss": ["0", "-1", "nan"], "--label-batch": ["0"], "--nat-weight": ["-1", "nan"], "--crops": ["2", "3,1", "1,-1", "a,b"], "--workers": ["-7", "-2"],
             "--device": ["gpu", "cuda:x", "mps"], "--max-steps": ["-1"], "--dist-timeout": ["0", "-1"],
             "--dataset-solve-budget": ["-1", "-1e-9", "nan", "inf"], "--extract-batch-size": ["0", "-4"],
             "--seed": ["-1"], "--limit": ["-3"], "--warmup-epochs": ["-1"], "--loader-timeout": ["-5"],
             "--solver-fault-share": ["-0.1", "1.5", "nan"], "--image-size": ["0"], "--log-every": ["-1"],
             "--data": ["synthetic:0", "synthetic:-4", "synthetic:x", ""], "--out": [""],
             "--eval-grid": ["-1"], "--eval-limit": ["-1"], "--eval-supervised-epochs": ["0"],
             "--eval-probe-epochs": ["0"], "--eval-probe-lr": ["0", "nan"], "--eval-max-steps": ["-1"],
             "--eval-knn-k": ["-1"], "--eval-knn-bank": ["0"], "--eval-probe-iters": ["0"],
             "--eval-probe-wd": ["-1", "nan"], "--eval-batch-size": ["0"], "--eval-probe-batch": ["0", "-2"],
             "--eval-label-fraction": ["-0.5", "2", "nan"], "--eval-baselines": ["random,gan"]},
    EvalConfig: {"--dim": ["-1"], "--workers": ["-2"], "--seed": ["-2"], "--device": ["tpu"],
                 "--data": ["synthetic:0"], "--batch-size": ["0"], "--knn-bank": ["-1"], "--probe-lr": ["-0.5"],
                 "--baselines": ["pixel"]},
}
# nat-eval takes the probe settings that nat-train offers as --eval-*: the same bad values
BAD[EvalConfig].update({"--" + k[len("--eval-"):]: v for k, v in BAD[Config].items() if k.startswith("--eval-")})
# The documented sentinels and edge values stay valid.
GOOD = {Config: [["--workers", "-1"], ["--max-steps", "0"], ["--limit", "0"], ["--reassign-every", "0"],
                 ["--koleo", "0"], ["--rotation-fraction", "1"], ["--momentum", "0"], ["--weight-decay=0"], ["--crops", "2,4"],
                 ["--device", "cuda:1"], ["--eval-knn-k", "0"], ["--eval-baselines", ""], ["--data", "/some/dir"],
                 ["--dataset-solve-budget", "0"], ["--dataset-solve-budget", "1e-6"], ["--extract-batch-size", "1"],
                 ["--shard-dtype", "bfloat16"]],
        EvalConfig: [["--seed", "-1"], ["--dim", "0"], ["--workers", "-1"], ["--data", ""]]}


def _bad_cases():
    for cls, table in BAD.items():
        for opt, values in table.items():
            for value in values:
                yield pytest.param(cls, opt, value, id=f"{cls.__name__}{opt}={value}")


@pytest.mark.parametrize("cls,opt,value", list(_bad_cases()))
def test_every_bad_value_is_refused_in_argparse_form(cls, opt, value, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(cls, [f"{opt}={value}"], "prog")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"prog: error: {opt} should be" in err and "got " in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("cls", [Config, EvalConfig])
def test_every_checked_option_has_a_bad_value_in_the_table(cls):
    """A new numeric option without a rule, or a rule without a test, fails here."""
    from nat_ext.config import _fields
    tested = set(BAD[cls])
    for opt, _, f, typ in _fields(cls):
        if typ in (int, float):
            assert "check" in f.metadata or "choices" in f.metadata, f"--{opt} has no rule"
        if "check" in f.metadata:
            aliases = {f"--{opt[:len(opt) - len(f.name)]}{a}" for a in f.metadata.get("aliases", ())}
            assert f"--{opt}" in tested or aliases & tested, f"--{opt} has a rule but no bad value in BAD"


@pytest.mark.parametrize("cls", [Config, EvalConfig])
def test_defaults_and_sentinels_stay_valid(cls):
    for argv in GOOD[cls]:
        parse_config(cls, argv, "prog")


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


def test_the_dataset_solve_settings():
    cfg = parse_config(Config, ["--dataset-solve-budget", "90", "--extract-batch-size", "64", "--shard-dtype", "bfloat16"])
    assert (cfg.dataset_solve_budget, cfg.extract_batch_size, cfg.gather_dtype) == (90.0, 64, "bfloat16")
    # the extraction's batch is its own setting: the probe's stays as it was
    assert cfg.probe.batch_size == ProbeConfig().batch_size and Config().dataset_solve_budget == 0
    assert parse_config(Config, ["--gather-dtype", "bfloat16"]).gather_dtype == "bfloat16"  # the old name
    assert parse_config(Config, to_argv(cfg)) == cfg
