"""Routes scipy.optimize.linear_sum_assignment to nat_ext's, after scikit-learn-intelex's
`patch_sklearn` / `unpatch_sklearn`: one call before the code that uses scipy, undone by another.

    import nat_ext
    nat_ext.patch_scipy()      # scipy.optimize.linear_sum_assignment(...) now runs ours, and so
                               # does a later `from scipy.optimize import linear_sum_assignment`
    ...
    nat_ext.unpatch_scipy()    # scipy's again

    with nat_ext.scipy_patched():   # the same, for a block
        ...

What is patched: the attribute `linear_sum_assignment` of `scipy.optimize` and of
`scipy.optimize._lsap` (where scipy.optimize imports it from). Names bound before the patch
(`from scipy.optimize import linear_sum_assignment` run earlier, scipy's own
`quadratic_assignment`) keep scipy's function, as with patch_sklearn: patch first, then import.
"""

import contextlib
import importlib
from collections.abc import Callable, Iterator

from .lsap import linear_sum_assignment

_MODULES = ("scipy.optimize", "scipy.optimize._lsap")
_NAME = "linear_sum_assignment"
_originals: dict[str, Callable] = {}  # module name -> scipy's function, while patched


def patch_scipy(verbose: bool = False) -> None:
    """Makes scipy.optimize.linear_sum_assignment nat_ext.linear_sum_assignment. Idempotent:
    patching twice changes nothing, and one `unpatch_scipy` restores scipy's function.

    Args:
        verbose: print a line saying what was patched.

    Raises:
        ImportError: scipy is not installed.
    """
    for name in _MODULES:
        module = importlib.import_module(name)
        _originals.setdefault(name, getattr(module, _NAME))
        setattr(module, _NAME, linear_sum_assignment)
    if verbose:
        print(f"nat_ext: {', '.join(m + '.' + _NAME for m in _MODULES)} patched "
              "(nat_ext.unpatch_scipy() restores scipy's)")


def unpatch_scipy() -> None:
    """Restores scipy's own linear_sum_assignment; does nothing when scipy is not patched."""
    for name, original in _originals.items():
        setattr(importlib.import_module(name), _NAME, original)
    _originals.clear()


def scipy_is_patched() -> bool:
    """Whether scipy.optimize.linear_sum_assignment is nat_ext's now."""
    return bool(_originals)


@contextlib.contextmanager
def scipy_patched(verbose: bool = False) -> Iterator[None]:
    """Context manager: scipy patched inside the block; on exit, scipy is left as it was found
    (still patched if it was patched before the block).

    Args:
        verbose: as in `patch_scipy`.
    """
    was_patched = scipy_is_patched()
    patch_scipy(verbose)
    try:
        yield
    finally:
        if not was_patched:
            unpatch_scipy()
