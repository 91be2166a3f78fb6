"""The packing loops of placement by time compiled with numba (eplb.kernels.speed_numba) equal the array API.

Oracles: eplb.algorithms.speed.lpt_pack_speed, pair_pack_speed and refine_by_swaps_speed (themselves checked
against plain Python in tests/test_capacity.py), on tests/speed_cases.py's cases; then gpu_capacity= through
the numpy adapter with the kernels (impl=None, kernels loaded) against its array-API path (impl="xp"), on
tests/test_capacity.py's shapes and capacities and on the real DeepSeek-V3 loads.
"""

from __future__ import annotations

import numpy as np
import pytest

from . import cases
from .speed_cases import check_kernels
from .test_kernels_speed_triton import CAPACITY_CASES

pytest.importorskip("numba")


def test_kernels_equal_the_array_api():
    from eplb.kernels import speed_numba

    check_kernels(speed_numba, np.asarray, np.asarray)


def _both(weight, slots, groups, nodes, gpus, caps, hierarchical):
    from eplb.backends import _numba, _numpy

    _numba.warm_up()
    kw = {"hierarchical": hierarchical, "gpu_capacity": np.asarray(caps, np.float32)}
    return (
        _numpy.rebalance(weight, slots, groups, nodes, gpus, **kw),
        _numpy.rebalance(weight, slots, groups, nodes, gpus, impl="xp", **kw),
    )


@pytest.mark.parametrize("case", CAPACITY_CASES, ids=[str(c[:5]) + str(c[5][:3]) for c in CAPACITY_CASES])
def test_placement_by_time_equals_the_array_api(case, monkeypatch):
    from eplb.kernels import speed_numba

    experts, slots, groups, nodes, gpus, caps = case
    calls = []
    for name in ("lpt_pack_speed", "refine_by_swaps_speed"):  # the kernels do run
        original = getattr(speed_numba, name)
        monkeypatch.setattr(speed_numba, name, lambda *a, f=original, n=name, **k: calls.append(n) or f(*a, **k))
    rng = np.random.default_rng(experts + gpus)
    w = rng.lognormal(3, 1.2, (4, experts)).astype(np.float32)
    w[1] = 0  # an all-zero layer
    w[2] = 7  # all equal
    for hierarchical in (True, False) if nodes > 1 else (False,):
        got, want = _both(w, slots, groups, nodes, gpus, caps, hierarchical)
        for g, e in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, e)
    assert calls


@pytest.mark.parametrize(
    ("sizes", "hierarchical"), [((288, 8, 3, 144), False), ((288, 8, 4, 32), True), ((352, 8, 4, 32), True)]
)
def test_real_loads_equal_the_array_api(sizes, hierarchical):
    w = cases.deepseek_v3("prefill_in2048.json")
    assert w is not None, f"real loads expected at {cases.DATA}"
    caps = np.ones(sizes[3], np.float32)
    caps[1::2] = 0.6
    caps[3] = 0  # an idle GPU
    got, want = _both(w[:20], *sizes, caps, hierarchical)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, e)


def test_float32_only_and_no_fused_multiply_add(tmp_path):
    """The kernels round every float32 product and sum on its own (no FMA: no fast-math) and never widen to
    float64 (a Python float constant would); compiled afresh (inspection is off for cached code)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import numpy as np
from eplb.kernels import speed_numba as k
k.warm_up()
for kernel in (k._lpt, k._pair, k._swaps):
    for signature in kernel.signatures:
        asm = kernel.inspect_asm(signature).lower()
        assert "mulss" in asm, ("float32 products expected", kernel)
        for op in ("vfmadd", "vfmsub", "vfnmadd", "vfnmsub", "cvtss2sd", "cvtsd2ss", "addsd", "mulsd"):
            assert op not in asm, (kernel, op)
print("checked")
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0 and "checked" in done.stdout, done.stderr[-3000:]
