"""Triton's CPU interpreter without its repeated language patching, for the interpreter subprocesses.

Imported first by :func:`tests.conftest.run_under_triton_interpreter`'s scripts. Triton's interpreter
(``TRITON_INTERPRET=1``) patches ``triton.language`` when a kernel launches (every builtin of ``tl``,
``tl.core``, ``tl.tensor`` and ``tl.math`` swapped for its NumPy twin, through ``inspect.getmembers``) and
restores it when the launch ends. It patches again at every call of a ``@triton.jit`` helper from inside the
kernel, the same modules, already patched by the launch (the builtins it finds are the launch's wrappers by
then, so the repeat changes nothing), and never restores that. Our kernels call helpers inside their loops:
that repeat was two thirds of the interpreter's time (Triton 3.8, cProfile of the refined kernel on two rows:
15.2 s -> 4.8 s).

:func:`install` skips a helper's patching while a launch runs, when the modules its globals name were patched
in this launch already; a launch itself, and a helper naming a module not patched yet, still patch as Triton
does. The kernels run the same code, on the same NumPy operations: outputs are unchanged (the interpreter tests
compare them with the array-API reference bit for bit either way). A Triton without these internals runs
unchanged, only slower.
"""

from __future__ import annotations

from typing import Any


class _Unchanged:
    """The scope of a skipped patch: nothing to restore."""

    def restore(self) -> None:
        pass


_UNCHANGED = _Unchanged()


INSTALLED = False


def install() -> bool:
    """Skip the interpreter's repeat patching inside a launch; True (and ``INSTALLED``) where this Triton has the
    internals."""
    global INSTALLED
    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if not (callable(patch_lang) and isinstance(executor, type) and "__call__" in vars(executor)):
        return False
    launch = executor.__call__
    languages = (tl, tl.core)
    state: dict[str, Any] = {"depth": 0, "patched": set()}

    def patch_once_per_launch(fn: Any) -> Any:
        # Triton patches the language modules that the function's globals name (tl and/or tl.core).
        named = {id(value) for value in fn.__globals__.values() if any(value is m for m in languages)}
        if state["depth"] and named <= state["patched"]:
            return _UNCHANGED
        scope = patch_lang(fn)
        if state["depth"]:
            state["patched"] |= named
        return scope

    def counted_launch(self: Any, *args: Any, **kwargs: Any) -> Any:
        if state["depth"] == 0:  # the last launch restored the modules: patch afresh
            state["patched"] = set()
        state["depth"] += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            state["depth"] -= 1

    interpreter._patch_lang = patch_once_per_launch
    interpreter.GridExecutor.__call__ = counted_launch
    INSTALLED = True
    return True
