"""Backends: how each framework runs the algorithm layer.

A backend module exposes

- ``dtype_kind(weight) -> str``: numpy-style kind letter of the input dtype;
- ``host_values(weight, force) -> numpy.ndarray | None``: the loads as a host
  array for value checks, or ``None`` where reading them would stall a device
  (CUDA tensors, JAX arrays off the CPU, JAX tracers) and ``force`` is false;
- ``rebalance(weight, num_replicas, num_groups, num_nodes, num_gpus, hierarchical)``:
  the greedy placement as arrays of the input's kind, on the input's device.

Modules are imported on first use, and only for an input of that framework,
which is then already imported: ``import eplb`` loads no framework.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["get_backend"]

_MODULES = {"numpy": "eplb.backends._numpy", "torch": "eplb.backends._torch", "jax": "eplb.backends._jax"}


def get_backend(name: str) -> ModuleType:
    """The backend module for ``"numpy"``, ``"torch"`` or ``"jax"``."""
    return importlib.import_module(_MODULES[name])
