"""`contrastive`, LightReasoner's fine-tuning objective.

At every selected position t of a trajectory, the soft cross-entropy
-Σ_a v_C(a) log πθ(a | s_t) (= KL(v_C ‖ πθ) + H(v_C)), averaged over the selected
positions of the step. Records are `w2s sample` outputs: `positions` (completion
indices) with sparse contrastive targets `target_ids` / `target_weights`.

Packing: one forward pass per trajectory (prompt + rollout ids) gives the hidden
states of all its positions; the loss gathers the selected ones, projects only
those onto the vocabulary, and averages. Metrics: kl (KL(v_C ‖ πθ)) and agreement
(argmax of πθ == the target's top token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from w2s_jax.divergence import contrastive_loss, fused_contrastive_loss
from w2s_jax.objectives.base import LossContext, Objective
from w2s_jax.records import TARGET_FIELDS, TOKEN_FIELDS, SampleRecord


def contrastive_targets(record: dict, where: str, completion: list[int], vocab_size: int | None):
    """The record's selected positions and their sparse targets, checked by
    `SampleRecord.from_json` (the target fields required)."""
    required = TOKEN_FIELDS + TARGET_FIELDS
    sample = SampleRecord.from_json(record, where=where, vocab_size=vocab_size, required=required)
    return sample.positions, list(zip(sample.target_ids, sample.target_weights, strict=True))


def selected_logits_loss(model, micro: dict, *, loss_chunk_size: int = 0):
    """Packed loss of one micro-batch: (mean soft CE over its positions, aux metrics).

    micro: input_ids/attention_mask [R, T], flat_index [P] (row * T + t),
    target_ids/target_weights [P, K]. aux: agree (count of argmax == top target),
    entropy (Σ over positions of H(target)).
    """
    hidden_rtd = model.hidden_states(micro["input_ids"], micro["attention_mask"])
    hidden_pd = jnp.take(hidden_rtd.reshape(-1, hidden_rtd.shape[-1]), micro["flat_index"], 0)
    ids_pk, weights_pk = micro["target_ids"], micro["target_weights"]
    selected_p = jnp.ones(ids_pk.shape[:1], bool)
    if loss_chunk_size:
        # The head as stored (a tied embedding is [V, D]); padded ids (>= model.token_count)
        # are masked, not sliced off: a transposed or sliced head is copied whole.
        head, layout = model.lm_head_matrix()
        loss = fused_contrastive_loss(
            hidden_pd,
            head,
            ids_pk,
            weights_pk,
            selected_p,
            chunk_size=loss_chunk_size,
            vocab_size=model.token_count,
            head_layout=layout,
        )
        argmax_p = _chunked_argmax(
            jax.lax.stop_gradient(hidden_pd), head, layout, model.token_count, loss_chunk_size
        )
    else:
        logits_pv = model.logits(hidden_pd)
        loss = contrastive_loss(logits_pv, ids_pk, weights_pk, selected_p)
        argmax_p = jnp.argmax(logits_pv, axis=-1)
    entropy = -jnp.sum(jnp.where(weights_pk > 0, weights_pk * jnp.log(weights_pk), 0.0))
    agree = jnp.sum(argmax_p == ids_pk[:, 0])
    return loss, {"agree": agree, "entropy": entropy}


def _chunked_argmax(hidden_pd, head, layout: str, token_count: int, chunk_size: int):
    """argmax over ids < token_count of hidden @ head per position, `chunk_size` positions
    of logits at a time; head [D, V] (layout "dv") or [V, D] ("vd"), used as stored."""
    head = jax.lax.stop_gradient(head)
    spec = {"dv": "d,dv->v", "vd": "d,vd->v"}[layout]
    real_v = jnp.arange(head.shape[layout.index("v")]) < token_count

    def argmax(h_d):
        logits_v = jnp.einsum(spec, h_d, head, preferred_element_type=jnp.float32)
        return jnp.argmax(jnp.where(real_v, logits_v, -jnp.inf))

    return jax.lax.map(argmax, hidden_pd, batch_size=chunk_size)


def soft_target_loss(model, micro: dict, ctx: LossContext):
    """The objective's loss: `selected_logits_loss` with the step's chunk size."""
    return selected_logits_loss(model, micro, loss_chunk_size=ctx.loss_chunk_size)


def soft_target_metrics(mean_loss, aux: dict, batch: dict) -> dict:
    """kl = loss - mean target entropy; agreement = share of positions whose argmax is the
    top target. `batch`: the step's arrays, [A, P, K] targets."""
    positions = batch["target_ids"].shape[0] * batch["target_ids"].shape[1]
    return {"kl": mean_loss - aux["entropy"] / positions, "agreement": aux["agree"] / positions}


OBJECTIVE = Objective(
    name="contrastive",
    record_targets=contrastive_targets,
    loss=soft_target_loss,
    metrics=soft_target_metrics,
    requires_manifest=True,
)
