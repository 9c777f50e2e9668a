"""Checkpoints: tensors and plain Python values only, written atomically.

A checkpoint is a dict of state dicts (model, optimizer, scheduler,
assignment), the target seed, progress counters, RNG states and the run
config (a dict of plain values). ``load`` uses ``torch.load(weights_only=True)``
so it never unpickles arbitrary objects.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch

from .config import SettingError

__all__ = ["save_checkpoint", "load_checkpoint", "compat_diffs", "previous_path", "COMPAT_KEYS", "LEGACY_VALUES"]

# Config fields that must match for a checkpoint to be resumed or evaluated.
COMPAT_KEYS = ("arch", "dim", "n_images", "sobel", "in_channels", "target_generator", "target_set")

# What a checkpoint written before a key existed implicitly holds for it.
LEGACY_VALUES = {"target_generator": "pcg64", "target_set": "sphere"}


def previous_path(path: str) -> str:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaces (``checkpoint.prev.pt``)."""
    root, ext = os.path.splitext(path)
    return root + ".prev" + ext


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename), keeping
    the checkpoint it replaces as :func:`previous_path` until the new one is in place.

    Args:
        state: dict of tensors and plain values.
        path: destination file; a reader never sees a partial file, and ``path`` always exists
            once written (the old one is linked aside before the rename, not moved).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            _keep_previous(path, folder)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _keep_previous(path: str, folder: str) -> None:
    # a hard link (a copy where the file system has none), renamed over the older previous one
    tmp = os.path.join(folder, f".tmp-prev-{os.getpid()}.pt")
    if os.path.exists(tmp):
        os.unlink(tmp)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, previous_path(path))


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


def compat_diffs(saved: dict, current: dict) -> list[str]:
    """The settings a checkpoint's config must share with this run's to be resumed or evaluated
    (:data:`COMPAT_KEYS`) that differ, as ``"key: checkpoint A, this run B"``."""
    saved = dict(LEGACY_VALUES, **saved)
    return [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}"
            for k in COMPAT_KEYS if saved.get(k) != current.get(k)]
