"""GRPO rollouts: who samples the G completions per prompt, and how weights reach them.

- ``generator``: the ``Rollout`` record, the ``RolloutGenerator`` protocol, per-prompt seeds,
  and ``TransformersRollouts`` (transformers ``generate`` on the policy itself);
- ``vllm_engine``: ``VLLMRollouts``, a vLLM engine in each training process;
- ``server`` / ``client``: ``ume-train rollout-server`` and the trainer's ``ServerRollouts``;
- ``wire`` (request/reply encoding), ``batching`` (merging waiting requests),
  ``weight_sync`` (full weights in chunks, for vLLM and the server).
"""

from .generator import Rollout, RolloutGenerator, TransformersRollouts, rollout_seed

__all__ = ["Rollout", "RolloutGenerator", "TransformersRollouts", "rollout_seed"]
