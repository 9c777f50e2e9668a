"""The supervised baseline: the evaluated run's encoder trained on the labels instead.

Configured from the run's whole config (data, limit, image size, skip-corrupt, Sobel,
architecture, optimiser, batch size, seed...), so it differs from the run in the
objective and the epochs only. It is trained by ``python -m nat_ext.train`` in a child
process: the baseline is a training run of its own (own output folder, checkpoint,
RNG and signal handlers), and :mod:`nat_ext.eval` runs it without importing the
training loop, which itself imports :mod:`nat_ext.eval` to probe at the end.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from .config import Config, config_from_dict, to_argv

__all__ = ["supervised_config", "train_supervised"]

# Set by torchrun; the baseline is one process, whatever launched the evaluation.
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
             "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def supervised_config(run: dict, out: str, epochs: int, device: str = "auto", workers: int = 0) -> Config:
    """The training config of the supervised baseline of a run.

    Args:
        run: the run's config dict (a checkpoint's ``config``; unknown keys are ignored,
            missing ones take the defaults).
        out: output folder of the baseline.
        epochs: its training epochs (a run with labels: the run's own, on its labelled images only).
        device, workers: where and with how many loader processes it trains.

    Returns:
        The run's :class:`Config` with ``objective='supervised'``, those values, no
        evaluation and no resume.
    """
    cfg = config_from_dict(Config, run)
    if cfg.label_fraction > 0 or cfg.label_file:  # a run with labels: those labels alone, as many steps
        epochs = cfg.epochs
    defaults = Config()  # the NAT-only settings go back to their defaults
    return dataclasses.replace(cfg, objective="supervised", epochs=epochs, out=out, device=device,
                               workers=workers, eval=False, resume=False, sync_debug=False,
                               targets=defaults.targets, align=defaults.align, views=defaults.views,
                               rotation_loss=defaults.rotation_loss, koleo=defaults.koleo, crops=defaults.crops,
                               nat_weight=defaults.nat_weight)


def train_supervised(cfg: Config) -> str:
    """Train the baseline set by ``cfg`` with ``python -m nat_ext.train`` in a child process.

    Args:
        cfg: from :func:`supervised_config`.

    Returns:
        Path of its checkpoint.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where this nat_ext is imported from
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "nat_ext.train"] + to_argv(cfg)
    print("supervised baseline: " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"supervised baseline training failed (exit status {proc.returncode}): {' '.join(cmd)}")
    return os.path.join(cfg.out, "checkpoint.pt")
