"""Expert load statistics over a sliding window of steps, on the device (:class:`LoadTracker`).

torch: buffers updated in place, fixed addresses, no host sync (the ring
position is a device counter), so recording and stepping fit in a CUDA graph.
JAX: a pytree whose methods are pure functions (``jit``, ``lax.scan``,
``lax.cond``). numpy: in place. Portable code always uses the returned
tracker: ``tracker = tracker.record(ids, layer=3)``.

Inputs are checked before any state changes. Values that cannot be read
without a host sync (CUDA tensors, JAX arrays on an accelerator) or at all
(JAX tracers) are not range-checked; deterministic rules apply instead (see
:meth:`LoadTracker.record` and :meth:`LoadTracker.record_counts`).
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np

from eplb import _xp

__all__ = ["LoadTracker"]

_BACKENDS = ("numpy", "torch", "jax")


class LoadTracker:
    """Sliding-window expert load: routed tokens per (layer, expert) over the last ``window`` steps.

    Parameters
    ----------
    num_layers : int
        MoE layers ``L``.
    num_experts : int
        Logical experts ``E`` per layer (router ids ``0 .. E-1``).
    window : int
        Steps kept; :meth:`load` sums the last ``window`` committed steps.
    backend : {"numpy", "torch", "jax"}, keyword-only
        Framework of the buffers (default ``"numpy"``).
    device : optional, keyword-only
        Where the buffers live: a torch device (``"cuda"``) or a JAX device.

    Attributes
    ----------
    counts : array [window, L, E], int32
        Ring buffer of committed steps; :meth:`step` writes slot ``steps % window``.
    pending : array [L, E + 1], int32
        The step being recorded. Column ``E`` collects ids outside ``[0, E)``,
        masked-out tokens and (row 0) records for a device layer outside
        ``[0, L)``, which are dropped. int32: one step counts at most
        ``2**31 - 1`` tokens per (layer, expert), then wraps.
    steps : array [], integer
        Steps committed so far (int64 on torch and numpy, int32 on JAX).

    Memory is ``4 * window * L * E`` bytes: 59 MB for 1000 steps of 58 x 256.

    Examples
    --------
    >>> import numpy as np, eplb
    >>> tracker = eplb.LoadTracker(num_layers=2, num_experts=4, window=8)
    >>> tracker = tracker.record(np.array([[0, 1], [0, 3]]), layer=0)  # topk_ids [tokens, k]
    >>> tracker = tracker.record(np.array([[2, 2]]), layer=1)
    >>> tracker = tracker.step()
    >>> tracker.load().tolist()
    [[2, 1, 0, 1], [0, 0, 2, 0]]
    """

    counts: Any
    pending: Any
    steps: Any

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        window: int,
        *,
        backend: str = "numpy",
        device: Any = None,
    ) -> None:
        for name, value in (("num_layers", num_layers), ("num_experts", num_experts), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        num_layers, num_experts, window = int(num_layers), int(num_experts), int(window)
        shapes = ((window, num_layers, num_experts), (num_layers, num_experts + 1))
        if backend == "numpy":
            counts, pending = (np.zeros(s, dtype=np.int32) for s in shapes)
            steps = np.zeros((), dtype=np.int64)
        elif backend == "torch":
            import torch

            counts, pending = (torch.zeros(s, dtype=torch.int32, device=device) for s in shapes)
            steps = torch.zeros((), dtype=torch.int64, device=counts.device)
        elif backend == "jax":
            import jax.numpy as jnp

            _register_pytree()
            counts, pending = (jnp.zeros(s, dtype=jnp.int32, device=device) for s in shapes)
            steps = jnp.zeros((), dtype=jnp.int32, device=device)
        else:
            raise ValueError(f"backend={backend!r} must be one of {', '.join(map(repr, _BACKENDS))}")
        self.counts, self.pending, self.steps = counts, pending, steps

    @classmethod
    def _from_arrays(cls, counts: Any, pending: Any, steps: Any) -> LoadTracker:
        tracker = object.__new__(cls)
        tracker.counts, tracker.pending, tracker.steps = counts, pending, steps
        return tracker

    window = property(lambda self: self.counts.shape[0], doc="Steps kept.")
    num_layers = property(lambda self: self.counts.shape[1], doc="Layers ``L``.")
    num_experts = property(lambda self: self.counts.shape[2], doc="Logical experts ``E``.")

    def __repr__(self) -> str:
        kind = _xp.backend_name(self.counts)
        sizes = f"num_layers={self.num_layers}, num_experts={self.num_experts}, window={self.window}"
        return f"LoadTracker({sizes}, backend={kind!r})"

    def record(self, topk_ids: Any, layer: Any = None, *, mask: Any = None) -> LoadTracker:
        """Count one batch of routing decisions into the pending step.

        Parameters
        ----------
        topk_ids : array [T, k] or [T], integer
            Logical expert chosen for each token (and each of its ``k`` picks)
            in ``layer``; or ``[L, T, k]`` for every layer at once when
            ``layer`` is ``None``. Any integer dtype (not bool). Ids outside
            ``[0, E)`` (say ``-1`` for a dropped token) are not counted; they
            are compared exactly, so an int64 id such as ``2**32 + 3`` is out
            of range, never wrapped onto expert 3.
        layer : int or integer array [], optional
            The layer, in ``[0, L)``: a Python or numpy int, a 0-d numpy
            array, or a 0-d integer array of the tracker's framework (a CUDA
            tensor, a traced scalar under JAX's ``jit``/``lax.scan``). Where
            its value can be read without a device sync (ints, numpy, CPU
            tensors, concrete JAX arrays on the CPU) an out-of-range layer
            raises ``ValueError``; where it cannot (CUDA tensors, JAX arrays
            on an accelerator, tracers) an out-of-range layer counts nothing.
            Bools and floats raise ``TypeError``.
        mask : array [T] or [L, T], bool, optional, keyword-only
            Tokens to count; ``False`` marks padding (CUDA-graph batch
            padding, say). Must be bool: a 0/1 integer mask raises
            ``TypeError`` (pass ``mask != 0``), as it is easily confused with
            token indices.

        Returns
        -------
        LoadTracker
            The updated tracker: ``self`` on torch and numpy (updated in
            place), a new one on JAX.

        Raises
        ------
        TypeError
            A bool or float ``layer``, non-integer ``topk_ids``, non-bool ``mask``.
        ValueError
            A host-readable ``layer`` outside ``[0, L)``, a ``layer`` that is
            not 0-d, or shapes that do not match. Every check runs before the
            pending step changes.

        Notes
        -----
        The pending counters are int32: one step counts at most ``2**31 - 1``
        tokens per (layer, expert); beyond that they wrap (unchecked, as
        checking would sync the device).
        """
        xp = _xp.array_namespace(self.pending)
        layer = self._layer(layer, xp)
        ids = self._ids(topk_ids, layer, xp)
        if mask is not None:
            ids = xp.where(self._mask(mask, ids, layer, xp), ids, self.num_experts)
        flat = self._flat(ids, layer, xp)
        return self._add(flat, xp.ones(flat.shape, dtype=self.pending.dtype, device=_xp.device(flat)), xp)

    def record_counts(self, counts: Any, layer: Any = None) -> LoadTracker:
        """Add per-step expert counts (``[E]`` for ``layer``, or ``[L, E]``) to the pending step.

        Parameters
        ----------
        counts : array [E] or [L, E], integer
            Tokens each expert received, for ``layer`` or for every layer
            (``layer=None``). Any integer dtype; bool and floats raise
            ``TypeError`` (no silent truncation). Values must lie in
            ``[0, 2**31 - 1]`` (they go into int32 counters): where they can
            be read without a device sync (numpy, lists, CPU tensors,
            concrete JAX arrays on the CPU) anything else raises
            ``ValueError``; on a device or traced they are clipped to that
            range (saturated, never wrapped or negative).
        layer : int or integer array [], optional
            The layer when ``counts`` is ``[E]``; the rules of :meth:`record`.

        Returns
        -------
        LoadTracker
            The updated tracker (``self`` on torch and numpy, a new one on JAX).

        Raises
        ------
        TypeError
            Non-integer ``counts``; a bool or float ``layer``.
        ValueError
            A shape that does not match, host-readable counts outside
            ``[0, 2**31 - 1]``, a host-readable ``layer`` outside ``[0, L)``.
            Every check runs before the pending step changes.

        Notes
        -----
        The pending counters are int32: the counts added in one step must sum
        to at most ``2**31 - 1`` per (layer, expert); beyond that they wrap.
        """
        xp = _xp.array_namespace(self.pending)
        layer = self._layer(layer, xp)
        counts = self._counts(counts, layer, xp)
        experts = xp.arange(self.num_experts, dtype=xp.int32, device=_xp.device(self.pending))
        cols = experts if layer is not None else xp.broadcast_to(experts, (self.num_layers, self.num_experts))
        return self._add(self._flat(cols, layer, xp), xp.reshape(counts, (-1,)), xp)

    def step(self) -> LoadTracker:
        """Commit the pending step to the window (overwriting the oldest once full) and start a new one.

        Returns
        -------
        LoadTracker
            The updated tracker (``self`` on torch and numpy, a new one on JAX).
        """
        xp = _xp.array_namespace(self.pending)
        experts = self.num_experts
        if _xp.is_jax(xp):
            position = self.steps % self.window
            counts = self.counts.at[position].set(self.pending[:, :experts])
            return LoadTracker._from_arrays(counts, xp.zeros_like(self.pending), self.steps + 1)
        if _xp.is_torch(xp):
            torch = sys.modules["torch"]
            position = torch.remainder(self.steps, self.window).reshape(1)
            self.counts.index_copy_(0, position, self.pending[None, :, :experts])
            self.pending.zero_()
            self.steps.add_(1)
            return self
        self.counts[int(self.steps) % self.window] = self.pending[:, :experts]
        self.pending[...] = 0
        self.steps += 1
        return self

    def reset(self) -> LoadTracker:
        """Forget every step, committed or pending.

        Returns
        -------
        LoadTracker
            The cleared tracker (``self`` on torch and numpy, a new one on JAX).
        """
        xp = _xp.array_namespace(self.pending)
        if _xp.is_jax(xp):
            return LoadTracker._from_arrays(*(xp.zeros_like(a) for a in (self.counts, self.pending, self.steps)))
        for array in (self.counts, self.pending, self.steps):
            array[...] = 0
        return self

    def load(self) -> Any:
        """``weight [L, E]``: tokens per expert over the last ``window`` committed steps.

        Returns
        -------
        array [L, E], integer
            On the tracker's device, int64 on torch and numpy, int32 on JAX
            (JAX without x64): ready for :func:`eplb.rebalance_experts`. The
            pending step is not included.
        """
        xp = _xp.array_namespace(self.counts)
        if _xp.is_jax(xp):
            return xp.sum(self.counts, axis=0, dtype=self.counts.dtype)
        return xp.sum(self.counts, axis=0, dtype=xp.int64)

    def _like(self, x: Any, xp: Any) -> Any:
        """``x`` as an array of the tracker's framework (lists and numpy arrays are converted)."""
        if _xp.is_numpy(xp) or not isinstance(x, np.ndarray | list | tuple):
            return xp.asarray(x)
        return xp.asarray(np.asarray(x), device=_xp.device(self.pending))

    def _input(self, x: Any, xp: Any) -> Any:
        """``x`` as a numpy array (lists, tuples) or left as an array of its own framework.

        Values are checked and narrowed where they are, before they move:
        numpy int64 going to JAX (without x64) would wrap to int32.
        """
        if isinstance(x, list | tuple):
            return np.asarray(x)
        if isinstance(x, np.ndarray) or _is_array_of(x, xp):
            return x
        return self._like(x, xp)

    def _layer(self, layer: Any, xp: Any) -> Any:
        """``layer`` checked: ``None``, a Python int in ``[0, L)``, or (value unreadable) a 0-d int32/int64 array."""
        if layer is None:
            return None
        if isinstance(layer, bool | np.bool_):  # bools are ints to Python: True would count into layer 1
            raise TypeError(f"layer={layer!r} must be an int or a 0-d integer array, not a bool")
        if isinstance(layer, int | np.integer):
            value = int(layer)
        else:
            if not (isinstance(layer, np.ndarray) or _is_array_of(layer, xp)):
                frameworks = "numpy" if _xp.is_numpy(xp) else f"numpy or {_xp.backend_name(self.pending)}"
                raise TypeError(
                    f"layer must be None, an int or a 0-d integer array ({frameworks}), "
                    f"got {type(layer).__module__}.{type(layer).__qualname__}"
                )
            kind = _int_kind(layer.dtype)
            if kind is None:
                raise TypeError(f"layer must have an integer dtype, got dtype {layer.dtype}")
            if layer.ndim != 0:
                raise ValueError(f"layer must be a scalar (a 0-d array), got shape {tuple(layer.shape)}")
            host = _host_values(layer)
            if host is None:
                # On a device or traced: reading it would sync (or is impossible).
                # _flat sends an out-of-range layer to the dropped column instead.
                return _signed(layer, _xp.array_namespace(layer), kind)
            value = int(host)
        if not 0 <= value < self.num_layers:
            raise ValueError(f"layer={value} must be in [0, {self.num_layers})")
        return value

    def _ids(self, topk_ids: Any, layer: Any, xp: Any) -> Any:
        """``topk_ids`` checked, as int32/int64 ids in ``[0, E]`` on the tracker's device (``E``: not counted)."""
        ids = self._input(topk_ids, xp)
        kind = _int_kind(ids.dtype)
        if kind is None:
            raise TypeError(f"topk_ids must hold integer expert ids, got dtype {ids.dtype}")
        if layer is None:
            if ids.ndim not in (2, 3) or ids.shape[0] != self.num_layers:
                raise ValueError(
                    f"topk_ids has shape {tuple(ids.shape)}; with layer=None it must be "
                    f"[{self.num_layers}, tokens, k] or [{self.num_layers}, tokens]"
                )
        elif ids.ndim not in (1, 2):
            raise ValueError(f"topk_ids has shape {tuple(ids.shape)}; for one layer it must be [tokens, k] or [tokens]")
        # Ids are only compared, so compare them where they are, in a type that
        # holds them all: int64 2**32 + 3 must not become 3 (numpy int64 moved
        # to JAX without x64 wraps), and small types are widened (JAX compares
        # int8 with 200 as with -56, torch compares no uint32). Every id is
        # then in [0, E] and narrows exactly; device arrays keep int32/int64
        # (torch's int64 topk ids need no extra cast kernel).
        own = _xp.array_namespace(ids)
        ids = _signed(ids, own, kind)
        ids = own.where((ids >= 0) & (ids < self.num_experts), ids, self.num_experts)
        return self._like(ids.astype(np.int32) if isinstance(ids, np.ndarray) else ids, xp)

    def _counts(self, counts: Any, layer: Any, xp: Any) -> Any:
        """``counts`` checked, as int32 in ``[0, 2**31 - 1]`` on the tracker's device."""
        counts = self._input(counts, xp)
        kind = _int_kind(counts.dtype)
        if kind is None:
            raise TypeError(f"counts must have an integer dtype, got dtype {counts.dtype}")
        shape = (self.num_experts,) if layer is not None else (self.num_layers, self.num_experts)
        if tuple(counts.shape) != shape:
            raise ValueError(f"counts has shape {tuple(counts.shape)}, expected {shape}")
        own = _xp.array_namespace(counts)
        host = _host_values(counts)
        if host is None:
            counts = _saturate_int32(counts, own, kind)  # no check without a sync: clip
        else:
            low, high = (int(host.min()), int(host.max())) if host.size else (0, 0)
            if low < 0 or high > _INT32_MAX:
                raise ValueError(f"counts must be in [0, 2**31 - 1] (int32 counters), got values in [{low}, {high}]")
            counts = own.astype(counts, own.int32)  # exact: every value fits
        return self._like(counts, xp)

    def _mask(self, mask: Any, ids: Any, layer: Any, xp: Any) -> Any:
        """``mask`` [T] or [L, T] reshaped to broadcast against ``ids``."""
        mask = self._like(mask, xp)
        if mask.dtype != xp.bool:
            raise TypeError(f"mask must be a bool array (False: not counted), got dtype {mask.dtype}; pass mask != 0")
        tokens = ids.shape[0 if layer is not None else 1]
        if mask.ndim == 1 and mask.shape[0] == tokens:
            mask = mask if layer is not None else xp.reshape(mask, (1, tokens))
        elif not (layer is None and tuple(mask.shape) == tuple(ids.shape[:2])):
            allowed = f"[{tokens}]" if layer is not None else f"[{tokens}] or [{self.num_layers}, {tokens}]"
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {allowed} to match topk_ids")
        return xp.reshape(mask, (*mask.shape, *([1] * (ids.ndim - mask.ndim))))

    def _flat(self, cols: Any, layer: Any, xp: Any) -> Any:
        """Flat indices into ``pending`` of columns ``cols`` (int32 in ``[0, E]``) of ``layer``.

        ``cols`` is ``[L, ...]`` when ``layer`` is ``None``. A layer array (its
        value unknown here) outside ``[0, L)`` sends every column to row 0's
        dropped column ``E``: it counts nothing, where ``layer * (E + 1) +
        cols`` would land in another layer or outside ``pending`` (negative
        indices wrap on JAX and numpy, torch raises).
        """
        width = self.num_experts + 1
        if layer is None:
            rows = xp.arange(self.num_layers, dtype=cols.dtype, device=_xp.device(cols))
            flat = xp.reshape(rows, (-1, 1)) * width + xp.reshape(cols, (self.num_layers, -1))
        elif isinstance(layer, int):
            flat = layer * width + cols
        else:
            inside = (layer >= 0) & (layer < self.num_layers)
            flat = xp.where(inside, layer, 0) * width + xp.where(inside, cols, self.num_experts)
        return xp.reshape(flat, (-1,))

    def _add(self, flat: Any, values: Any, xp: Any) -> LoadTracker:
        """``pending.flat[flat] += values`` (repeated indices add up), in place except on JAX."""
        if _xp.is_jax(xp):
            pending = xp.reshape(xp.reshape(self.pending, (-1,)).at[flat].add(values), self.pending.shape)
            return LoadTracker._from_arrays(self.counts, pending, self.steps)
        if _xp.is_torch(xp):
            self.pending.view(-1).index_add_(0, flat, values)
        else:
            np.add.at(self.pending.reshape(-1), flat, values)
        return self


_INT32_MAX = 2**31 - 1


def _int_kind(dtype: Any) -> tuple[str, int] | None:
    """``("i" or "u", bytes)`` for an integer dtype of numpy, torch or JAX; ``None`` for bool, floats and the rest."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
            return None
        if dtype not in _torch_int_dtypes(torch):
            return None  # quantized types and the like
        return ("i" if dtype.is_signed else "u", dtype.itemsize)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        return None
    # JAX's bfloat16/float8/int4 are ml_dtypes types of numpy kind "V": not integers here.
    return (dtype.kind, dtype.itemsize) if dtype.kind in "iu" else None


@functools.cache
def _torch_int_dtypes(torch: Any) -> frozenset:
    names = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
    return frozenset(getattr(torch, name) for name in names if hasattr(torch, name))


def _is_array_of(x: Any, xp: Any) -> bool:
    """Whether ``x`` is an array of ``xp``'s framework (a JAX tracer counts)."""
    if _xp.is_torch(xp):
        return isinstance(x, sys.modules["torch"].Tensor)
    if _xp.is_jax(xp):
        return isinstance(x, sys.modules["jax"].Array)
    return isinstance(x, np.ndarray)


def _host_values(x: Any) -> np.ndarray | None:
    """``x``'s values as numpy where reading them needs no device sync, else ``None``.

    Readable: numpy arrays, CPU torch tensors, concrete JAX arrays on the CPU.
    Not: CUDA (any non-CPU) tensors and JAX arrays (a host sync), JAX tracers
    under ``jit``/``lax.scan`` (no value yet).
    """
    if isinstance(x, np.ndarray):
        return x
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().numpy() if x.device.type == "cpu" else None
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(x, jax.Array):
        if isinstance(x, jax.core.Tracer) or any(d.platform != "cpu" for d in x.devices()):
            return None
        return np.asarray(x)
    return None


def _signed(x: Any, xp: Any, kind: tuple[str, int]) -> Any:
    """Integer ``x`` as int32 (int64 when 64-bit), for comparing with ints.

    Lossless for signed types and unsigned ones below 32 bits. uint32 values
    ``>= 2**31`` (uint64 ``>= 2**63``) read negative: callers treat negative
    values as out of range (ids, layers) or saturate them (counts).
    """
    target = xp.int64 if kind[1] == 8 else xp.int32
    return x if x.dtype == target else xp.astype(x, target)


def _saturate_int32(x: Any, xp: Any, kind: tuple[str, int]) -> Any:
    """Integer ``x`` clipped to ``[0, 2**31 - 1]`` and cast to int32: saturated, never wrapped."""
    wide = _signed(x, xp, kind)
    # A negative value from an unsigned array was one too large for the signed type.
    wide = xp.where(wide < 0, _INT32_MAX if kind[0] == "u" else 0, wide)
    if kind[1] == 8:
        wide = xp.where(wide > _INT32_MAX, _INT32_MAX, wide)
    return xp.astype(wide, xp.int32)


_PYTREE_REGISTERED = False


def _register_pytree() -> None:
    """Make :class:`LoadTracker` a JAX pytree (leaves: counts, pending, steps), once."""
    global _PYTREE_REGISTERED
    if _PYTREE_REGISTERED:
        return
    from jax import tree_util

    tree_util.register_pytree_node(
        LoadTracker,
        lambda t: ((t.counts, t.pending, t.steps), None),
        lambda _, leaves: LoadTracker._from_arrays(*leaves),
    )
    _PYTREE_REGISTERED = True
