"""`contrastive`, LightReasoner's fine-tuning objective.

At every selected position t of a trajectory, the soft cross-entropy
-Σ_a v_C(a) log πθ(a | s_t) (= KL(v_C ‖ πθ) + H(v_C)), averaged over the selected
positions of the step. Records are `w2s sample` outputs: `positions` (completion
indices) with sparse contrastive targets `target_ids` / `target_weights`.

Packing: one forward pass per trajectory (prompt + rollout ids) gives the hidden
states of all its positions; the loss gathers the selected ones, projects only
those onto the vocabulary, and averages. Metrics: kl (KL(v_C ‖ πθ)) and agreement
(argmax of πθ == the target's top token).

A KL anchor to the base (`Anchor`, `w2s train --anchor-kl W`) adds
W · mean over the selected positions of KL(πθ ‖ π_base) (or the forward direction), where
π_base is the same network with its LoRA adapters off: no second model is loaded, and
the base's forward pass runs in the same jitted step without gradients. Both models'
hidden states are projected by the fused kernel, so [P, V] logits are never held
beyond a chunk. W = 0 is the plain objective, exactly. Metric: anchor_kl.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from w2s_jax.divergence import contrastive_loss, fused_contrastive_loss, fused_distillation
from w2s_jax.objectives.base import LossContext, Objective
from w2s_jax.records import TARGET_FIELDS, TOKEN_FIELDS, SampleRecord


@dataclasses.dataclass(frozen=True)
class Anchor:
    """W · KL between the trained model and its base at the supervised positions."""

    weight: float = 0.0
    direction: str = "reverse"

    @classmethod
    def from_settings(cls, settings) -> Anchor:
        """The anchor of a run's `TrainSettings` (--anchor-kl, --anchor-direction)."""
        if settings.anchor_kl > 0 and settings.lora_rank == 0:
            raise ValueError(
                "--anchor-kl needs LoRA (--lora-rank >= 1): the base it anchors to is the "
                "model with its adapters off"
            )
        return cls(settings.anchor_kl, settings.anchor_direction)


def contrastive_targets(record: dict, where: str, completion: list[int], vocab_size: int | None):
    """The record's selected positions and their sparse targets, checked by
    `SampleRecord.from_json` (the target fields required)."""
    required = TOKEN_FIELDS + TARGET_FIELDS
    sample = SampleRecord.from_json(record, where=where, vocab_size=vocab_size, required=required)
    return sample.positions, list(zip(sample.target_ids, sample.target_weights, strict=True))


def positions_hidden(model, micro: dict):
    """Final hidden states [P, D] of a packed micro-batch's supervised positions (one
    forward pass over its token rows, then a gather at `flat_index`)."""
    hidden_rtd = model.hidden_states(micro["input_ids"], micro["attention_mask"])
    return jnp.take(hidden_rtd.reshape(-1, hidden_rtd.shape[-1]), micro["flat_index"], 0)


def selected_logits_loss(model, micro: dict, hidden_pd, *, loss_chunk_size: int = 0):
    """Packed loss of one micro-batch: (mean soft CE over its positions, aux metrics).

    micro: input_ids/attention_mask [R, T], flat_index [P] (row * T + t),
    target_ids/target_weights [P, K]; hidden_pd: `positions_hidden(model, micro)`.
    aux: agree (count of argmax == top target), entropy (Σ over positions of H(target)).
    """
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


def anchor_kl(model, micro: dict, hidden_pd, anchor: Anchor, loss_chunk_size: int = 0):
    """Mean over the micro-batch's positions of KL(πθ‖π_base) (`anchor.direction`
    "reverse") or KL(π_base‖πθ) ("forward"); gradients reach πθ only."""
    from w2s_jax.lora import without_adapters

    base = without_adapters(model)
    head, layout = model.lm_head_matrix()
    base_head, base_layout = base.lm_head_matrix()
    top_ids_p = micro["target_ids"][:, 0]  # unused by the KL; fused_distillation's CE wants ids
    _, kl_p, _ = fused_distillation(
        hidden_pd,
        head,
        positions_hidden(base, micro),
        base_head,
        top_ids_p,
        chunk_size=loss_chunk_size or top_ids_p.shape[0],
        direction=anchor.direction,
        vocab_size=model.token_count,
        student_head_layout=layout,
        teacher_head_layout=base_layout,
    )
    return jnp.mean(kl_p)


def soft_target_loss(model, micro: dict, ctx: LossContext, *, anchor: Anchor = Anchor()):
    """The objective's loss: `selected_logits_loss` with the step's chunk size, plus
    W · `anchor_kl` when the anchor's weight W is not 0."""
    hidden_pd = positions_hidden(model, micro)
    loss, aux = selected_logits_loss(model, micro, hidden_pd, loss_chunk_size=ctx.loss_chunk_size)
    if not anchor.weight:
        return loss, aux
    kl = anchor_kl(model, micro, hidden_pd, anchor, ctx.loss_chunk_size)
    return loss + anchor.weight * kl, {**aux, "anchor_kl": kl}


def soft_target_metrics(mean_loss, aux: dict, batch: dict, *, anchor: Anchor = Anchor()) -> dict:
    """kl = the soft CE part of the loss minus the mean target entropy; agreement = share
    of positions whose argmax is the top target; anchor_kl (with an anchor) its mean.
    `batch`: the step's arrays, [A, P, K] targets."""
    micro_batches = batch["target_ids"].shape[0]
    positions = micro_batches * batch["target_ids"].shape[1]
    metrics = {"agreement": aux["agree"] / positions}
    if not anchor.weight:
        return {"kl": mean_loss - aux["entropy"] / positions, **metrics}
    mean_anchor = aux["anchor_kl"] / micro_batches
    soft_ce = mean_loss - anchor.weight * mean_anchor
    return {"kl": soft_ce - aux["entropy"] / positions, **metrics, "anchor_kl": mean_anchor}


def soft_target_objective(name: str, record_targets, *, anchor: Anchor = Anchor(), **fields):
    """The soft-target objective `name` (contrastive, sft) with `anchor`; its `configure`
    binds a run's --anchor-kl and --anchor-direction."""
    return Objective(
        name=name,
        record_targets=record_targets,
        loss=functools.partial(soft_target_loss, anchor=anchor),
        metrics=functools.partial(soft_target_metrics, anchor=anchor),
        configure=lambda settings: soft_target_objective(
            name, record_targets, anchor=Anchor.from_settings(settings), **fields
        ),
        **fields,
    )


OBJECTIVE = soft_target_objective("contrastive", contrastive_targets, requires_manifest=True)
