"""No Triton kernel takes a position (argmin, argmax) out of a tile that the compiler may reorder.

Triton's TTIR canonicalisation marks a ``tl.reshape`` whose result feeds a reduction ``allow_reorder``: on a GPU
the reshaped elements may then come in another order than row-major. An order-free reduction (min, max, an
integer sum) does not care, but an argmin or argmax returns a *position*, which then names another element.
The interpreter never reorders, so only a compile shows it: ``eplb.kernels.speed_triton``'s swap search took
the argmin of its ``[M, K]`` tile reshaped to 1-D, and on an H200 (Triton 3.6) it applied other swaps than the
ones it had scored (170 of 174 rows of the DeepSeek-V3 capacity placement differed from the array API, several
slower than where they started).

Each kernel that reshapes is compiled ahead of time for sm90 (no GPU needed) at the sizes the library launches
it with, and its TTIR is checked: no reduction of two operands (argmin's and argmax's ``(value, index)``) takes a
reordering reshape. ``repair_triton``'s lexicographic minimum reshapes its candidates too, but reduces each one
by value, the index carried as data (order-free), which the check allows.
"""

from __future__ import annotations

import importlib.util
import re

import pytest

from .conftest import sm90_asm

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _ttir(kernel, signature: dict, constants: dict) -> str:
    return sm90_asm(kernel, signature, constants)["ttir"]


_REORDERED = re.compile(r"(%[\w.]+) = tt\.reshape \S+ allow_reorder")
_TWO_OPERAND_REDUCE = re.compile(r'"tt\.reduce"\((%[\w.]+), (%[\w.]+)\)')


def positions_of_reordered_tiles(ttir: str) -> list[str]:
    """The two-operand reductions (argmin, argmax) of ``ttir`` that read a reshape marked ``allow_reorder``."""
    reordered = set(_REORDERED.findall(ttir))
    found = []
    for line in ttir.splitlines():
        reduce = _TWO_OPERAND_REDUCE.search(line)
        if reduce and reordered & set(reduce.groups()):
            found.append(line.strip())
    return found


def _cases() -> list[tuple[str, object, dict, dict]]:
    from eplb.algorithms.loads import MAX_LOAD
    from eplb.algorithms.refine import IMPROVEMENT
    from eplb.kernels import group_split_triton as gs
    from eplb.kernels import repair_triton as rt
    from eplb.kernels import speed_triton as st

    swaps = {"load_ptr": "*fp32", "s2i_ptr": "*i64", "inv_ptr": "*fp32", "live_ptr": "*i8", "limit_ptr": "*fp32"}
    swaps |= {"out_ptr": "*i64", "iters": "i32"}
    split = {"weight_ptr": "*fp32", "prev_ptr": "*i64", "out_ptr": "*i64", "valid_ptr": "*i1", "active_ptr": "*i1"}
    split |= {"table_ptr": "*fp32", "active_stride": "i32"}
    repair = dict.fromkeys(("cur_ptr", "cnt_ptr", "old_ptr", "budget_ptr", "moved_ptr"), "*i64")
    repair |= dict.fromkeys(("w_ptr", "limit_ptr", "recip_ptr", "fs_ptr"), "*fp32")
    repair |= {"valid_ptr": "*i32", "is_ptr": "*i32", "max_iters": "i32"}
    lpt = {"weight_ptr": "*fp32", "active_ptr": "*i1", "table_ptr": "*fp32", "out_ptr": "*i64"}
    lpt |= {"active_stride": "i32"}
    split_sizes = {"E": 256, "R": 288, "RP": 512, "N": 4, "NP": 4, "IMPROVE": IMPROVEMENT, "GPUS": 32, "GPUSP": 32}
    return [
        # 288 slots on 32 GPUs (9 a GPU: a padded [32, 16] tile) and on 144 GPUs (2 a GPU)
        ("swaps", st._swaps_kernel, swaps, {"N": 288, "M": 32, "K": 9, "MP": 32, "KP": 16, "IMPROVE": IMPROVEMENT}),
        ("swaps", st._swaps_kernel, swaps, {"N": 288, "M": 144, "K": 2, "MP": 256, "KP": 2, "IMPROVE": IMPROVEMENT}),
        ("split", gs._split_kernel, split, {**split_sizes, "G": 8, "GS": 32, "ELASTIC": True, "SWAPS": 1}),
        ("split", gs._split_kernel, split, {**split_sizes, "G": 16, "GS": 16, "ELASTIC": False, "SWAPS": 2}),
        ("lpt split", gs._lpt_split_kernel, lpt, {"E": 256, "R": 288, "G": 8, "GP": 8, "N": 4, "NP": 4, "GS": 32,
                                                  "GPUS": 32, "GPUSP": 32, "BY_CAPACITY": True, "MOST": MAX_LOAD}),
        ("repair", rt.repair_kernel, repair, rt._meta_repair(288, 256, 32, 4, 32)),
    ]  # fmt: skip


def test_the_check_sees_an_argmin_of_a_reordered_reshape():
    """The check itself: the swap search as it was (argmin of the reshaped tile) is caught."""
    import triton
    import triton.language as tl

    @triton.jit
    def argmin_of_reshape(x_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr):
        x = tl.load(x_ptr + tl.arange(0, M)[:, None] * K + tl.arange(0, K)[None, :])
        tl.store(out_ptr, tl.argmin(tl.reshape(x, [M * K]), axis=0, tie_break_left=True))

    ttir = _ttir(argmin_of_reshape, {"x_ptr": "*fp32", "out_ptr": "*i32"}, {"M": 32, "K": 16})
    assert positions_of_reordered_tiles(ttir)


@pytest.mark.parametrize("case", range(6), ids=["swaps-32", "swaps-144", "split-8", "split-16", "lpt-split", "repair"])
def test_no_position_is_taken_out_of_a_reordered_tile(case):
    name, kernel, signature, constants = _cases()[case]
    ttir = _ttir(kernel, signature, constants)
    assert "tt.reduce" in ttir, name  # the compile went through and holds reductions
    assert positions_of_reordered_tiles(ttir) == [], name


def test_every_kernel_module_that_reshapes_is_compiled_here():
    """A new ``tl.reshape`` in a kernel module not compiled above would escape the check: name it in _cases."""
    from pathlib import Path

    import eplb.kernels

    folder = Path(eplb.kernels.__file__).parent
    reshaping = {path.stem for path in folder.glob("*_triton.py") if "tl.reshape(" in path.read_text()}
    compiled = {kernel.fn.__module__.rsplit(".", 1)[-1] for _, kernel, _, _ in _cases()}
    assert reshaping, "no kernel module reshapes: the check would be empty"
    assert reshaping <= compiled, sorted(reshaping - compiled)
