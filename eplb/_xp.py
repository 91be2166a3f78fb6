"""The one place that knows array backends.

The algorithm layer (:mod:`eplb.algorithms`) is written against an array-API
namespace ``xp`` plus the few primitives below, which the standard lacks or
which backends implement with different semantics:

- :func:`at_set`: index update (in place on numpy/torch, functional on JAX);
- :func:`count_rows`: per-row counts of integer values (a scatter-add: numpy
  ``bincount``, torch ``scatter_add_``, JAX ``.at[].add``);
- :func:`argsort_desc`: *stable* descending argsort (ties keep index order);
- :func:`take_along`: gather along the last axis (native ``torch.gather``);
- :func:`scan`: a loop with a carry and stacked per-step outputs
  (``lax.scan`` on JAX, a Python loop elsewhere);
- :func:`reciprocal_table`: correctly rounded float32 ``1/k``, made where the
  division is exact (XLA on GPU does not round float32 division correctly).

Frameworks are never imported here: a namespace is only ever obtained from an
array that already exists, so ``import eplb`` needs numpy alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "argsort_desc",
    "array_namespace",
    "at_set",
    "backend_name",
    "constant",
    "count_rows",
    "device",
    "is_jax",
    "is_numpy",
    "is_torch",
    "reciprocal_table",
    "refine_rows",
    "round_float32",
    "scan",
    "take_along",
]


def array_namespace(*arrays: Any) -> Any:
    """Array-API namespace of ``arrays``: numpy itself (numpy >= 2 follows the
    standard, and its compat wrappers cost a microsecond a call), the
    array-api-compat torch namespace, or jax.numpy."""
    xp = array_api_compat.array_namespace(*arrays)
    return np if is_numpy(xp) else xp


def device(x: Any) -> Any:
    """Device of an array (``"cpu"`` for numpy; ``None`` for a JAX tracer).

    Under ``jit`` a JAX array has no device yet: the computation runs where
    its committed inputs live. Creating an array with an explicit device
    there (some JAX releases give tracers a ``device``, the default one)
    would commit results that depend on no input (a degenerate config's
    fixed placement) to that device: CPU inputs would get GPU outputs.
    """
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.core.Tracer):
        return None
    return array_api_compat.device(x)


def is_numpy(xp: Any) -> bool:
    return array_api_compat.is_numpy_namespace(xp)


def is_torch(xp: Any) -> bool:
    return array_api_compat.is_torch_namespace(xp)


def is_jax(xp: Any) -> bool:
    return array_api_compat.is_jax_namespace(xp)


_HOST_TYPES = (np.ndarray, list, tuple)


def backend_name(x: Any) -> str:
    """``"numpy"``, ``"torch"`` or ``"jax"`` for an array; lists count as numpy.

    Detection looks at ``sys.modules`` only, so it never imports a framework.
    """
    if isinstance(x, _HOST_TYPES):
        return "numpy"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        return "jax"
    if np.isscalar(x):
        return "numpy"
    raise TypeError(
        f"weight must be a numpy array, a list, a torch.Tensor or a jax.Array; "
        f"got {type(x).__module__}.{type(x).__qualname__}"
    )


def at_set(x: Any, idx: Any, values: Any, *, xp: Any) -> Any:
    """``x[idx] = values``; always use the return value.

    ``idx`` must not repeat an index (JAX applies duplicate updates in an
    unspecified order). numpy and torch update ``x`` in place: call it only on
    buffers the algorithm created itself.
    """
    if is_jax(xp):
        return x.at[idx].set(values, unique_indices=True)
    x[idx] = values
    return x


def count_rows(idx: Any, size: int, *, xp: Any) -> Any:
    """``[B, size]``: how many entries of each row of ``idx [B, n]`` equal ``0 .. size - 1`` (negatives: none).

    Integer counts in ``idx``'s dtype and on its device, so every backend gives the same values. A scatter-add
    (numpy ``bincount``, torch ``scatter_add_``, JAX ``.at[].add``): ``O(B * (n + size))`` where the comparison
    ``idx[:, :, None] == arange(size)`` costs ``O(B * n * size)`` time and memory (the standard has no
    index add).
    """
    batch, n = idx.shape
    if is_numpy(xp):
        flat = (np.arange(batch, dtype=np.int64)[:, None] * size + idx)[idx >= 0]
        return np.bincount(flat, minlength=batch * size).reshape(batch, size).astype(idx.dtype, copy=False)
    # One more column for the negatives (shifted to 0, dropped after).
    shifted = xp.where(idx >= 0, idx + 1, xp.zeros_like(idx))
    if is_torch(xp):
        torch = sys.modules["torch"]
        out = torch.zeros((batch, size + 1), dtype=idx.dtype, device=idx.device)
        return out.scatter_add_(1, shifted.to(torch.int64), torch.ones_like(idx))[:, 1:]
    rows = xp.broadcast_to(xp.reshape(xp.arange(batch, dtype=idx.dtype), (batch, 1)), (batch, n))  # JAX
    out = xp.zeros((batch, size + 1), dtype=idx.dtype)
    return out.at[rows, shifted].add(xp.ones_like(idx))[:, 1:]


def argsort_desc(x: Any, *, xp: Any) -> Any:
    """Indices that sort ``x`` descending along the last axis, ties by index.

    Stable: equal keys keep ascending index order on every backend. Keys must
    be floating point and free of NaN.
    """
    if is_torch(xp):
        torch = sys.modules["torch"]
        return torch.sort(x, dim=-1, descending=True, stable=True).indices
    if is_jax(xp):
        if x.shape[-1] <= _RANK_SORT_MAX:
            return _argsort_desc_by_counting(x, xp=xp)
        return xp.argsort(x, axis=-1, descending=True, stable=True)
    # Negating a float is exact, and a stable ascending sort of -x puts equal
    # keys in index order, which reversing an ascending sort would not.
    return np.argsort(-x, axis=-1, kind="stable")


# Up to this many keys per row, JAX ranks by counting (one fused O(n^2)
# comparison) instead of sorting: XLA's CPU sort of [232, 72] takes ~2 ms,
# the count ~0.3 ms, with the same result.
_RANK_SORT_MAX = 256


def _argsort_desc_by_counting(x: Any, *, xp: Any) -> Any:
    """Stable descending argsort of ``x [B, n]`` by counting, for small ``n``.

    Item ``i`` lands at position ``#{j: x_j > x_i} + #{j < i: x_j == x_i}``,
    which is exactly its place in a stable descending sort.
    """
    batch, n = x.shape
    ids = xp.arange(n)  # the default integer, as a sort's indices would be
    xi, xj = x[:, :, None], x[:, None, :]
    ahead = (xj > xi) | ((xj == xi) & (ids[None, None, :] < ids[None, :, None]))
    position = xp.sum(ahead, axis=-1, dtype=ids.dtype)  # [B, n], a permutation
    rows = xp.reshape(xp.arange(batch, dtype=ids.dtype), (batch, 1))
    order = xp.zeros((batch, n), dtype=ids.dtype)
    return at_set(order, (rows, position), xp.broadcast_to(ids, (batch, n)), xp=xp)


def take_along(x: Any, idx: Any, *, xp: Any) -> Any:
    """Row-wise gather on ``[B, n]`` arrays: ``out[b, j] = x[b, idx[b, j]]``."""
    if is_torch(xp):
        return sys.modules["torch"].gather(x, -1, idx)
    if is_numpy(xp):
        # Plain fancy indexing: np.take_along_axis costs 3x more per call.
        return x[np.arange(x.shape[0])[:, None], idx]
    return xp.take_along_axis(x, idx, axis=-1)


def scan(body: Callable[[Any, Any], tuple[Any, Any]], carry: Any, xs: Any, *, xp: Any) -> tuple[Any, Any]:
    """Run ``carry, y = body(carry, x)`` for each ``x`` in ``xs`` (leading axis).

    Returns the final carry and the ``y`` stacked along a new leading axis
    (``y`` may be a tuple of arrays). On JAX this is ``lax.scan``, so the loop
    is traced once and stays inside ``jit``.
    """
    if is_jax(xp):
        from jax import lax

        return lax.scan(body, carry, xs)
    ys = []
    for i in range(xs.shape[0]):
        carry, y = body(carry, xs[i, ...])
        ys.append(y)
    if not ys or ys[0] is None:
        return carry, None
    if isinstance(ys[0], tuple):
        return carry, tuple(xp.stack(parts) for parts in zip(*ys, strict=True))
    return carry, xp.stack(ys)


def refine_rows(body: Callable[[tuple], tuple], rows: tuple, max_iters: int, *, xp: Any) -> tuple:
    """Run a per-row local search: ``rows, changed = body(rows)`` until no row changes.

    ``rows`` is a tuple of arrays with a leading batch axis; rows never
    interact, and ``body`` must leave a row as it is once ``changed`` is
    false for it (a converged row stays converged). Host arrays (numpy,
    torch CPU) then only iterate on the rows still changing; JAX loops on the
    device (``lax.while_loop``) until no row changes; CUDA tensors run all
    ``max_iters`` rounds (checking would stall the host). All give the same
    result.
    """
    if is_jax(xp):
        from jax import lax

        def cond(state: Any) -> Any:
            step, changed, _ = state
            return (step < max_iters) & changed

        def step(state: Any) -> Any:
            count, _, inner = state
            inner, changed = body(inner)
            return count + 1, xp.any(changed), inner

        return lax.while_loop(cond, step, (0, xp.asarray(True), rows))[2]
    if not (is_numpy(xp) or device(rows[0]).type == "cpu"):
        for _ in range(max_iters):
            rows, _ = body(rows)
        return rows
    rows = tuple(xp.asarray(a, copy=True) for a in rows)
    active = xp.arange(rows[0].shape[0], device=device(rows[0]))
    for _ in range(max_iters):
        if active.shape[0] == 0:
            break
        updated, changed = body(tuple(a[active, ...] for a in rows))
        for full, part in zip(rows, updated, strict=True):
            full[active, ...] = part
        active = active[changed]
    return rows


_CONSTANTS: dict[tuple, Any] = {}


def constant(values: Any, *, xp: Any, device: Any = None) -> Any:
    """An integer array of nested Python ``values`` (a table known from the config), on ``device``.

    Copying host data to a CUDA device synchronises, so torch keeps one copy
    per (values, device), made on the first call; later calls (and CUDA
    graph captures after a warm-up call) reuse it. Other backends build it
    directly (a constant under ``jax.jit``).
    """
    if not is_torch(xp) or device is None or device.type == "cpu":
        return xp.asarray(values, device=device) if not is_numpy(xp) else np.asarray(values)
    key = (_frozen(values), str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = xp.asarray(values, device=device)
    return _CONSTANTS[key]


def iota(n: int, *, dtype: Any, device: Any, xp: Any) -> Any:
    """``arange(n)`` of ``dtype`` on ``device``: **read-only** (never an :func:`at_set` target).

    On a CUDA device torch keeps one copy per ``(n, dtype, device)``: an
    ``arange`` is a kernel launch, and a host-bound torch CUDA call runs dozens
    of them (about 20 us of host time each). Elsewhere a plain ``arange``.
    """
    if is_torch(xp) and device is not None and device.type == "cuda":
        key = ("iota", n, dtype, str(device))
        if key not in _CONSTANTS:
            _CONSTANTS[key] = xp.arange(n, dtype=dtype, device=device)
        return _CONSTANTS[key]
    return xp.arange(n, dtype=dtype, device=device)


def _frozen(values: Any) -> Any:
    return tuple(_frozen(v) for v in values) if isinstance(values, list | tuple) else values


def round_float32(x: float) -> float:
    """``x`` rounded to float32 (to nearest, ties to even), as a Python float; beyond float32's range, inf."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def reciprocal_table(n: int, *, xp: Any, device: Any = None) -> Any:
    """float32 ``[n + 1]`` with entry ``k`` = ``1/k`` correctly rounded; entry 0 is 0.

    Replica loads are ``weight * table[count]``: a multiplication is
    correctly rounded on every backend, a float32 division is not on XLA GPU.
    numpy and torch (CPU and CUDA) divide exactly, so they build the table
    in place; JAX gets it from numpy on the host, as a constant. On a CUDA
    device torch keeps one **read-only** copy per ``(n, device)`` (four
    kernel launches saved each call, as :func:`iota`).
    """
    if is_numpy(xp) or is_jax(xp):
        table = np.zeros(n + 1, dtype=np.float32)
        table[1:] = np.float32(1.0) / np.arange(1, n + 1, dtype=np.float32)
        return xp.asarray(table)
    cached = device is not None and device.type == "cuda"
    key = ("reciprocal", n, str(device))
    if cached and key in _CONSTANTS:
        return _CONSTANTS[key]
    counts = xp.arange(n + 1, dtype=xp.float32, device=device)
    table = xp.where(counts > 0, 1.0 / counts, 0.0)
    if cached:
        _CONSTANTS[key] = table
    return table
