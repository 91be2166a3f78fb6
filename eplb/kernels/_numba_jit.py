"""``njit``: numba's decorator with the on-disk cache where it can be written, in memory otherwise.

Kernels compile in seconds; numba's cache (``cache=True``) saves that in
later processes. It writes beside the module (``__pycache__``) or in a user
folder (``NUMBA_CACHE_DIR``, else numba's default); where none is writable,
numba refuses ``cache=True`` when the function is decorated. Then the kernel
compiles in memory as before, and one ``RuntimeWarning`` says why every new
process pays for the compile.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numba

__all__ = ["CACHED", "njit"]

CACHED: dict[str, bool] = {}  # qualified name -> cached on disk (for diagnostics and tests)
# qualified name -> kernel, but inlined helpers (eplb.backends._numba.cold_cache reads their cache indexes)
DISPATCHERS: dict[str, Any] = {}
_WARNED = False


def njit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(cache=True, nogil=True, **options)``, falling back to ``cache=False``."""

    def decorate(function: Callable[..., Any]) -> Any:
        global _WARNED
        name = f"{function.__module__}.{function.__qualname__}"
        try:
            dispatcher = numba.njit(cache=True, nogil=True, **options)(function)
            CACHED[name] = True
        except RuntimeError as err:  # "cannot cache function ...: no locator available"
            if not _WARNED:
                _WARNED = True
                warnings.warn(
                    f"eplb's compiled kernels cannot be cached on disk ({err}); they compile in memory in every "
                    "process (a few seconds). Set NUMBA_CACHE_DIR to a writable folder to cache them.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            dispatcher = numba.njit(cache=False, nogil=True, **options)(function)
            CACHED[name] = False
        if options.get("inline", "never") != "always":  # an inlined helper is compiled into its callers only
            DISPATCHERS[name] = dispatcher
        return dispatcher

    return decorate
