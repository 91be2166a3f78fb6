"""Executors: carry out a :class:`eplb.TransferPlan` on a distributed engine.

- :mod:`eplb.executors.torch`: ``torch.distributed`` point-to-point ops
  (``batch_isend_irecv``; NCCL on GPUs, gloo on CPUs), one process per GPU;
- :mod:`eplb.executors.jax`: one ``shard_map`` program with ``all_to_all``
  over a mesh axis of expert-parallel devices, ``jit``-able.

Both are double-buffered: new weights are built beside the old ones and only
committed once every copy has arrived, so a failure part-way leaves every
rank's old weights intact. A transfer failure (a communication error, a peer
that dies, a timeout, a corrupted copy, an exception in the torch executor's
``on_transfer``) raises :class:`eplb.TransferError` naming the copy that
failed; invalid arguments and bugs raise their own exception unchanged
(``TypeError``, ``ValueError``, ...), checked before anything moves, and the
torch executor still tells the other ranks so that none of them commits.
Import the submodule you need; this package imports no framework.
"""
