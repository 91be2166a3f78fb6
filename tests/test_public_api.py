"""The public surface: exported names and docs, lazy imports, layering, result types.

Also the JAX contract: works inside a user's ``jax.jit`` and ``jax.vmap``,
returns int32 without x64, and never flips global flags (x64 is only ever
turned on in a subprocess here).
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

import eplb

PACKAGE = Path(eplb.__file__).resolve().parent
ROOT = PACKAGE.parent
GOLDEN = [
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
]
GOLDEN_PHY2LOG = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]
CONFIG = (16, 4, 2, 8)


def _run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter with eplb importable; its stdout (fails on error)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# ---------------------------------------------------------------- names and docs


def test_all_lists_exactly_the_public_names():
    """``eplb.__all__`` names every public non-module attribute, each exactly once, and all exist."""
    assert len(eplb.__all__) == len(set(eplb.__all__))
    for name in eplb.__all__:
        assert hasattr(eplb, name), name
    public = {
        name
        for name, value in vars(eplb).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(eplb.__all__)


def test_core_names_exported():
    """The drop-in entry point and the building blocks are public."""
    assert {"rebalance_experts", "balanced_packing", "replicate_experts", "Placement"} <= set(eplb.__all__)


@pytest.mark.parametrize("name", eplb.__all__)
def test_public_docstrings(name):
    """Every public function documents Parameters and Returns; every public class has a docstring."""
    obj = getattr(eplb, name)
    doc = inspect.getdoc(obj)
    assert doc, f"eplb.{name} has no docstring"
    if inspect.isfunction(obj):
        for section in ("Parameters", "Returns"):
            assert re.search(rf"^{section}\n-+$", doc, re.MULTILINE), f"eplb.{name} lacks a {section} section"
    else:
        assert re.search(r"^(Attributes|Parameters)\n-+$", doc, re.MULTILINE), f"eplb.{name} lacks Attributes"


# ---------------------------------------------------------------- imports


def test_import_loads_no_framework():
    """``import eplb`` in a fresh interpreter leaves torch and jax unimported."""
    out = _run_python(
        """
        import sys
        import eplb
        print(sorted(m for m in ("torch", "jax", "jaxlib") if m in sys.modules))
        """
    )
    assert out.strip() == "[]"


def test_works_with_numpy_only():
    """With torch and jax unimportable, ``import eplb`` and a numpy call still work."""
    out = _run_python(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "jax", "jaxlib"):
                    raise ImportError(f"blocked {name}")
                return None

        sys.meta_path.insert(0, Block())
        import eplb
        w = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86]]
        print(eplb.rebalance_experts(w, 16, 4, 2, 8).phy2log.tolist())
        """
    )
    assert out.strip() == str(GOLDEN_PHY2LOG[:1])


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports (anywhere in the file)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            # ``from eplb import _xp`` imports the module eplb._xp.
            names.extend(f"{module}.{alias.name}" for alias in node.names)
    return names


def _allowed_in_algorithms(name: str) -> bool:
    top = name.split(".")[0]
    if top in sys.stdlib_module_names:
        return True
    return name.startswith(("eplb._xp", "eplb.algorithms.")) or name in ("eplb.algorithms",)


def test_algorithms_import_only_stdlib_and_xp():
    """Modules in eplb/algorithms/ import only the standard library, eplb._xp and eplb.algorithms.*."""
    files = sorted((PACKAGE / "algorithms").glob("*.py"))
    assert files
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in _imported_modules(path)
        if not _allowed_in_algorithms(name)
    ]
    assert not offenders, "algorithm layer imports outside stdlib/_xp:\n" + "\n".join(offenders)


def test_layering_check_catches_offenders():
    """The import parser resolves the forms used in eplb, so the layering test can fail."""
    assert not _allowed_in_algorithms("numpy")
    assert not _allowed_in_algorithms("eplb.backends._torch")
    assert not _allowed_in_algorithms("torch.nn")
    assert _allowed_in_algorithms("eplb._xp")
    assert _allowed_in_algorithms("__future__.annotations")


# Ways of setting a global flag: jax.config.update(...), torch.set_default_dtype/device, the
# x64 option name as a string literal, or its environment variable.
FLAG_PATTERN = re.compile(r"""config\.update|torch\.set_default_|["']jax_enable_x64["']|JAX_ENABLE_X64""")


def test_no_global_flags():
    """No module under eplb/ sets JAX config or torch defaults (x64, default dtype/device)."""
    offenders = [
        f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for lineno, line in enumerate(path.read_text().splitlines(), 1)
        if FLAG_PATTERN.search(line)
    ]
    assert not offenders, "global flags set in eplb:\n" + "\n".join(offenders)


def test_global_flag_pattern_matches():
    """FLAG_PATTERN catches the usual ways of setting the flags."""
    for line in (
        'jax.config.update("jax_enable_x64", True)',
        "torch.set_default_dtype(torch.float64)",
        'os.environ["JAX_ENABLE_X64"] = "1"',
        "with jax.experimental.enable_x64('jax_enable_x64'):",
    ):
        assert FLAG_PATTERN.search(line), line


# ---------------------------------------------------------------- result type


def test_placement_unpacks_and_has_fields():
    """The result unpacks into 3 arrays and exposes phy2log, log2phy, logcnt."""
    result = eplb.rebalance_experts(np.array(GOLDEN), *CONFIG)
    assert isinstance(result, eplb.Placement)
    assert eplb.Placement._fields == ("phy2log", "log2phy", "logcnt")
    phy2log, log2phy, logcnt = result
    assert phy2log is result.phy2log and log2phy is result.log2phy and logcnt is result.logcnt
    assert phy2log.shape == (2, 16) and log2phy.shape == (2, 12, 5) and logcnt.shape == (2, 12)
    assert phy2log.tolist() == GOLDEN_PHY2LOG


@pytest.mark.parametrize(
    "weight", [np.array(GOLDEN), GOLDEN, tuple(map(tuple, GOLDEN))], ids=["ndarray", "list", "tuple"]
)
def test_numpy_and_lists_give_int64_numpy(weight):
    """numpy arrays, lists and tuples give int64 numpy arrays."""
    for out in eplb.rebalance_experts(weight, *CONFIG):
        assert type(out) is np.ndarray
        assert out.dtype == np.int64


def test_torch_cpu_gives_int64_torch_cpu():
    """A torch CPU tensor gives int64 torch CPU tensors (default path and forced torch ops)."""
    torch = pytest.importorskip("torch")
    from eplb.backends import _torch

    weight = torch.tensor(GOLDEN)
    default = eplb.rebalance_experts(weight, *CONFIG)
    forced = _torch.rebalance(weight, *CONFIG, hierarchical=True, impl="torch")
    for out in (*default, *forced):
        assert isinstance(out, torch.Tensor)
        assert out.device.type == "cpu"
        assert out.dtype == torch.int64
    assert default.phy2log.tolist() == GOLDEN_PHY2LOG


def test_building_blocks_follow_input_kind():
    """balanced_packing and replicate_experts return arrays of the input's kind, integer dtype."""
    torch = pytest.importorskip("torch")
    weight = np.array(GOLDEN)
    for x, kind in ((weight, np.ndarray), (torch.tensor(weight), torch.Tensor)):
        for out in (*eplb.balanced_packing(x, 4), *eplb.replicate_experts(x, 16)):
            assert isinstance(out, kind)
            assert str(out.dtype).endswith("int64")


# ---------------------------------------------------------------- JAX


@pytest.fixture(scope="module")
def jax():
    return pytest.importorskip("jax")


def test_jax_gives_int32_jax_on_cpu(jax):
    """A JAX CPU array gives JAX arrays on the CPU, int32 (x64 off), same as numpy."""
    assert not jax.config.jax_enable_x64
    on_cpu = jax.device_put(jax.numpy.asarray(GOLDEN), jax.devices("cpu")[0])  # a GPU machine's default is the GPU
    result = eplb.rebalance_experts(on_cpu, *CONFIG)
    expected = eplb.rebalance_experts(np.array(GOLDEN), *CONFIG)
    for out, exp in zip(result, expected, strict=True):
        assert isinstance(out, jax.Array)
        assert {d.platform for d in out.devices()} == {"cpu"}
        assert out.dtype == np.int32
        np.testing.assert_array_equal(np.asarray(out), exp)
    for out in (
        *eplb.balanced_packing(jax.numpy.asarray(GOLDEN), 4),
        *eplb.replicate_experts(jax.numpy.asarray(GOLDEN), 16),
    ):
        assert isinstance(out, jax.Array) and out.dtype == np.int32


def test_jax_inside_user_jit(jax):
    """Called inside the user's jax.jit (loads are tracers), the result equals numpy's."""

    @jax.jit
    def step(weight):
        phy2log, log2phy, logcnt = eplb.rebalance_experts(weight * 2, *CONFIG)
        return phy2log, log2phy, logcnt

    expected = eplb.rebalance_experts(np.array(GOLDEN) * 2, *CONFIG)
    for out, exp in zip(step(jax.numpy.asarray(GOLDEN)), expected, strict=True):
        np.testing.assert_array_equal(np.asarray(out), exp)


def test_jax_vmap_over_problems(jax):
    """vmap over a leading stacked-problems axis [P, L, E] equals P separate numpy calls."""
    rng = np.random.default_rng(0)
    weights = rng.integers(0, 1000, (3, 4, 12)).astype(np.int32)
    weights[1] = weights[1, :, ::-1]  # another ordering
    weights[2, 0] = 5  # a row of ties
    outs = jax.vmap(lambda w: tuple(eplb.rebalance_experts(w, *CONFIG)))(jax.numpy.asarray(weights))
    assert [o.shape for o in outs] == [(3, 4, 16), (3, 4, 12, 5), (3, 4, 12)]
    for p in range(3):
        for out, exp in zip(outs, eplb.rebalance_experts(weights[p], *CONFIG), strict=True):
            np.testing.assert_array_equal(np.asarray(out[p]), exp)


def test_jax_does_not_turn_on_x64(jax):
    """Running eplb on JAX inputs leaves jax_enable_x64 off."""
    eplb.rebalance_experts(jax.numpy.asarray(GOLDEN), *CONFIG)
    assert not jax.config.jax_enable_x64


X64_SCRIPT = """
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np, jax.numpy as jnp, eplb
    rng = np.random.default_rng(0)
    # (E, R, groups, nodes, gpus): hierarchical, global fallback, one slot per GPU.
    for e, *config in [(12, 16, 4, 2, 8), (20, 30, 3, 2, 6), (10, 10, 2, 2, 10)]:
        weight = rng.integers(0, 1000, (3, e))
        got = eplb.rebalance_experts(jnp.asarray(weight), *config)
        expected = eplb.rebalance_experts(weight, *config)
        same = all(np.array_equal(np.asarray(g), x) for g, x in zip(got, expected))
        print(e, same, *[str(g.dtype) for g in got])
"""


@pytest.fixture(scope="module")
def x64_report():
    """Per config: 'E same dtype dtype dtype' lines from a subprocess with x64 on."""
    pytest.importorskip("jax")
    return [line.split() for line in _run_python(X64_SCRIPT).splitlines()]


def test_jax_x64_same_placement(x64_report):
    """With x64 turned on by the user, JAX placements still equal numpy's."""
    assert len(x64_report) == 3
    assert all(same == "True" for _, same, *_ in x64_report), x64_report


def test_jax_x64_int64_outputs(x64_report):
    """With x64 on, all three outputs are JAX's default integer, int64, for every config."""
    assert all(dtypes == ["int64"] * 3 for _, _, *dtypes in x64_report), x64_report


# ---------------------------------------------------------------- failures that must not hide


def test_broken_numba_warns_once(monkeypatch):
    """numba installed but failing to import: one RuntimeWarning naming the error, then the reference path."""
    import warnings

    from eplb.backends import _numba

    monkeypatch.setattr(_numba.importlib.util, "find_spec", lambda name: object())  # "installed"
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    _numba.available.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="numba is installed but failed to import"):
            assert _numba.available() is False
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _numba.available() is False  # once per process
            placement = eplb.rebalance_experts(np.array(GOLDEN), *CONFIG)
        np.testing.assert_array_equal(placement.phy2log, GOLDEN_PHY2LOG)
    finally:
        _numba.available.cache_clear()


def test_missing_numba_is_silent(monkeypatch):
    from eplb.backends import _numba

    monkeypatch.setattr(_numba.importlib.util, "find_spec", lambda name: None)
    _numba.available.cache_clear()
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _numba.available() is False
    finally:
        _numba.available.cache_clear()


def test_doctest_collector_hides_only_missing_optional_dependencies(monkeypatch):
    """The repository conftest skips a module whose optional framework is absent, and nothing else."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eplb_root_conftest", ROOT / "conftest.py")
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    module = PACKAGE / "backends" / "_triton.py"

    def failing(error: BaseException):
        def import_module(name: str) -> None:
            raise error

        return import_module

    monkeypatch.setattr(root_conftest.importlib, "import_module", failing(ModuleNotFoundError("x", name="triton")))
    assert root_conftest.pytest_ignore_collect(module, None) is True
    for error in (ModuleNotFoundError("x", name="eplb.typo"), ImportError("cannot import name 'f'"), SyntaxError("x")):
        monkeypatch.setattr(root_conftest.importlib, "import_module", failing(error))
        with pytest.raises(type(error)):
            root_conftest.pytest_ignore_collect(module, None)
