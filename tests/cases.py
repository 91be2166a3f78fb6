"""Load matrices for cross-backend checks: random, float32, adversarial ties, zeros.

Each builder returns a ``[L, E]`` array whose rows are independent layers,
so one call (one JAX compile) covers many cases.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

# ../shared/data beside the repository; EPLB_DATA_DIR overrides (GPU machine).
DATA = Path(os.environ.get("EPLB_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def random_int(rng: np.random.Generator, layers: int, experts: int, total: int = 2**31 - 1) -> np.ndarray:
    """Integer loads whose per-layer total stays just below ``total``."""
    raw = rng.random((layers, experts)) ** 3
    return np.floor(raw / raw.sum(axis=1, keepdims=True) * (total - experts)).astype(np.int64)


def lognormal_f32(rng: np.random.Generator, layers: int, experts: int, sigma: float = 1.5) -> np.ndarray:
    return (rng.lognormal(0.0, sigma, (layers, experts)) * 1000).astype(np.float32)


def signed_zeros(rng: np.random.Generator, experts: int) -> np.ndarray:
    """float32 rows mixing ``-0.0`` and ``+0.0`` (equal loads: ties, whatever their sign bit)."""
    signs = np.where(rng.random((3, experts)) < 0.5, -0.0, 0.0)
    signs[2, ::4] = 5.0  # a few non-zero loads among the zeros
    return signs.astype(np.float32)


def tiny_loads(rng: np.random.Generator, experts: int) -> np.ndarray:
    """float32 rows around ``2**-64``, below which every backend reads a load as 0, and subnormals.

    XLA flushes subnormals to zero and numpy does not; each row also holds
    loads just below ``2**-64`` (read as 0) next to ``2**-64`` itself (kept).
    """
    tiny = np.float32(2.0**-64)
    below = np.nextafter(tiny, np.float32(0))
    values = np.array([1e-44, 1e-40, 1e-38, below, tiny, 2 * tiny, 3.0, 0.0], dtype=np.float32)
    rows = [
        np.full(experts, 1.8e-44),  # all subnormal and equal: an all-zero layer
        values[rng.integers(0, len(values), experts)],
        values[rng.integers(0, 6, experts)],  # nothing above 2**-63: all ties or zeros
        np.where(np.arange(experts) % 2 == 0, below, tiny),  # half read as 0, half kept
    ]
    return np.stack(rows).astype(np.float32)


def ties(rng: np.random.Generator, experts: int) -> np.ndarray:
    """Adversarial rows: every ordering decision hinges on a tie."""
    rows = [
        np.full(experts, 7),  # all equal
        np.zeros(experts),  # all-zero layer
        rng.integers(0, 3, experts),  # few distinct values
        np.where(rng.random(experts) < 0.3, 0, rng.integers(1, 5, experts)),  # 30% zeros
        np.tile([3 * 5, 5], experts // 2),  # 3k vs k: 3k/3 and k/1 replica scores tie
        np.tile([3 * 11, 11, 2 * 11, 0], experts // 4),  # 3k/3 = 2k/2 = k/1
        np.arange(experts) % 4 * 6,  # 6, 12, 18: ties after 2 and 3 replicas
        np.full(experts, 2**25 + 1),  # rounds to 2**25 in float32
        2**25 + np.arange(experts) % 3,  # distinct ints, equal float32
    ]
    return np.stack([np.asarray(r, dtype=np.int64) for r in rows])


def deepseek_v3(name: str = "prefill_in4096.json") -> np.ndarray | None:
    """Real DeepSeek-V3 loads [58, 256] (MoE layers only), or None without ../shared."""
    path = DATA / "deepseek-v3-sglang" / name
    if not path.exists():
        return None
    counts = np.asarray(json.loads(path.read_text())["logical_count"], dtype=np.int64)
    return counts[counts.sum(axis=1) > 0]


def replan_inputs(vector: str | None, num_gpus: int) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Three re-plans of a live job on real loads: ``(loads, vectors)``, three DeepSeek-V3 files and, per
    re-plan, the ``active_gpus`` mask (GPUs 5 and ``6 + k`` down) or the ``gpu_capacity`` vector (every other GPU
    at 0.6, alternating which half) of ``vector``; ``None`` vectors without one."""
    files = ("prefill_in4096.json", "prefill_in2048.json", "decode_in1800out100.json")
    loads = [deepseek_v3(name) for name in files]
    assert all(w is not None for w in loads), f"real loads expected at {DATA}"
    vectors: list[np.ndarray | None] = [None] * 3
    for k in range(3 if vector else 0):
        if vector == "active_gpus":
            vectors[k] = np.ones(num_gpus, bool)
            vectors[k][[5, 6 + k]] = False
        else:
            vectors[k] = np.ones(num_gpus, np.float32)
            vectors[k][k % 2 :: 2] = 0.6
    return loads, vectors


# Failure patterns on the DeepSeek-V3 shape for the GPU tests of the active_gpus= + previous= kernels (Triton and
# Pallas): ((sizes, hierarchical), failed GPUs), with their test ids.
ELASTIC_GPU_CASES = [
    (((288, 8, 4, 32), True), [5]),
    (((352, 8, 4, 32), True), list(range(8, 16))),  # a node down (11 slots a GPU: 264 live for 256 experts)
    (((288, 8, 3, 144), False), [5]),
    (((288, 8, 4, 32), False), [5, 13, 21]),
]
ELASTIC_GPU_IDS = ["hier-1-down", "hier-node-down", "global144-1-down", "global32-3-down"]


def deepseek_elastic(config: tuple, dead: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(loads [58, 256], previous [58, R], live mask [G])``: ``prefill_in2048`` to re-plan, ``previous`` the
    numpy placement of ``prefill_in4096`` with every GPU up, ``dead`` down in the mask."""
    import eplb

    sizes, hierarchical = config
    old_w, new_w = deepseek_v3(), deepseek_v3("prefill_in2048.json")
    assert old_w is not None and new_w is not None, f"real loads expected at {DATA}"
    previous = eplb.rebalance_experts(old_w, *sizes, hierarchical=hierarchical).phy2log
    mask = np.isin(np.arange(sizes[3]), dead, invert=True)
    return new_w, np.asarray(previous), mask


def starts_with_failed_gpus(
    rng: np.random.Generator, dead_slot: np.ndarray, experts: int, cover: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(old, start) [rows, slots]`` for a local search with failed GPUs (``dead_slot``: their slots): ``old``
    -1 there and on about 10% of the live slots; ``start`` -1 exactly on the failed slots, old's live slots
    kept (empty ones refilled) then about 30% rewritten, and every expert held (with chance ``cover``, where
    the live slots allow)."""
    rows, slots = dead_slot.shape
    old = rng.integers(0, experts, (rows, slots))
    old = np.where(dead_slot | (rng.random((rows, slots)) < 0.1), -1, old)
    start = np.where(dead_slot, -1, old)
    refill = (start < 0) & ~dead_slot
    start[refill] = rng.integers(0, experts, int(refill.sum()))
    for r in range(rows):
        changed = ~dead_slot[r] & (rng.random(slots) < 0.3)
        start[r, changed] = rng.integers(0, experts, int(changed.sum()))
        live = np.flatnonzero(~dead_slot[r])
        if rng.random() < cover and len(live) >= experts:
            start[r, rng.permutation(live)[:experts]] = np.arange(experts)
    return old, start


def polish_case(rng: np.random.Generator) -> tuple:
    """Arguments of :func:`eplb.algorithms.polish.polish` but ``xp``: ``(phy2log, counts, old, weight, limit, num_gpus,
    num_nodes, max_iters)``, a random batch of rows (1..4 nodes, 1..4 GPUs per node, 1..5 slots per GPU, one expert
    possible, all-zero, tied or lognormal loads, limits among and around the GPU loads, max_iters 1, 2 or R)."""
    nodes, gpus_per_node, per_gpu = (int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(1, 6)))
    gpus = nodes * gpus_per_node
    slots = gpus * per_gpu
    experts, batch = int(rng.integers(1, slots + 1)), int(rng.integers(1, 5))

    def placement() -> np.ndarray:  # every expert at least once
        rows = [np.concatenate([np.arange(experts), rng.integers(0, experts, slots - experts)]) for _ in range(batch)]
        return np.array([rng.permutation(row) for row in rows], np.int64)

    cur = placement()
    old = placement()
    if rng.random() < 0.6:  # old a few changes away from cur: most swaps restore pairs
        old = cur.copy()
        for row in old:
            changed = rng.permutation(slots)[: int(rng.integers(0, slots + 1))]
            row[changed] = rng.integers(0, experts, len(changed))
    kind = rng.random()
    if kind < 0.1:
        weight = np.zeros((batch, experts), np.float32)  # all-zero layers
    elif kind < 0.4:
        weight = rng.integers(0, 4, (batch, experts)).astype(np.float32)  # ties everywhere
    else:
        weight = (rng.lognormal(0.0, 1.0, (batch, experts)) * 100).astype(np.float32)
    from eplb.algorithms.relabel import replica_counts
    from eplb.algorithms.repair import gpu_loads, heaviest_gpu

    counts = replica_counts(cur, experts, xp=np)
    peak = heaviest_gpu(weight, cur, counts, gpus, xp=np)
    limit = (peak * np.float32(rng.choice([0.9, 1.0, 1.02, 1.5]))).astype(np.float32)
    if rng.random() < 0.4:  # a limit among the GPU loads: many swaps land just above or below it
        loads = gpu_loads(weight, cur, counts, gpus, xp=np)
        limit = np.take_along_axis(loads, rng.integers(0, gpus, (batch, 1)), axis=1).astype(np.float32)
    if rng.random() < 0.15:  # int32 ids: the result keeps the dtype
        cur, counts, old = cur.astype(np.int32), counts.astype(np.int32), old.astype(np.int32)
    return cur, counts, old, weight, limit, gpus, nodes, int(rng.choice([1, 2, slots]))


def polish_deepseek(config: tuple) -> tuple[np.ndarray, np.ndarray]:
    """``config = (sizes, options)``: float32 DeepSeek-V3 loads and the placement of another file's loads, the
    previous placement of a keep-in-place call (as tests/test_pallas_repair.py takes them)."""
    import eplb

    sizes, options = config
    old_w, new_w = deepseek_v3(), deepseek_v3("prefill_in2048.json")
    assert old_w is not None and new_w is not None, f"real loads expected at {DATA}"
    return new_w.astype(np.float32), eplb.rebalance_experts(old_w, *sizes, **options).phy2log


def captured_polish(weight: np.ndarray, previous: np.ndarray, config: tuple, **knobs) -> tuple[tuple, np.ndarray]:
    """The arguments the array-API ``place_stable`` (numpy) passes its one polish call, and that call's result."""
    from eplb.algorithms.polish import polish
    from eplb.algorithms.stability import place_stable

    calls = []

    def record(*args, **kwargs):
        out = polish(*args, **kwargs)
        calls.append((args, out))
        return out

    sizes, options = config
    hierarchical = options.get("hierarchical", sizes[1] % sizes[2] == 0)
    place_stable(
        weight.astype(np.float32), previous, *sizes, hierarchical=hierarchical, xp=np, polish_fn=record, **knobs
    )
    assert len(calls) == 1
    return calls[0]


def draw_failure(draw, num_gpus: int, experts_multiple: int = 1) -> tuple:
    """A hypothesis ``draw`` of a re-plan after failures on ``num_gpus`` GPUs: ``(loads [L, E], num_replicas,
    live mask [G], rng)``, 1..12 experts (one possible; a multiple of ``experts_multiple``), 1 to 3 slots a GPU
    beyond the fewest (one slot per GPU possible), every GPU live where the live slots could not hold the experts,
    1..3 layers of integer, tied (0..2), all-zero or lognormal float32 loads; ``rng`` seeded by the draw, for what
    the caller draws next."""
    from hypothesis import strategies as st

    num_experts = experts_multiple * draw(st.integers(1, max(1, 12 // experts_multiple)))
    per_gpu = max(1, -(-num_experts // num_gpus)) + draw(st.integers(0, 2))
    mask = np.array(draw(st.lists(st.booleans(), min_size=num_gpus, max_size=num_gpus)))
    if mask.sum() * per_gpu < num_experts:
        mask[:] = True
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["int", "float", "few", "zero"]))
    shape = (draw(st.integers(1, 3)), num_experts)
    if kind == "int":
        w = rng.integers(0, 2**20, shape)
    elif kind == "few":
        w = rng.integers(0, 3, shape)
    elif kind == "zero":
        w = np.zeros(shape, np.int64)
    else:
        w = rng.lognormal(0, 2, shape).astype(np.float32)
    return w, num_gpus * per_gpu, mask, rng
