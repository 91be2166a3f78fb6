"""Equals :func:`eplb.algorithms.polish.polish` bit for bit (Triton): the swaps back toward ``old`` on CUDA.

Same arguments as :func:`eplb.algorithms.stability.stabilize` passes its ``polish_fn`` (``xp`` is accepted and
not used), so it also equals :mod:`eplb.kernels.polish_numba`.

Proved by ``tests/test_polish_triton.py``: Triton's CPU interpreter against the array-API function and the
numba kernel on random small inputs (hierarchical and global, 1..4 nodes, 1..4 GPUs per node, 1..5 slots per
GPU, one expert, tied and all-zero loads, limits below, at and above the placement's heaviest GPU and among
its GPU loads, ``max_iters`` 1, 2 and large, int32 ids) and degenerate ones (one GPU per node, ``max_iters``
0, ids of ``old`` outside ``[0, E)``), and ``place_stable`` on torch CPU tensors with it as ``polish_fn``
against numpy; an sm_90 compile whose PTX has no fused multiply-add and whose TTIR takes no position out of a
reordered tile; on CUDA, the arguments ``stabilize`` passes it for the DeepSeek-V3 loads (288 slots on 32
GPUs in 4 nodes, and on 144 GPUs) against numba and the array API, and ``previous=`` with
``balance_tolerance=0.005`` on torch CUDA tensors against numpy, without a host sync.

One program per row (grid ``[B]``), in the steps of :mod:`eplb.kernels.polish_numba` with the same float32
arithmetic and tie rules, vectorised over a step's candidates instead of scalar loops:

- replica loads ``w * fl(1/c)`` (the table of :func:`eplb._xp.reciprocal_table`) are written to a scratch
  buffer and read back as slot loads, so no product meets an addition in one expression, and the launcher
  compiles with ``enable_fp_fusion=False`` as well (Triton on sm_90 would contract ``a * b + c`` into an
  FMA); GPU loads are summed left to right from the first slot, a swap's changed loads are ``(load - out) +
  in``; every ``+`` and ``-`` has two float32 operands, and no division decides anything;
- copies of each expert on each GPU, now and in ``old`` (``[G, E]`` tables in a scratch buffer), are counted
  once and updated in place after a swap (four entries); replica counts never change, so neither does any
  replica load: a swap trades two slot loads, and the GPU loads of the next step are summed again (a GPU the
  swap does not touch sums the same values, to the same bits, as the reference's full re-sum);
- each step compacts the slots that hold a new pair (their GPU holds more copies of their expert than ``old``
  does there) and scores, per block of them, every partner ``u`` of the slot's node as one ``[slots,
  node's slots]`` tile, masked to the partners whose GPU held the slot's expert in ``old``: every swap that
  lowers the moves is seen so (the candidate restriction of :mod:`eplb.kernels.polish_numba`, exact: its
  change ``[x_i not in old on g_j] + [x_j not in old on g_i] - new_i - new_j`` is below 0 only if some side
  holds a new pair whose expert its partner's GPU held in ``old``);
- the step's swap is the lexicographic minimum (change in moves, max of the two changed loads, ``i * R + j``
  with ``i < j``) of the allowed pairs, by three order-free reductions per tile (each over rows, then
  columns: no ``tl.reshape`` and no argmin, so a compiler's reordering of a tile cannot name another pair)
  and a running minimum across tiles; a pair seen from both sides has one key. A row stops, on the device
  (no host sync), at the first step without an allowed swap or after ``max_iters`` steps.

Shapes beyond :func:`fits` go to the array-API path.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from eplb import _xp
from eplb.kernels.greedy_triton import ensure_cache_dir
from eplb.kernels.relabel_triton import _on_device

__all__ = ["fits", "polish"]

_BIG = tl.constexpr(2**30)

MAX_SLOTS = 4096  # a pair's index i * R + j stays within int32
MAX_EXPERTS = 4096
MAX_TABLE = 2**18  # GPUs * experts: the two copy tables of a row (int32) in the scratch buffer, 2 MiB a row
_TILE = 4096  # elements of the search's [new-pair slots, node's slots] tile
_BLOCK = 1024  # elements of the setup loops' 1-D blocks
# One program per row and a few dozen rows: the GPU is mostly idle, so each program's tiles take more threads.
# On an H100 the failure re-plan's polish (144 GPUs, a node down, up to 58 swaps a row) took 12.2 ms at 4
# warps, 7.3 at 8, 5.9 at 16 (same results; tiles of 8192 elements were slower).
_WARPS = 16


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def fits(num_phy: int, num_log: int, num_gpus: int, num_nodes: int) -> bool:
    """Whether :func:`polish` takes ``stabilize``'s arrays at these sizes (else the array-API path runs)."""
    if not (num_gpus > 0 and num_nodes > 0 and num_phy % num_gpus == 0 and num_gpus % num_nodes == 0):
        return False
    if not (0 < num_log <= MAX_EXPERTS and 0 < num_phy <= MAX_SLOTS):
        return False
    return _pow2(num_phy // num_nodes) <= _TILE and num_gpus * num_log <= MAX_TABLE


@triton.jit
def _min_of_tile(values):
    """The least element of a 2-D tile: rows, then columns (order-free, no reshape)."""
    return tl.min(tl.min(values, axis=1), axis=0)


@triton.jit
def _count_copies(ids, table, R: tl.constexpr, E: tl.constexpr, K: tl.constexpr, BR: tl.constexpr):
    """``table [G, E]`` (zeros) gets, for each expert of ``ids [R]``, its copies on its GPU (int32).

    An id outside ``[0, E)`` is no expert (as the reference counts ``old == expert``): not written."""
    s = tl.arange(0, BR)
    for first in range(0, R, BR):
        t = first + s
        x = tl.load(ids + t, mask=t < R, other=0)
        ok = (t < R) & (x >= 0) & (x < E)
        x = x.to(tl.int32)
        lo = (t // K) * K
        have = tl.zeros([BR], tl.int32)
        for d in range(K):
            have += (tl.load(ids + lo + d, mask=ok, other=-1).to(tl.int32) == x).to(tl.int32)
        # (a GPU's copies of one expert store the same count)
        tl.store(table + (t // K) * E + x, have, mask=ok)


@triton.jit
def polish_kernel(
    cur_ptr,
    cnt_ptr,
    old_ptr,
    w_ptr,
    limit_ptr,
    recip_ptr,
    fs_ptr,
    is_ptr,
    max_iters,
    R: tl.constexpr,
    E: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    PNODE: tl.constexpr,
    BR: tl.constexpr,
    BE: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    P_G: tl.constexpr,
    P_N: tl.constexpr,
):
    """``cur [B, R]`` (int64, holding the start) polished in place; ``cnt [B, E]`` its replica counts."""
    row = tl.program_id(0).to(tl.int64)
    cur = cur_ptr + row * R
    cnt = cnt_ptr + row * E
    old = old_ptr + row * R
    w = w_ptr + row * E
    replica = fs_ptr + row * (E + R + G)  # replica load of each expert, slot loads, GPU loads
    slot = replica + E
    gpu_load = slot + R
    now = is_ptr + row * (2 * G * E + 2 * R)  # [G, E]: copies of each expert on each GPU now, and in old
    was = now + G * E
    fresh = was + G * E  # [R]: 1 where a slot holds a new pair
    listed = fresh + R  # the slots holding new pairs, in order (the first ``m``)
    lim = tl.load(limit_ptr + row)
    inf = float("inf")

    # Replica loads w * fl(1/c), stored and read back below as slot loads (no product meets an addition).
    f = tl.arange(0, BE)
    for first in range(0, E, BE):
        e = first + f
        e_ok = e < E
        c = tl.load(cnt + e, mask=e_ok, other=0)
        load = tl.load(w + e, mask=e_ok, other=0.0) * tl.load(recip_ptr + c, mask=e_ok, other=0.0)
        tl.store(replica + e, load, mask=e_ok)
    z = tl.arange(0, BT)
    for first in range(0, 2 * G * E, BT):
        tl.store(now + first + z, tl.zeros([BT], tl.int32), mask=first + z < 2 * G * E)
    tl.debug_barrier()
    _count_copies(cur, now, R, E, K, BR)
    _count_copies(old, was, R, E, K, BR)
    s = tl.arange(0, BR)
    for first in range(0, R, BR):
        t = first + s
        ok = t < R
        x = tl.load(cur + t, mask=ok, other=0)
        tl.store(slot + t, tl.load(replica + x, mask=ok, other=0.0), mask=ok)
    tl.debug_barrier()

    g = tl.arange(0, P_G)
    g_ok = g < G
    v = tl.arange(0, P_N)
    v_ok = v < PNODE
    q0 = tl.arange(0, BS)
    it = 0
    going = max_iters > 0
    while going:
        # GPU loads, left to right from the first slot.
        total = tl.load(slot + g * K, mask=g_ok, other=0.0)
        for k in range(1, K):
            total = total + tl.load(slot + g * K + k, mask=g_ok, other=0.0)
        tl.store(gpu_load + g, total, mask=g_ok)
        # The slots holding a new pair, flagged and compacted (a swap lowers the moves only from one of them).
        m = tl.zeros([], tl.int32)
        for first in range(0, R, BR):
            t = first + s
            ok = t < R
            x = tl.load(cur + t, mask=ok, other=0).to(tl.int32)
            at = (t // K) * E + x
            new_pair = (ok & (tl.load(now + at, mask=ok, other=0) > tl.load(was + at, mask=ok, other=0))).to(tl.int32)
            tl.store(fresh + t, new_pair, mask=ok)
            tl.store(listed + m + tl.cumsum(new_pair, axis=0) - new_pair, t, mask=new_pair != 0)
            m += tl.sum(new_pair, axis=0)
        tl.debug_barrier()

        # Every pair (slot s of the list, slot u of its node), the lexicographic minimum of the allowed ones.
        best_change = tl.full([], 1, tl.int32)  # (no allowed swap changes the moves by 1 or more)
        best_load = tl.full([], inf, tl.float32)
        best_pair = tl.full([], _BIG, tl.int32)
        for first in range(0, m, BS):
            q = first + q0
            q_ok = q < m
            s_slot = tl.load(listed + q, mask=q_ok, other=0)
            x_s = tl.load(cur + s_slot, mask=q_ok, other=0).to(tl.int32)
            g_s = s_slot // K
            u = ((s_slot // PNODE) * PNODE)[:, None] + v[None, :]  # [BS, P_N]: the slots of s's node
            g_u = u // K
            pair = (q_ok[:, None] & v_ok[None, :]) & (g_u != g_s[:, None])
            su_was = tl.load(was + g_u * E + x_s[:, None], mask=pair, other=0)
            su_now = tl.load(now + g_u * E + x_s[:, None], mask=pair, other=1)
            pair = pair & (su_was > 0) & (su_now == 0)  # u's GPU held s's expert in old, and holds none now
            x_u = tl.load(cur + u, mask=pair, other=0).to(tl.int32)
            pair = pair & (x_u != x_s[:, None])
            us_now = tl.load(now + g_s[:, None] * E + x_u, mask=pair, other=1)
            pair = pair & (us_now == 0)
            us_was = tl.load(was + g_s[:, None] * E + x_u, mask=pair, other=0)
            u_fresh = tl.load(fresh + u, mask=pair, other=0)
            change = (su_was == 0).to(tl.int32) + (us_was == 0).to(tl.int32) - 1 - u_fresh  # s holds a new pair
            y_s = tl.load(slot + s_slot, mask=q_ok, other=0.0)
            y_u = tl.load(slot + u, mask=pair, other=0.0)
            less_s = tl.load(gpu_load + g_s, mask=q_ok, other=0.0) - y_s
            new_s = less_s[:, None] + y_u
            new_u = (tl.load(gpu_load + g_u, mask=pair, other=0.0) - y_u) + y_s[:, None]
            allowed = pair & (change < 0) & (new_s <= lim) & (new_u <= lim)
            peak = tl.where(new_s >= new_u, new_s, new_u)
            index = tl.minimum(s_slot[:, None], u) * R + tl.maximum(s_slot[:, None], u)  # (i, j) row-major, i < j
            least_change = _min_of_tile(tl.where(allowed, change, 1))
            chosen = allowed & (change == least_change)
            least_load = _min_of_tile(tl.where(chosen, peak, inf))
            chosen = chosen & (peak == least_load)
            first_pair = _min_of_tile(tl.where(chosen, index, _BIG))
            lower_load = (least_load < best_load) | ((least_load == best_load) & (first_pair < best_pair))
            better = (least_change < best_change) | ((least_change == best_change) & lower_load)
            better = (least_change < 0) & better
            best_change = tl.where(better, least_change, best_change)
            best_load = tl.where(better, least_load, best_load)
            best_pair = tl.where(better, first_pair, best_pair)

        # The swap applied: slots, slot loads, copies now (read by every thread before any writes).
        found = best_change < 0
        i = tl.where(found, best_pair // R, 0)
        j = tl.where(found, best_pair % R, 0)
        x_i = tl.load(cur + i)
        x_j = tl.load(cur + j)
        y_i = tl.load(slot + i)
        y_j = tl.load(slot + j)
        i_out = now + (i // K) * E + x_i
        j_in = now + (j // K) * E + x_i
        j_out = now + (j // K) * E + x_j
        i_in = now + (i // K) * E + x_j
        n_i_out = tl.load(i_out)
        n_j_in = tl.load(j_in)
        n_j_out = tl.load(j_out)
        n_i_in = tl.load(i_in)
        tl.debug_barrier()
        tl.store(cur + i, x_j, mask=found)
        tl.store(cur + j, x_i, mask=found)
        tl.store(slot + i, y_j, mask=found)
        tl.store(slot + j, y_i, mask=found)
        tl.store(i_out, n_i_out - 1, mask=found)  # four distinct entries: x_i != x_j, and the GPUs differ
        tl.store(j_in, n_j_in + 1, mask=found)
        tl.store(j_out, n_j_out - 1, mask=found)
        tl.store(i_in, n_i_in + 1, mask=found)
        it += 1
        going = found & (it < max_iters)
        tl.debug_barrier()


def _meta(num_phy: int, num_log: int, num_gpus: int, num_nodes: int) -> dict[str, int]:
    per_node = num_phy // num_nodes
    return {
        "R": num_phy,
        "E": num_log,
        "G": num_gpus,
        "K": num_phy // num_gpus,
        "PNODE": per_node,
        "BR": min(_pow2(num_phy), _BLOCK),
        "BE": min(_pow2(num_log), _BLOCK),
        "BT": min(_pow2(2 * num_gpus * num_log), _BLOCK),
        "BS": max(1, min(_pow2(num_phy), _TILE // _pow2(per_node))),
        "P_G": _pow2(num_gpus),
        "P_N": _pow2(per_node),
    }


def polish(
    phy2log: torch.Tensor,
    counts: torch.Tensor,
    old: torch.Tensor,
    weight: torch.Tensor,
    limit: torch.Tensor,
    num_gpus: int,
    num_nodes: int,
    max_iters: int,
    *,
    xp: Any = None,
) -> torch.Tensor:
    """:func:`eplb.algorithms.polish.polish` (same arguments; ``xp`` is not used): one launch.

    ``phy2log``, ``old`` ``[B, R]`` and ``counts [B, E]`` integer, ``weight [B, E]`` and ``limit [B, 1]``
    float32, all on one device (CUDA, or CPU under ``TRITON_INTERPRET=1``). Returns ``phy2log [B, R]`` in its
    dtype, on its device. ``phy2log``'s ids must lie in ``[0, E)`` and counts in ``[0, R]`` (not checked: that
    would read values on the host); an id of ``old`` outside ``[0, E)`` is no expert, as in the reference.
    """
    batch, num_phy = phy2log.shape
    num_log = weight.shape[1]
    device = phy2log.device
    if not fits(num_phy, num_log, num_gpus, num_nodes):
        raise ValueError(f"the polish kernel does not take {num_phy} slots, {num_log} experts, {num_gpus} GPUs")
    cur = phy2log.to(dtype=torch.int64, memory_format=torch.contiguous_format, copy=True)
    if batch == 0:
        return cur.to(phy2log.dtype)
    floats = torch.empty(batch * (num_log + num_phy + num_gpus), dtype=torch.float32, device=device)
    ints = torch.empty(batch * (2 * num_gpus * num_log + 2 * num_phy), dtype=torch.int32, device=device)
    args = (
        cur,
        counts.to(device=device, dtype=torch.int64).contiguous(),
        old.to(device=device, dtype=torch.int64).contiguous(),
        weight.to(device=device, dtype=torch.float32).contiguous(),
        limit.to(device=device, dtype=torch.float32).reshape(batch).contiguous(),
        _xp.reciprocal_table(num_phy, xp=torch, device=device),  # float32 [R + 1], kept per CUDA device
        floats,
        ints,
        int(max_iters),
    )
    ensure_cache_dir()
    with _on_device(device):
        polish_kernel[(batch,)](
            *args, num_warps=_WARPS, enable_fp_fusion=False, **_meta(num_phy, num_log, num_gpus, num_nodes)
        )
    return cur if phy2log.dtype == torch.int64 else cur.to(phy2log.dtype)
