"""Executors: carry out a :class:`eplb.TransferPlan` on a distributed engine.

- :mod:`eplb.executors.torch`: ``torch.distributed`` point-to-point ops
  (``batch_isend_irecv``; NCCL on GPUs, gloo on CPUs), one process per GPU;
- :mod:`eplb.executors.jax`: one ``shard_map`` program with ``all_to_all``
  over a mesh axis of expert-parallel devices, ``jit``-able.

Both are double-buffered: new weights are built beside the old ones and only
committed once every copy has arrived, so a failure part-way (a peer error,
an exception, a corrupted copy) leaves every rank's old weights intact and
raises :class:`eplb.TransferError` naming the copy that failed. Import the
submodule you need; this package imports no framework.
"""
