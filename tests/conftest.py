"""Backend fixtures: every algorithm test runs on each installed backend.

``Backend`` lists the ways eplb can run; the ``backend`` fixture turns each
into a pytest param that skips when its framework (or GPU) is missing. Tests
write loads as numpy arrays and convert with ``backend.asarray``.
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import settings as hypothesis_settings

import eplb

# JAX takes 75% of a GPU's memory when its backend starts; with pytest-xdist workers (and torch) sharing one
# GPU the second worker's JAX then fails. Tests allocate on demand instead (set before any test imports JAX;
# an explicit setting wins). Test-suite configuration only: the library never sets it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# Property tests draw new random examples on every run (they keep finding cases), except under
# EPLB_HYPOTHESIS_PROFILE=ci, which tox's cross env (what CI runs) sets: there each test replays the same examples
# every run, so CI's verdict depends on the commit alone. The other envs and plain pytest runs explore.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("EPLB_HYPOTHESIS_PROFILE", "default"))


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


def _numba() -> bool:
    return _has("numba")


class Backend(enum.Enum):
    """Every way eplb can compute a placement here: front doors (dispatch) and forced implementations.

    A front door is what a user's call runs (``numpy``, ``torch``, ``jax``...);
    a forced implementation (``impl=``) is one kernel or code path, so that a
    cross-backend test compares implementations, not two doors to one kernel.
    """

    NUMPY = "numpy"  # default dispatch (the numba kernel where installed, for the greedy policy)
    NUMPY_XP = "numpy:xp"  # the array-API reference path, forced
    NUMPY_NUMBA = "numpy:numba"  # the compiled numba kernels, forced (greedy policy; previous=)
    TORCH = "torch"  # CPU tensor, default dispatch (numpy kernel on a view)
    TORCH_OPS = "torch:ops"  # CPU tensor, torch ops forced (the CUDA code path)
    TORCH_CUDA = "torch:cuda"  # default dispatch on CUDA (Triton kernels where they apply)
    TORCH_CUDA_OPS = "torch:cuda-ops"  # torch ops forced on CUDA
    JAX = "jax"  # CPU, eager call (jit inside; the numba kernel through a host callback where installed)
    JAX_JIT = "jax:jit"  # CPU, called inside the user's own jax.jit
    JAX_XLA = "jax:xla"  # CPU, the array-API path under jit forced (what JAX runs without numba)
    JAX_HOST = "jax:host"  # CPU, the numba kernels through a host callback, forced (greedy policy; previous=)
    JAX_PALLAS = "jax:pallas-interpret"  # CPU, the Pallas kernels under Pallas' interpreter (no spill)
    JAX_GPU = "jax:gpu"  # default dispatch on a GPU (Pallas kernels where they apply)
    JAX_GPU_XLA = "jax:gpu-xla"  # XLA forced on a GPU

    @property
    def module(self) -> str:
        return self.value.split(":")[0]

    @property
    def gpu(self) -> bool:
        return self in (Backend.TORCH_CUDA, Backend.TORCH_CUDA_OPS, Backend.JAX_GPU, Backend.JAX_GPU_XLA)

    def available(self) -> bool:
        if not _has(self.module):
            return False
        if self.module == "torch" and self.gpu:
            return _torch_cuda()
        if self.module == "jax" and self.gpu:
            return _jax_gpu()
        if self in (Backend.NUMPY_NUMBA, Backend.JAX_HOST):
            return _numba()
        if self is Backend.JAX_PALLAS:
            from eplb.backends import _jax

            return _jax.pallas_available()
        return True

    def supports(self, *, policy: str = "greedy", spill: int = 0, previous: Any = None, **_: Any) -> bool:
        """Whether this implementation computes such a call (a front door computes every call)."""
        if self in (Backend.NUMPY_NUMBA, Backend.JAX_HOST):  # numba: the greedy kernel, and previous= (any policy)
            return previous is not None or (policy == "greedy" and not spill)
        if self is Backend.JAX_PALLAS:  # the greedy and refined kernels; no other policy has one
            return policy in ("greedy", "refined") and not spill and previous is None
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


def _forced(backend_module: Any, impl: str | None, validate: bool = True) -> Callable[..., Any]:
    """A call that validates through the public API, then runs ``backend_module`` with ``impl`` forced.

    With ``previous=`` it runs the module's ``rebalance_stable`` (its only
    implementation of that call, or the forced one where it has several).
    """

    def run(weight: Any, r: int, g: int, n: int, gpus: int, **kw: Any) -> Any:
        if validate:
            eplb.rebalance_experts(weight, r, g, n, gpus, **kw)
        hierarchical = kw.pop("hierarchical", None)
        hierarchical = (g % n == 0) if hierarchical is None else hierarchical
        # The options exactly as the public API passes them, so that JAX reuses the front door's compile.
        kw = {"policy": "greedy", "spill": 0, **kw}
        forced = {} if impl is None else {"impl": impl}
        previous = kw.pop("previous", None)
        if previous is not None:
            previous = previous.phy2log if isinstance(previous, eplb.Placement) else previous
            tolerance, max_moves = kw.pop("balance_tolerance", None), kw.pop("max_moves", None)
            kw.pop("check_values", None)
            return backend_module.rebalance_stable(
                weight,
                previous,
                r,
                g,
                n,
                gpus,
                hierarchical=hierarchical,
                tolerance=tolerance,
                max_moves=max_moves,
                **forced,
                **kw,
            )
        kw.pop("check_values", None)
        return backend_module.rebalance(weight, r, g, n, gpus, hierarchical=hierarchical, **forced, **kw)

    return run


def make_runner(backend: Backend) -> Runner:
    if backend is Backend.NUMPY:
        return Runner(backend, np.asarray, eplb.rebalance_experts)
    if backend in (Backend.NUMPY_XP, Backend.NUMPY_NUMBA):
        from eplb.backends import _numpy

        impl = "xp" if backend is Backend.NUMPY_XP else "numba"

        return Runner(backend, np.asarray, _forced(_numpy, impl))
    if backend.module == "torch":
        import torch

        device = "cuda" if backend.gpu else "cpu"

        def as_torch(a: np.ndarray) -> Any:
            return torch.as_tensor(np.asarray(a), device=device)

        if backend in (Backend.TORCH_OPS, Backend.TORCH_CUDA_OPS):
            from eplb.backends import _torch

            return Runner(backend, as_torch, _forced(_torch, "torch"))
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

    from eplb.backends import _jax

    if backend in (Backend.JAX_XLA, Backend.JAX_GPU_XLA):
        return Runner(backend, as_jax, _forced(_jax, "xla"))
    if backend is Backend.JAX_HOST:
        return Runner(backend, as_jax, _forced(_jax, "host"))
    if backend is Backend.JAX_PALLAS:
        return Runner(backend, as_jax, _pallas_interpreted)
    if backend is Backend.JAX_JIT:
        return Runner(backend, as_jax, _inside_jit)
    return Runner(backend, as_jax, eplb.rebalance_experts)


@functools.cache
def _jitted(sizes: tuple[int, ...], options: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    """A user's ``jax.jit`` around ``rebalance_experts`` with these sizes and options (one per call shape)."""
    import jax

    def call(weight: Any, previous: Any) -> tuple[Any, ...]:
        return tuple(eplb.rebalance_experts(weight, *sizes, previous=previous, **dict(options)))

    return jax.jit(call)


def _inside_jit(weight: Any, r: int, g: int, n: int, gpus: int, previous: Any = None, **kw: Any) -> Any:
    """``rebalance_experts`` traced inside the user's own ``jax.jit`` (``previous`` a traced argument too)."""
    if isinstance(previous, eplb.Placement):
        previous = previous.phy2log
    return _jitted((r, g, n, gpus), tuple(sorted(kw.items())))(weight, previous)


def _pallas_interpreted(weight: Any, r: int, g: int, n: int, gpus: int, **kw: Any) -> Any:
    """The Pallas kernel of the policy (greedy or refined) under Pallas' CPU interpreter, after validation."""
    from eplb.kernels import greedy_pallas, refined_pallas

    eplb.rebalance_experts(weight, r, g, n, gpus, **kw)
    hierarchical = kw.get("hierarchical")
    hierarchical = (g % n == 0) if hierarchical is None else hierarchical
    kernel = refined_pallas if kw.get("policy", "greedy") == "refined" else greedy_pallas
    return kernel.placement(weight, (r, g, n, gpus), hierarchical, interpret=True)


ALL_BACKENDS = list(Backend)
CPU_BACKENDS = [b for b in Backend if not b.gpu]
# One front door per framework on the CPU (the Pallas interpreter is slow: its own tests call it).
FRONT_DOORS = [Backend.NUMPY, Backend.TORCH, Backend.JAX]


def backend_params(backends: list[Backend]) -> list[Any]:
    """One param per backend; GPU ones are marked ``gpu`` (see :func:`needs_gpu`), and each skips where missing."""
    params = []
    for b in backends:
        marks = [pytest.mark.skipif(not b.available(), reason=f"{b.value} not available")]
        params.append(pytest.param(b, id=b.value, marks=[*marks, pytest.mark.gpu] if b.gpu else marks))
    return params


def _gpu_count(framework: str) -> int:
    if framework == "torch":
        if not _torch_cuda():
            return 0
        import torch

        return torch.cuda.device_count()
    if not _jax_gpu():
        return 0
    import jax

    return len(jax.devices("gpu"))


def needs_gpu(framework: str, count: int = 1) -> Callable[[Any], Any]:
    """Decorator: a GPU-only test, marked ``gpu`` and skipped without ``count`` GPUs for ``framework``.

    ``framework`` is ``"torch"`` (CUDA) or ``"jax"``. The ``gpu`` mark is what
    the skip count below allows: on a CPU machine only GPU-only tests may skip.
    """
    what = "a CUDA device for torch" if framework == "torch" else "a GPU for JAX"
    reason = f"needs {what}" if count == 1 else f"needs {count} GPUs ({framework})"
    skip = pytest.mark.skipif(_gpu_count(framework) < count, reason=reason)

    def decorate(obj: Any) -> Any:
        return pytest.mark.gpu(skip(obj))

    return decorate


# ---------------------------------------------------------------- the skip count
# Every run prints how many tests skipped and why. With EPLB_STRICT_SKIPS=1 (set by `tox -e cross`,
# which CI runs) a skip of anything but a GPU-only test fails the run: on the CPU machine the suite
# must run every test that does not need a GPU.

_SKIPS: dict[str, list[str]] = {"gpu": [], "other": []}


def pytest_configure(config: pytest.Config) -> None:
    """Compile eplb's numba kernels into numba's disk cache once, before the test processes start.

    A fresh checkout (CI) has a cold cache: every pytest worker, and every test's subprocess started before the
    cache is written, would compile the kernels (about 30 s of one core each) in eplb's background thread, which
    holds the GIL much of the time and slows the test it runs beside by as much (a CI run saw an interpreter
    test take 39 s and 79 s). Here two processes compile them (eplb's own cold-cache path,
    ``_numba.compile_in_subprocesses``), each about half (numba writes each cache entry on its own): about
    half that, once. Workers
    skip it (the controller did it); a warm cache makes it a 1-2 s load. Tests of a cold cache use their own
    ``NUMBA_CACHE_DIR``.
    """
    if hasattr(config, "workerinput") or importlib.util.find_spec("numba") is None:
        return
    from eplb.backends import _numba

    _numba.compile_in_subprocesses()  # (a failure shows in the tests that use the kernels, with its message)


# CI time: under `pytest -n 2 --dist loadfile` the two workers take whole test files in collection order, and
# alphabetical order puts the slowest files (the Triton and Pallas interpreter runs) near the end, where one worker
# can be left running one of them while the other idles. These files go first (longest first, from a CI run's
# durations); every other test keeps its place.
SLOW_FILES = (
    "test_cross_backend.py",
    "test_pallas_elastic.py",
    "test_kernels_speed_triton.py",
    "test_kernels_elastic_triton.py",
    "test_group_split_triton.py",
    "test_capacity_stable.py",
    "test_elastic.py",
    "test_triton.py",
    "test_triton_refined.py",
    "test_fast_cpu.py",
    "test_executors_jax.py",
    "test_pallas_repair.py",
    "test_polish_pallas.py",
    "test_kernels_repair_triton.py",
    "test_kernels_repair.py",
    "test_capacity.py",
)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[Any]) -> None:
    rank = {name: k for k, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: the rest in their order


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPS["gpu" if "gpu" in report.keywords else "other"].append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a whole module (a module-level importorskip)
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPS["other"].append(f"{report.nodeid}: {reason}")


def _strict() -> bool:
    return os.environ.get("EPLB_STRICT_SKIPS", "") == "1"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _strict() and _SKIPS["other"] and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    gpu, other = len(_SKIPS["gpu"]), len(_SKIPS["other"])
    terminalreporter.write_line(f"skip count: {gpu} GPU-only, {other} other")
    if other:
        verdict = "fails the run (EPLB_STRICT_SKIPS=1)" if _strict() else "allowed here (EPLB_STRICT_SKIPS unset)"
        terminalreporter.write_line(f"skips of tests that need no GPU, which {verdict}:")
        for line in _SKIPS["other"]:
            terminalreporter.write_line(f"  {line}")


@pytest.fixture(params=backend_params(ALL_BACKENDS))
def runner(request: pytest.FixtureRequest) -> Runner:
    """A :class:`Runner` for each installed backend (GPU ones skip without a GPU)."""
    return make_runner(request.param)


@pytest.fixture(autouse=True, scope="module")
def _release_jax_executables():
    """Drop JAX's compiled executables after every test module.

    Each XLA CPU executable keeps memory mappings: tests/test_elastic.py alone leaves about 8,700, and the whole
    suite in one process reached Linux's limit of 65,530 (``vm.max_map_count``), which ends in a segfault inside
    an XLA compile. ``jax.clear_caches()`` releases them (about 1,000 left after that module).
    """
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()


def run_under_triton_interpreter(script: str, timeout: float = 900) -> Any:
    """Run ``script`` (Python source) in a fresh process under Triton's CPU interpreter, the repository first on
    its path (the interpreter is chosen when Triton is imported, so it needs a process of its own), with the
    interpreter's repeat patching skipped (:mod:`tests.triton_interpreter`); returns the
    :class:`subprocess.CompletedProcess`, output captured as text."""
    import subprocess
    import textwrap
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    prelude = "from tests import triton_interpreter\ntriton_interpreter.install()\n"
    command = [sys.executable, "-c", prelude + textwrap.dedent(script)]
    return subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=timeout)


def interpreter_outputs_equal(script: str, arrays: dict, calls: list, want: dict, folder: Any) -> Any:
    """Run ``script`` under Triton's interpreter on saved cases and check its outputs against ``want``.

    ``script`` is a template with ``{path}``, ``{calls}`` and ``{result}`` (the ``.npz`` of ``arrays``, the
    JSON of ``calls``, the ``.npz`` it must write, printing ``ran <len(calls)>``); every array of ``want``
    must come back with its dtype and values. Returns the loaded outputs."""
    import json

    import numpy as np

    paths = {"path": folder / "cases.npz", "calls": folder / "calls.json", "result": folder / "out.npz"}
    np.savez(paths["path"], **arrays)
    paths["calls"].write_text(json.dumps(calls))
    run = run_under_triton_interpreter(script.format(**{k: str(v) for k, v in paths.items()}))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"ran {len(calls)}" in run.stdout, run.stdout
    got = np.load(paths["result"])
    assert sorted(got.files) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    return got


def run_kernel_check(check_source: str, shapes: list, device: str) -> None:
    """Run ``check(device)`` from ``check_source`` (Python defining ``check``, reading a global ``SHAPES``):
    on ``"cpu"`` in a fresh process under Triton's interpreter (:func:`run_under_triton_interpreter`), failing
    the test with its stderr; on ``"cuda"`` here."""
    source = check_source + f"\nSHAPES = {shapes!r}\n"
    if device == "cpu":
        run = run_under_triton_interpreter(source + "check('cpu')\nprint('ok')\n")
        assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-4000:]
        return
    namespace: dict = {}
    exec(source, namespace)
    namespace["check"](device)


def sm90_asm(kernel: Any, signature: dict, constants: dict) -> dict:
    """``kernel`` compiled ahead of time for sm_90 as the launchers compile it (``enable_fp_fusion=False``, no GPU
    needed): its ``asm`` by stage (``ttir``, ``ptx``, ...); skips where this Triton has no such API."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    try:
        source = ASTSource(kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constexprs=constants)
    except TypeError:
        pytest.skip("this Triton's ahead-of-time compile API differs")
    options = {"num_warps": 4, "enable_fp_fusion": False}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm
