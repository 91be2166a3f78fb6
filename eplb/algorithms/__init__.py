"""The algorithm layer: array-API code only (``xp`` plus :mod:`eplb._xp`).

- :mod:`.packing`: balanced packing (LPT into equal-count packs);
- :mod:`.replication`: greedy replication with incrementally updated scores;
- :mod:`.hierarchy`: the hierarchical and global greedy policies.

Every function takes a leading batch axis (layers, or layer x node) and a
keyword-only ``xp``; nothing here imports a framework.
"""
