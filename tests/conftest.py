"""Backend fixtures: every algorithm test runs on each installed backend.

``Backend`` lists the ways eplb can run; the ``backend`` fixture turns each
into a pytest param that skips when its framework (or GPU) is missing. Tests
write loads as numpy arrays and convert with ``backend.asarray``.
"""

from __future__ import annotations

import enum
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import eplb


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _torch_cuda() -> bool:
    if not _has("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def _jax_gpu() -> bool:
    if not _has("jax"):
        return False
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


class Backend(enum.Enum):
    NUMPY = "numpy"  # default dispatch (the numba kernel where installed, for the greedy policy)
    NUMPY_XP = "numpy:xp"  # the array-API reference path, forced
    TORCH = "torch"  # CPU tensor, default dispatch (numpy kernel on a view)
    TORCH_OPS = "torch:ops"  # CPU tensor, torch ops forced (the CUDA code path)
    TORCH_CUDA = "torch:cuda"
    JAX = "jax"  # CPU, eager call (jit inside; the numba kernel through a host callback where installed)
    JAX_JIT = "jax:jit"  # CPU, called inside the user's own jax.jit
    JAX_XLA = "jax:xla"  # CPU, the array-API path under jit forced (what JAX runs without numba)
    JAX_GPU = "jax:gpu"

    @property
    def module(self) -> str:
        return self.value.split(":")[0]

    @property
    def gpu(self) -> bool:
        return self in (Backend.TORCH_CUDA, Backend.JAX_GPU)

    def available(self) -> bool:
        if not _has(self.module):
            return False
        if self is Backend.TORCH_CUDA:
            return _torch_cuda()
        if self is Backend.JAX_GPU:
            return _jax_gpu()
        return True


@dataclass(frozen=True)
class Runner:
    """How one backend turns numpy inputs into eplb calls and back."""

    backend: Backend
    asarray: Callable[[np.ndarray], Any]
    rebalance: Callable[..., tuple[Any, Any, Any]]

    def rebalance_np(self, weight: np.ndarray, *args: int, **kwargs: Any) -> tuple[np.ndarray, ...]:
        """Run on this backend; results as int64 numpy arrays (checked for kind and device)."""
        out = self.rebalance(self.asarray(weight), *args, **kwargs)
        return tuple(to_numpy(a, self.backend) for a in out)


def to_numpy(x: Any, backend: Backend) -> np.ndarray:
    if backend.module == "numpy":
        assert isinstance(x, np.ndarray)
    elif backend.module == "torch":
        import torch

        assert isinstance(x, torch.Tensor)
        assert x.device.type == ("cuda" if backend.gpu else "cpu"), x.device
        assert not x.dtype.is_floating_point
        x = x.cpu().numpy()
    else:
        import jax

        assert isinstance(x, jax.Array)
        assert {d.platform for d in x.devices()} == ({"gpu"} if backend.gpu else {"cpu"})
        x = np.asarray(x)
    assert x.dtype.kind == "i", x.dtype
    return x.astype(np.int64)


def make_runner(backend: Backend) -> Runner:
    if backend is Backend.NUMPY:
        return Runner(backend, np.asarray, eplb.rebalance_experts)
    if backend is Backend.NUMPY_XP:
        from eplb.backends import _numpy

        def reference(weight: Any, r: int, g: int, n: int, gpus: int, **kw: Any) -> Any:
            """Validate via the public API, then run the array-API path with the options it chose."""
            placement = eplb.rebalance_experts(weight, r, g, n, gpus, **kw)
            if kw.get("previous") is not None:
                return placement  # placement-stable calls have no kernel: already the array-API path
            hierarchical = kw.pop("hierarchical", None)
            hierarchical = (g % n == 0) if hierarchical is None else hierarchical
            return _numpy.rebalance(weight, r, g, n, gpus, hierarchical=hierarchical, impl="xp", **kw)

        return Runner(backend, np.asarray, reference)
    if backend.module == "torch":
        import torch

        device = "cuda" if backend.gpu else "cpu"

        def as_torch(a: np.ndarray) -> Any:
            return torch.as_tensor(np.asarray(a), device=device)

        if backend is Backend.TORCH_OPS:
            from eplb.backends import _torch

            def forced(weight: Any, r: int, g: int, n: int, gpus: int, **kw: Any) -> Any:
                """Validate via the public API, then run the torch-ops path with the options it chose."""
                eplb.rebalance_experts(weight, r, g, n, gpus, **kw)
                hierarchical = kw.pop("hierarchical", None)
                hierarchical = (g % n == 0) if hierarchical is None else hierarchical
                return _torch.rebalance(weight, r, g, n, gpus, hierarchical=hierarchical, impl="torch", **kw)

            return Runner(backend, as_torch, forced)
        return Runner(backend, as_torch, eplb.rebalance_experts)

    import jax
    import jax.numpy as jnp

    device = jax.devices("gpu" if backend.gpu else "cpu")[0]

    def as_jax(a: np.ndarray) -> Any:
        a = np.asarray(a)
        if a.dtype == np.int64:
            assert a.max(initial=0) < 2**31, "JAX without x64 holds int32 loads"
            a = a.astype(np.int32)
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        return jax.device_put(jnp.asarray(a), device)

    if backend is Backend.JAX_XLA:
        from eplb.backends import _jax

        def xla(weight: Any, r: int, g: int, n: int, gpus: int, **kw: Any) -> Any:
            """Validate via the public API, then run the XLA path with the options it chose."""
            placement = eplb.rebalance_experts(weight, r, g, n, gpus, **kw)
            if kw.get("previous") is not None:
                return placement  # placement-stable calls always run the XLA path
            hierarchical = kw.pop("hierarchical", None)
            hierarchical = (g % n == 0) if hierarchical is None else hierarchical
            return _jax.rebalance(weight, r, g, n, gpus, hierarchical=hierarchical, impl="xla", **kw)

        return Runner(backend, as_jax, xla)
    if backend is Backend.JAX_JIT:

        def jitted(weight: Any, r: int, g: int, n: int, gpus: int, **kwargs: Any) -> Any:
            return jax.jit(lambda w: tuple(eplb.rebalance_experts(w, r, g, n, gpus, **kwargs)))(weight)

        return Runner(backend, as_jax, jitted)
    return Runner(backend, as_jax, eplb.rebalance_experts)


ALL_BACKENDS = list(Backend)
CPU_BACKENDS = [b for b in Backend if not b.gpu]


def backend_params(backends: list[Backend]) -> list[Any]:
    return [
        pytest.param(b, id=b.value, marks=pytest.mark.skipif(not b.available(), reason=f"{b.value} not available"))
        for b in backends
    ]


@pytest.fixture(params=backend_params(ALL_BACKENDS))
def runner(request: pytest.FixtureRequest) -> Runner:
    """A :class:`Runner` for each installed backend (GPU ones skip without a GPU)."""
    return make_runner(request.param)
