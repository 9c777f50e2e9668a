"""numpy input for the Python API: arrays as scipy takes them (any byte order, read-only, any
strides, integers and bools cast to float64), made into what the solver or a tensor can take
without a warning."""

from typing import Any

import numpy as np
import torch

_NUMPY_FLOATS = (np.float32, np.float64)


def as_float_array(value: Any, name: str) -> np.ndarray:
    """value as an aligned float32/float64 ndarray in native byte order (a copy only when
    needed): float16 widens to float32, integers and bools to float64 as scipy casts them.

    Raises:
        TypeError: for values that cannot be cast safely to float64 (strings, complex), in
            scipy's words.
    """
    arr = np.asarray(value)
    if arr.dtype.type is np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype.type not in _NUMPY_FLOATS:
        if not np.can_cast(arr.dtype, np.float64, casting="safe"):
            raise TypeError(f"{name}: Cannot cast array data from {arr.dtype!r} to "
                            "dtype('float64') according to the rule 'safe'")
        arr = arr.astype(np.float64)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if not arr.flags.aligned:
        arr = arr.copy()
    return arr


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor over arr's memory where torch allows it without a warning, else over a copy
    (read-only arrays, negative strides)."""
    if not arr.flags.writeable or any(s < 0 for s in arr.strides):
        arr = np.array(arr)  # torch.from_numpy warns on read-only and refuses negative strides
    return torch.from_numpy(arr)
