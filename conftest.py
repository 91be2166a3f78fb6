"""Repository-level pytest setup for the doctests of ``eplb`` (``--doctest-modules``).

Some modules import an optional framework at the top (torch, JAX, Triton,
matplotlib, ...); their doctests are collected only where that framework is
installed, so each tox env (``numpy`` has neither torch nor JAX) collects
what it can import. Any other import failure (a bug in eplb, a broken
install) is not hidden: the module is collected and its error reported.
"""

from __future__ import annotations

import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# Top-level names of the optional dependencies (pyproject's extras), whose absence skips a module.
OPTIONAL = frozenset({"torch", "jax", "jaxlib", "jax_triton", "triton", "numba", "matplotlib", "rich"})


def pytest_ignore_collect(collection_path: Path, config: object) -> bool | None:
    path = Path(collection_path)
    if path.suffix != ".py" or ROOT / "eplb" not in path.parents:
        return None
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if module.endswith("__main__"):
        return True  # running it would start the command line
    try:
        importlib.import_module(module.removesuffix(".__init__"))
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] in OPTIONAL:
            return True  # an optional dependency is missing here
        raise
    return None
