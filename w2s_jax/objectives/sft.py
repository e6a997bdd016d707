"""`sft`: next-token cross-entropy on every completion token (the prompt is masked).

The contrastive objective's loss with one-hot targets: each completion token is a
position whose single target is the token itself. Records need only `prompt_ids`
and `completion_ids` (`w2s_jax.data.sft_records` writes them).
"""

from __future__ import annotations

from w2s_jax.objectives.contrastive import soft_target_objective


def completion_targets(record: dict, where: str, completion: list[int], vocab_size: int | None):
    """Every completion position, each with its own token as a one-hot target."""
    return list(range(len(completion))), [([t], [1.0]) for t in completion]


OBJECTIVE = soft_target_objective("sft", completion_targets)
