"""Drop-in adapters that let a serving stack call eplb through its own EPLB policy interface.

- :mod:`eplb.integrations.vllm`: vLLM's ``AbstractEplbPolicy`` (``EplbPolicy``,
  ``register()`` to make it vLLM's ``"default"`` policy);
- :mod:`eplb.integrations.sglang`: SGLang's
  ``sglang.srt.eplb.eplb_algorithms.rebalance_experts`` (``register()`` to
  replace it).

Neither module imports vLLM or SGLang, except inside their ``register()``;
both import torch (the stacks' interfaces are torch-only) when first called,
not on import. ``import eplb`` does not import this package.
"""
