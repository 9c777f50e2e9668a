"""Settings of the training and evaluation jobs, and the CLIs built from them.

Each setting is written once, as a dataclass field whose metadata holds its help
text (and choices): :func:`build_parser` turns the fields into argparse options
(``batch_size`` -> ``--batch-size``; a bool -> ``--NAME`` and ``--no-NAME``; a nested dataclass -> its fields under a
prefix), :func:`parse_config` turns the parsed options back into the dataclass,
and :func:`to_argv` writes a config as the command line that parses back to it.

The probe settings (:class:`ProbeConfig`) are composed into both jobs: ``nat-train``
offers them as ``--eval-*`` for the evaluation that follows training, ``nat-eval``
offers them unprefixed.

This module also holds :func:`progress`, the console progress helper both jobs use.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from tqdm import tqdm

from .models import ARCHS
from .targets import KINDS as TARGET_KINDS

__all__ = ["ProbeConfig", "Config", "EvalConfig", "setting", "build_parser", "parse_config",
           "to_argv", "config_from_dict", "validate", "SettingError", "Rule", "refuse", "progress", "TARGET_GENERATORS",
           "REASSIGN_SCOPES", "TARGET_KINDS", "ALIGNS", "AMP_DTYPES", "LR_SCALES", "GATHER_DTYPES", "PROBE_METHODS"]

TARGET_GENERATORS = ("auto", "philox", "pcg64")
REASSIGN_SCOPES = ("batch", "dataset")
ALIGNS = ("exact", "sinkhorn")
AMP_DTYPES = ("bf16", "fp16")
LR_SCALES = ("none", "linear")
GATHER_DTYPES = ("float32", "bfloat16")
PROBE_METHODS = ("auto", "lbfgs", "sgd")


class SettingError(ValueError):
    """A setting that cannot run; the CLIs print it in argparse's form (``prog: error: ...``, exit 2)."""


class Rule:
    """The valid values of a numeric setting: ``ok(value)``, and ``what`` for the message."""

    def __init__(self, what: str, ok) -> None:
        self.what, self.ok = what, ok


def _finite(v) -> bool:
    return math.isfinite(v)


POSITIVE_INT = Rule("a positive integer", lambda v: v >= 1)
COUNT = Rule("an integer >= 0", lambda v: v >= 0)
POSITIVE = Rule("a finite number > 0", lambda v: _finite(v) and v > 0)
NON_NEGATIVE = Rule("a finite number >= 0", lambda v: _finite(v) and v >= 0)
FRACTION = Rule("a number in (0, 1]", lambda v: _finite(v) and 0 < v <= 1)
SHARE = Rule("a number in [0, 1]", lambda v: _finite(v) and 0 <= v <= 1)
FRACTION_OR_NONE = Rule("a number in (0, 1], or 0 for none", lambda v: _finite(v) and 0 <= v <= 1)
MOMENTUM = Rule("a number in [0, 1)", lambda v: _finite(v) and 0 <= v < 1)


def at_least(lo: int, sentinel: str) -> Rule:
    """Integers >= ``lo``, where the values below 0 (or 0) are the documented sentinel ``sentinel``."""
    return Rule(f"an integer >= {lo} ({sentinel})", lambda v: v >= lo)


BASELINES = ("random", "pixels", "supervised")


def parse_crops(crops: str) -> tuple[int, int]:
    """``--crops G,L`` as ``(G, L)``: G global views (1 or 2, the choices of ``--views``), L >= 0 local crops.

    Raises:
        SettingError: naming ``--crops``, for anything else.
    """
    try:
        g, l = (int(p) for p in crops.split(","))
    except ValueError:
        raise SettingError(f"--crops should be G,L (two integers: global views, local crops), got {crops!r}") from None
    if g not in (1, 2) or l < 0:
        raise SettingError(f"--crops G,L should have G in (1, 2) (the --views choices) and L >= 0, got {crops!r}")
    return g, l


def _parses(parse, value: str) -> bool:
    try:
        parse(value)
    except (ValueError, RuntimeError):
        return False
    return True


def _data_ok(value: str) -> bool:
    if value.startswith("synthetic:"):
        count = value[len("synthetic:"):]
        return count.isdigit() and int(count) >= 1
    return bool(value)


def _device_ok(value: str) -> bool:
    return value == "auto" or (_parses(torch.device, value) and torch.device(value).type in ("cpu", "cuda"))


DATA = Rule("'fashion-mnist', 'synthetic:N' with N >= 1, or an image folder", _data_ok)
DATA_OR_CHECKPOINTS = Rule("'', 'fashion-mnist', 'synthetic:N' with N >= 1, or an image folder",
                           lambda v: v == "" or _data_ok(v))
CROPS = Rule("'' or G,L (G in 1, 2 global views, L >= 0 local crops)", lambda v: v == "" or _parses(parse_crops, v))
BASELINE_LIST = Rule(f"a comma list of {','.join(BASELINES)} ('' for none)",
                     lambda v: all(b in BASELINES for b in v.split(",") if b))
DEVICE = Rule("auto, cpu, cuda or cuda:N", _device_ok)
FOLDER = Rule("a folder name (not empty)", bool)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
            prefix: str | None = None, default_factory: Any = dataclasses.MISSING,
            aliases: tuple[str, ...] = (), check: Rule | None = None) -> Any:
    """A dataclass field with its CLI help (and choices, other option names, or a flag prefix for a
    nested config) and, for numbers, the :class:`Rule` its values must meet (:func:`validate`)."""
    meta = {"help": help, "aliases": tuple(aliases)}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if prefix is not None:
        meta["prefix"] = prefix
    if check is not None:
        meta["check"] = check
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ProbeConfig:
    """How a frozen encoder is probed (linear probe and k-NN) and against which baselines."""
    layer: str = setting("", "stage(s) to probe: a name, a comma list, or 'all' (every conv stage: convnet "
                             "conv1-conv4, alexnet conv1-conv5, resnets layer1-layer4); default: the last conv "
                             "stage", aliases=("layers",))
    grid: int = setting(0, "pool feature maps to grid x grid; 0: 2 x 2 on inputs of at most 64 px, else the grid "
                           "giving each layer about 9k features (the paper's protocol)", check=COUNT)
    limit: int = setting(0, "probe on seeded subsets of this many labelled images (0: all)", check=COUNT)
    baselines: str = setting("random,pixels", "comma list of random,pixels,supervised ('' for none); pixels is "
                                              "skipped on inputs larger than 64 px", check=BASELINE_LIST)
    supervised_epochs: int = setting(10, "epochs of the supervised baseline when it is trained here", check=POSITIVE_INT)
    supervised_checkpoint: str = setting("", "the supervised baseline's checkpoint (a nat-train --objective "
                                             "supervised run of the same arch) instead of training one")
    probe_method: str = setting("auto", "linear probe: lbfgs (full batch on held features, small data), sgd "
                                        "(linear heads on every probed layer trained together on streamed "
                                        "batches, any n, every rank sharing the work), auto (lbfgs up to "
                                        "100,000 training images, else sgd)", choices=PROBE_METHODS)
    probe_epochs: int = setting(10, "sgd probe: epochs over the training images", check=POSITIVE_INT)
    probe_lr: float = setting(0.5, "sgd probe: learning rate of a head on 256 features (a head on F features "
                                   "takes lr x 256 / F), cosine to 0, for the global batch", check=POSITIVE)
    max_steps: int = setting(0, "sgd probe: stop after this many probe steps in all (0: every epoch)", check=COUNT)
    knn_k: int = setting(20, "neighbours of the k-NN classifier (0: no k-NN)", check=COUNT)
    knn_bank: int = setting(100_000, "k-NN bank: at most this many training images (a seeded subset; all when "
                                     "fewer), fewer if their float16 2x2-pooled features of every probed layer "
                                     "would pass 1 GiB; also the images of the sgd probe's standardisation", check=POSITIVE_INT)
    probe_iters: int = setting(300, "L-BFGS iterations of the linear probe", check=POSITIVE_INT)
    probe_wd: float = setting(1e-4, "L2 penalty of the linear probe", check=NON_NEGATIVE)
    batch_size: int = setting(512, "images per forward pass, per process", check=POSITIVE_INT)
    probe_batch: int = setting(512, "sgd probe: images per step over all processes (the global batch: each "
                                    "rank takes its share, in forward passes of at most the batch size above), "
                                    "so the steps and the result do not depend on the process count",
                               check=POSITIVE_INT)
    label_fraction: float = setting(0.0, "also fit the probes on a seeded, class-balanced share of the training "
                                         "images only (the 1%% / 10%% linear evaluation; the same images as a "
                                         "nat-train --label-fraction run of the same seed); a checkpoint trained "
                                         "with labels uses its own labelled images; 0: no such rows",
                                    check=FRACTION_OR_NONE)
    val_labels: str = setting("", "label file of a flat DIR/val (ImageNet's devkit "
                                  "ILSVRC2012_validation_ground_truth.txt, with its meta.mat next to it, "
                                  "or a filename,label CSV)")


@dataclass
class Config:
    """Settings of a training run (plain values only: they go into the checkpoint)."""
    data: str = setting("fashion-mnist", "'fashion-mnist', 'synthetic:N' (N ImageNet-shaped images made on the "
                                         "fly) or an ImageFolder path (DIR/train, DIR/val)", check=DATA)
    arch: str = setting("convnet", "encoder architecture", choices=ARCHS)
    dim: int = setting(64, "target dimension d", check=POSITIVE_INT)
    epochs: int = setting(10, "training epochs", check=POSITIVE_INT)
    batch_size: int = setting(256, "images per step, per process", check=POSITIVE_INT)
    lr: float = setting(0.01, "SGD learning rate", check=POSITIVE)
    momentum: float = setting(0.9, "SGD momentum", check=MOMENTUM)
    weight_decay: float = setting(1e-5, "SGD weight decay", check=NON_NEGATIVE)
    schedule: str = setting("cosine", "learning-rate schedule", choices=("cosine", "constant"))
    reassign_every: int = setting(3, "reassign targets on epochs 0, k, 2k...; 0 freezes the initial "
                                     "random assignment (the ablation)", check=COUNT)
    reassign_scope: str = setting("batch", "what a reassigning epoch re-solves: batch (the paper's: each "
                                           "batch's images swap their targets, every step) or dataset (once, "
                                           "at the epoch start: the exact assignment of the whole training set, "
                                           "solved by every rank together on its shard of features extracted "
                                           "in eval mode, unaugmented; the epoch then trains against those "
                                           "targets)",
                                  choices=REASSIGN_SCOPES)
    targets: str = setting("sphere", "target distribution: sphere (uniform on the unit sphere, the paper's), "
                                     "onehot (the k one-hot vectors e_0..e_k-1 of R^dim, each held by n/k images: "
                                     "the exact assignment becomes balanced clustering; k <= dim, k divides n), "
                                     "clustered (around k random centres on the sphere: "
                                     "normalize(centre + spread * u), u uniform on the sphere)",
                           choices=TARGET_KINDS)
    num_prototypes: int = setting(50, "k of --targets onehot and clustered", check=POSITIVE_INT)
    target_spread: float = setting(0.5, "--targets clustered: spread around the centre (cosine to it about "
                                        "1/sqrt(1 + spread^2))", check=NON_NEGATIVE)
    align: str = setting("exact", "how a batch's images share the targets they hold on reassigning steps: exact "
                                  "(the optimal permutation, the paper's) or sinkhorn (entropy-regularised transport "
                                  "plan with equal marginals; the loss is taken against the plan-weighted targets, "
                                  "the held permutation becomes the plan rounded to the nearest permutation)",
                         choices=ALIGNS)
    sinkhorn_eps: float = setting(0.02, "--align sinkhorn: entropy weight, in units of the feature-target cosine", check=POSITIVE)
    sinkhorn_iters: int = setting(50, "--align sinkhorn: Sinkhorn-Knopp iterations per batch", check=POSITIVE_INT)
    views: int = setting(1, "augmented views of each image per step; 2: on reassigning steps the alignment is "
                            "solved on each view's features and the loss taken on the other view (both ways, "
                            "averaged), and the held permutation follows the solve on both views' summed scores",
                         choices=(1, 2))
    rotation_loss: float = setting(0.0, "weight W of a rotation-prediction loss (MMDC): a copy of each batch's "
                                        "first view, image i rotated by (i mod 4) x 90 degrees, goes through the "
                                        "encoder to its last conv stage, globally pooled, and a linear 4-way head "
                                        "predicts the rotation; W x its cross-entropy is added to the loss. The "
                                        "head is saved under the checkpoint's 'aux' key (0: no head, nothing "
                                        "computed)", check=NON_NEGATIVE)
    rotation_fraction: float = setting(1.0, "--rotation-loss: share of each batch whose rotated copy is made, in "
                                            "(0, 1]", check=FRACTION)
    koleo: float = setting(0.0, "weight W of the KoLeo regulariser (DINOv2): -mean_i log(min_j ||f_i - f_j||) over "
                                "each view's normalised outputs, per process (0: not computed)", check=NON_NEGATIVE)
    label_fraction: float = setting(0.0, "semi-supervised NAT: share of the training images (after --limit) whose "
                                         "labels the run uses, a seeded class-balanced subset, in (0, 1]; 0: none "
                                         "(the paper's NAT)", check=FRACTION_OR_NONE)
    label_file: str = setting("", "semi-supervised NAT on an image folder: the labelled images, one file name per "
                                  "line (e.g. the published ImageNet 1%% / 10%% lists), instead of --label-fraction")
    label_loss: float = setting(1.0, "with labels: weight W of the cross-entropy of a linear classifier head on "
                                     "the pooled last conv stage, on --label-batch labelled images drawn into every "
                                     "step; the head learns at 10 x the encoder's lr and is saved under the "
                                     "checkpoint's 'labels' key", check=POSITIVE)
    label_batch: int = setting(32, "with labels: labelled images drawn (with replacement) into every step, per "
                                   "process", check=POSITIVE_INT)
    nat_weight: float = setting(1.0, "weight of NAT's own term; 0 turns it off and trains the other terms alone "
                                     "(e.g. --rotation-loss 1: rotation prediction alone)", check=NON_NEGATIVE)
    crops: str = setting("", "G,L: G global views (as --views G) and L local crops per image, side "
                             "round(0.43 x the global side) (SwAV's 96/224; 12 px on Fashion-MNIST), cropped on "
                             "the device; local crops regress to the targets the global views' alignment leaves "
                             "their image holding and never reassign. '' means --views V, 0 local crops; --crops "
                             "wins over the default --views 1, another --views is refused", check=CROPS)
    track_objective: bool = setting(False, "after each reassigning epoch, extract the whole training set "
                                           "(eval mode, unaugmented) and record sum_i f_i . t_P(i) in "
                                           "metrics.jsonl as objective_end (not counted in the epoch's time; "
                                           "a pass over every image: off by default since issue 17)")
    objective: str = setting("nat", "nat, or supervised: the baseline encoder, cross-entropy on the labels",
                             choices=("nat", "supervised"))
    workers: int = setting(-1, "DataLoader worker processes of the run's one loader (persistent); -1: "
                               "min(16, cpus per rank - 1), 0 below 2 cpus a rank, and 0 for in-memory data "
                               "(Fashion-MNIST), which the device augments", check=at_least(-1, "-1: automatic"))
    device: str = setting("auto", "auto, cpu, cuda, cuda:1...", check=DEVICE)
    amp: bool = setting(False, "mixed precision: autocast in --amp-dtype")
    amp_dtype: str = setting("bf16", "autocast dtype of --amp: bf16 (no loss scaler, no host sync per step; CPU "
                                     "and CUDA) or fp16 (with a GradScaler)", choices=AMP_DTYPES)
    channels_last: bool = setting(False, "channels_last memory format for the encoder and its inputs (faster "
                                         "convolutions on GPUs with tensor cores)")
    compile: bool = setting(False, "torch.compile the encoder's forward (the checkpoint keeps the plain "
                                   "module's weights)")
    cudnn_benchmark: bool = setting(False, "CUDA: torch.backends.cudnn.benchmark (fastest convolution "
                                           "algorithms for fixed shapes; not bit-reproducible across runs)")
    max_steps: int = setting(0, "stop after this many optimizer steps in all, counted across resumes, with a "
                                "checkpoint (0: run every epoch); --resume --max-steps K+2 then runs two more", check=COUNT)
    lr_scale: str = setting("none", "none, or linear: lr x batch_size x processes / 256 (the global batch)",
                            choices=LR_SCALES)
    dist_timeout: int = setting(120, "process-group timeout in minutes: each collective waits at most this "
                                     "long (the dataset-wide solve does not count against it: while rank 0 "
                                     "solves the sparse problem the others poll the process group's store, "
                                     "not a collective)", check=POSITIVE_INT)
    gather_dtype: str = setting("float32", "--reassign-scope dataset: dtype in which each rank holds its own shard "
                                           "of the extracted features (n / processes rows; bfloat16 halves it). "
                                           "Nothing is gathered any more: the name is kept from when the shards "
                                           "went to rank 0", choices=GATHER_DTYPES, aliases=("shard-dtype",))
    dataset_solve_budget: float = setting(0.0, "--reassign-scope dataset: seconds the exact solve may take "
                                               "(counted from its start, after the extraction; the solver checks "
                                               "the deadline itself); past it the epoch falls back to batch-scope "
                                               "reassignment with a warning and dataset_solve 'budget' in "
                                               "metrics.jsonl. 0: no budget", check=NON_NEGATIVE)
    extract_batch_size: int = setting(512, "images per forward pass, per process, of the passes over the whole "
                                           "training set (--reassign-scope dataset's extraction, "
                                           "--track-objective)", check=POSITIVE_INT)
    out: str = setting("runs/nat", "output folder", check=FOLDER)
    resume: bool = setting(True, "continue from OUT/checkpoint.pt when present (so the same command, e.g. a "
                                 "requeued job, continues the run; a finished run prints its evaluation); "
                                 "--no-resume starts afresh after moving the old run's files to "
                                 "OUT/previous-<time>/")
    warmup_epochs: int = setting(0, "linear warmup of the learning rate over the first E epochs (step s of W "
                                    "takes lr x (s + 1) / W), then the schedule over the remaining steps",
                                 check=COUNT)
    loader_timeout: int = setting(300, "seconds the training loader may take for one batch before the run stops "
                                       "with an error naming the rank and the step (a stuck read); loaders with "
                                       "workers only (torch has no timeout without them); 0: no limit",
                                  check=COUNT)
    solver_fault_share: float = setting(0.01, "share of an epoch's batch solves that may fault in the solver "
                                              "(status 3 or 4, a bug) before --on-solver-faults acts",
                                        check=SHARE)
    on_solver_faults: str = setting("cpu", "past --solver-fault-share: cpu (the following epochs solve on the "
                                           "CPU, said in the log and in metrics.jsonl) or stop (exit with an "
                                           "error, the epoch's checkpoint kept)", choices=("cpu", "stop"))
    seed: int = setting(0, "seed of the model init, targets, initial assignment, data order, augmentation", check=COUNT)
    limit: int = setting(0, "train on a seeded subset of this many images (0: all)", check=COUNT)
    image_size: int = setting(224, "crop size for ImageFolder data", check=POSITIVE_INT)
    sobel: bool = setting(False, "fixed Sobel front end")
    targets_from_seed: bool = setting(False, "regenerate the batch's target rows from (seed, index) on the "
                                             "device instead of storing the n x d matrix")
    target_generator: str = setting("auto", "generator of the targets: philox (counter-based, runs on the "
                                            "device), pcg64 (numpy on the CPU, every run before it); auto: "
                                            "philox with --targets-from-seed, else pcg64",
                                    choices=TARGET_GENERATORS)
    skip_corrupt: bool = setting(False, "skip and count unreadable images")
    log_every: int = setting(50, "read the loss from the device every N steps: the progress bar on a "
                                 "terminal, a progress line in a redirected log (0: once per epoch)", check=COUNT)
    sync_debug: bool = setting(False, "CUDA: raise on any host sync inside the training step "
                                      "(torch.cuda.set_sync_debug_mode('error'))")
    eval: bool = setting(True, "linear probe + k-NN after training (rank 0)")
    probe: ProbeConfig = setting(help="evaluation after training", prefix="eval-",
                                 default_factory=ProbeConfig)


@dataclass
class EvalConfig:
    """Settings of an evaluation (plain values)."""
    checkpoint: str = setting("", "checkpoint.pt from nat-train; empty: baselines only (give data, arch, dim)")
    data: str = setting("", "default: the checkpoint's", check=DATA_OR_CHECKPOINTS)
    arch: str = setting("", "default: the checkpoint's")
    dim: int = setting(0, "default: the checkpoint's", check=at_least(0, "0: the checkpoint's"))
    device: str = setting("auto", "auto, cpu, cuda, cuda:1...", check=DEVICE)
    workers: int = setting(-1, "DataLoader worker processes; -1: as nat-train's (none for in-memory data)", check=at_least(-1, "-1: as nat-train's"))
    seed: int = setting(-1, "default: the checkpoint's", check=at_least(-1, "-1: the checkpoint's"))
    skip_corrupt: bool = setting(False, "skip unreadable images")
    out: str = setting("", "write the results JSON here")
    probe: ProbeConfig = setting(help="probe settings", prefix="", default_factory=ProbeConfig)


def _fields(cls: type, prefix: str = "", path: str = ""):
    """(option name, dest, field, type) for every leaf field of ``cls``, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from _fields(typ, prefix + f.metadata.get("prefix", f.name + "-"), path + f.name + ".")
        else:
            yield prefix + f.name.replace("_", "-"), path + f.name, f, typ


def _aliases(f, prefix_of_opt: str) -> list[str]:
    return [f"--{prefix_of_opt}{a}" for a in f.metadata.get("aliases", ())]


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one option per leaf field of the dataclass ``cls``.

    Args:
        cls: a config dataclass (:class:`Config`, :class:`EvalConfig`).
        prog, description: for ``--help``.

    Returns:
        The parser; :func:`parse_config` turns its result into ``cls``.
    """
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = cls()
    for opt, dest, f, typ in _fields(cls):
        default = _get(defaults, dest)
        helptext = f.metadata.get("help", "")
        if typ is bool:  # --NAME and --no-NAME both, so a flag stays valid when its default changes
            p.add_argument(f"--{opt}", dest=dest, action=argparse.BooleanOptionalAction, default=default,
                           help=helptext)
        else:
            prefix = opt[:len(opt) - len(f.name)]  # "eval-" for the probe settings of nat-train
            p.add_argument(f"--{opt}", *_aliases(f, prefix), dest=dest, type=typ, default=default,
                           help=helptext, choices=f.metadata.get("choices"),
                           metavar=opt.upper().replace("-", "_"))
    return p


def _get(obj: Any, dest: str) -> Any:
    for part in dest.split("."):
        obj = getattr(obj, part)
    return obj


def config_from_dict(cls: type, values: dict) -> Any:
    """Build ``cls`` from a (nested) dict, ignoring unknown keys: a checkpoint's config written
    by another version loads with this version's defaults for what it lacks."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        kw[f.name] = config_from_dict(hints[f.name], v) if dataclasses.is_dataclass(hints[f.name]) else v
    return cls(**kw)


def parse_config(cls: type, args: argparse.Namespace | list[str] | None, prog: str = "",
                 description: str = "") -> Any:
    """Parse a command line (or an already parsed namespace) into the dataclass ``cls``."""
    parser = None
    if not isinstance(args, argparse.Namespace):
        parser = build_parser(cls, prog or cls.__name__, description)
        args = parser.parse_args(args)
    nested: dict = {}
    for _, dest, _, _ in _fields(cls):
        *parents, leaf = dest.split(".")
        d = nested
        for part in parents:
            d = d.setdefault(part, {})
        d[leaf] = getattr(args, dest)
    cfg = config_from_dict(cls, nested)
    if parser is not None:  # every bad value refused before any work, in argparse's form
        try:
            validate(cfg)
        except SettingError as e:
            parser.error(str(e))
    return cfg


def to_argv(cfg: Any) -> list[str]:
    """The command line that :func:`parse_config` parses back to ``cfg`` (defaults left out)."""
    defaults = type(cfg)()
    argv = []
    for opt, dest, _, typ in _fields(type(cfg)):
        value, default = _get(cfg, dest), _get(defaults, dest)
        if value == default:
            continue
        if typ is bool:
            argv.append(f"--no-{opt}" if default else f"--{opt}")
        else:
            argv += [f"--{opt}", str(value)]
    return argv


def _type_ok(value: Any, typ: type) -> bool:
    if typ is bool:
        return isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typ) and not isinstance(value, bool)


def validate(cfg: Any) -> None:
    """Check every setting of ``cfg`` against its type, its choices and its :class:`Rule`.

    The CLIs call it on the parsed options (an error then reads ``nat-train: error: --batch-size should
    be a positive integer, got 0``); ``train``/``evaluate`` call it again for a config built in code.

    Raises:
        SettingError: naming the first bad option as typed on the command line.
    """
    for opt, dest, f, typ in _fields(type(cfg)):
        value = _get(cfg, dest)
        if not _type_ok(value, typ):
            raise SettingError(f"--{opt} should be of type {typ.__name__}, got {value!r}")
        choices, rule = f.metadata.get("choices"), f.metadata.get("check")
        if choices and value not in choices:
            raise SettingError(f"--{opt} should be one of {', '.join(map(str, choices))}, got {value!r}")
        if rule is not None and not rule.ok(value):
            raise SettingError(f"--{opt} should be {rule.what}, got {value!r}")


def refuse(prog: str, error: SettingError) -> typing.NoReturn:
    """Stop a CLI on a bad setting found after parsing (one that needs a file), as argparse does."""
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def progress(iterable: Iterable, **kw) -> tqdm:
    """A tqdm bar when stderr is a terminal; silent (no carriage-return updates) when redirected.

    Args:
        iterable: what to iterate over.
        **kw: tqdm arguments (``disable=True`` silences it on a terminal too).
    """
    kw["disable"] = kw.get("disable", False) or not sys.stderr.isatty()
    return tqdm(iterable, leave=kw.pop("leave", False), dynamic_ncols=True, **kw)
