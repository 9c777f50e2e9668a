"""Checkpoints: tensors and plain Python values only, written atomically.

A checkpoint is a dict of state dicts (model, optimizer, scheduler,
assignment), the target seed, progress counters, RNG states and the run
config (a dict of plain values). ``load`` uses ``torch.load(weights_only=True)``
so it never unpickles arbitrary objects.
"""
from __future__ import annotations

import os
import tempfile

import torch

from .config import SettingError

__all__ = ["save_checkpoint", "load_checkpoint", "check_compatible", "COMPAT_KEYS", "LEGACY_VALUES"]

# Config fields that must match for a checkpoint to be resumed or evaluated.
COMPAT_KEYS = ("arch", "dim", "n_images", "sobel", "in_channels", "target_generator", "target_set")

# What a checkpoint written before a key existed implicitly holds for it.
LEGACY_VALUES = {"target_generator": "pcg64", "target_set": "sphere"}


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    Args:
        state: dict of tensors and plain values.
        path: destination file; a reader never sees a partial file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: checkpoint file.
        map_location: device for the loaded tensors.

    Returns:
        The state dict.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError) as e:
        raise RuntimeError(f"cannot load checkpoint {path}: {e}") from e
    except Exception as e:  # a file torch.load cannot read at all (KeyError, UnpicklingError...): not ours
        raise SettingError(f"{path} is not a checkpoint (torch.load: {type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "config" not in state:
        raise SettingError(f"{path} is not a nat-train checkpoint (no 'config' entry)")
    return state


def check_compatible(saved: dict, current: dict, path: str) -> None:
    """Refuse a checkpoint made for another dataset size, dimension or architecture.

    Args:
        saved: the checkpoint's config dict.
        current: the config dict of this run (same keys).
        path: checkpoint path, for the message.
    """
    saved = dict(LEGACY_VALUES, **saved)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
             for k in COMPAT_KEYS if saved.get(k) != current.get(k)]
    if diffs:
        raise SettingError(f"checkpoint {path} does not match this run ({'; '.join(diffs)}); use the same "
                         "--data/--limit, --dim, --arch, --target-generator and --targets (with its "
                         "--num-prototypes, --target-spread), or another --out")
