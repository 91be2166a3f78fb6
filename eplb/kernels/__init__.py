"""Fused kernels: each equals one algorithm-layer function bit for bit (its docstring names it and its tests).

The adapters in :mod:`eplb.backends` pick them (``impl=None``) or take them
by name (``impl=``); the array-API algorithm layer (:mod:`eplb.algorithms`)
stays the reference. Which code runs for an input (``impl=None``):

=================  ==========================  ============================  =============================
input              greedy policy               refined policy                ``previous=``
=================  ==========================  ============================  =============================
numpy, lists       ``greedy_numba`` [1]_       array API                     ``greedy_numba``,
                                                                             ``relabel_numba``,
                                                                             ``repair_numba``,
                                                                             ``group_split_numba``,
                                                                             ``polish_numba`` [1]_
torch CPU          as numpy (zero-copy view)   as numpy                      as numpy
torch CUDA         ``greedy_triton`` [2]_      ``refined_triton`` [2]_       as the policy, then
                                                                             ``relabel_triton`` [2]_;
                                                                             the knobs:
                                                                             ``repair_triton``,
                                                                             ``choose_triton``,
                                                                             ``group_split_triton``,
                                                                             ``polish_triton`` [2]_
JAX CPU            ``greedy_numba`` via a      XLA (array API under          as numpy, via a host
                   host callback [1]_          ``jit`` + ``vmap``)           callback [1]_
JAX GPU            ``greedy_pallas`` [3]_      ``refined_pallas`` + XLA [3]_ as the policy, then
                                                                             ``relabel_pallas`` [3]_;
                                                                             the knobs:
                                                                             ``repair_pallas``,
                                                                             ``polish_pallas`` + XLA [3]_
=================  ==========================  ============================  =============================

With two slots per GPU the refined policy ends with the pair stage
(:mod:`eplb.algorithms.pairs`), and ``gpu_capacity=`` tries a replica set
from the same search; the count search runs ``pairs_numba`` on numpy and
torch CPU [1]_, the same via a host callback on JAX CPU [1]_,
``pairs_triton`` on torch CUDA [2]_ and XLA on JAX GPU.

``active_gpus=`` and ``gpu_capacity=`` run the array-API path (XLA on JAX),
with kernels for its loops where they exist. ``active_gpus=`` with
``previous=`` on numpy, torch CPU and JAX CPU inputs (JAX through a host
callback): its relabelling, sticky repackings and local search run
``relabel_numba`` / ``repair_numba`` [1]_ (which take failed GPUs' ``-1``
slots), its polish ``polish_numba`` [1]_ (``polish_triton`` [2]_ and
``polish_pallas`` [3]_ on CUDA; the empty slots as one more expert).
``gpu_capacity=`` on numpy and torch CPU: placement by time's loops run
``speed_numba`` [1]_. On torch CUDA, ``active_gpus=`` runs
``relabel_triton.relabel_pinned``, ``repair_triton``,
``choose_triton.heaviest_gpu``, ``replication_triton`` and
``group_split_triton`` [2]_ (the fresh placements' replication, packing and
group splits too, with or without ``previous=``), and ``gpu_capacity=``
runs ``speed_triton`` with the same replication and packing kernels [2]_;
the rest of those calls is torch ops. On JAX GPU, ``active_gpus=`` with
``previous=`` runs ``relabel_pallas.relabel_pinned`` and ``repair_pallas``'s
``sticky_pack`` (the fresh placements' packing too) and ``repair`` [3]_ over
all layers at once, the rest XLA. ``gpu_capacity=`` with ``previous=``
adds ``relabel_pinned`` on capacity classes, ``sticky_pack`` and
``align_slots`` (numba [1]_ or Triton [2]_) and the swap search with a
limit; on JAX CPU the numba path via a host callback [1]_; on JAX GPU
``relabel_pallas.relabel_pinned`` and ``repair_pallas.sticky_pack`` [3]_
over all layers at once, placement by time and the swap search XLA
(``impl="xla"``: all of it XLA under ``vmap``).

``spill=`` runs the array-API path everywhere. Where a kernel does not
apply the array-API path runs, with the same placement.

On torch CUDA every one of these calls can also be captured once and
replayed as a CUDA graph, the same kernels with one launch of host work:
:class:`eplb.GraphedPlanner` (:mod:`eplb.graphed`).

.. [1] with numba installed (the ``fast`` extra) and the kernels loaded
   (:func:`eplb.backends._numba.ready`); the array-API path meanwhile.
.. [2] with Triton installed and the sizes within the kernel's limits.
.. [3] where JAX ships Pallas' Triton lowering and the sizes fit.

Kernel modules import their compiler (numba, Triton, Pallas) at the top, so
they are imported only by an adapter that has checked it is there.

Rules every Triton kernel keeps, because Triton's CPU interpreter (which the
CPU tests run) does not show where a compile differs: launched with
``enable_fp_fusion=False`` where a product meets a sum (no FMA); no float
division decides a comparison; and no position (``tl.argmin``,
``tl.argmax``) taken of a ``tl.reshape``: Triton lets a reshape that feeds
a reduction reorder its elements on a GPU, so the position would name
another element (``tests/test_kernels_reshape_order.py`` compiles every
kernel module that reshapes and checks it).
"""
