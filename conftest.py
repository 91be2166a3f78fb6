"""Repository-level pytest setup for the doctests of ``eplb`` (``--doctest-modules``).

Backend modules import their framework at the top, so their doctests are
collected only where that framework is installed (the ``numpy`` tox env has
neither torch nor JAX).
"""

from __future__ import annotations

import importlib.util

collect_ignore_glob = [
    f"eplb/backends/_{name}*.py" for name in ("torch", "jax") if importlib.util.find_spec(name) is None
]
