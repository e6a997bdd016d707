"""Per-token divergences, LightReasoner's contrastive targets and the contrastive loss.

Pure ``jax.numpy``: every function is jit-able, works over any leading axes (the last
axis is the vocabulary, or the hidden size for the fused variants) and accumulates in
float32 whatever the input dtype. Scalars that fix shapes or masks (``alpha``, ``k``,
``chunk_size``, ``vocab_size``, head layouts) must be static Python values; they are
checked when the function is traced, so bad values raise ``ValueError`` under ``jax.jit`` too.

Logits may contain ``-inf`` (e.g. padded vocabulary rows): tokens with probability 0
under the first distribution contribute 0 to a KL. Every row needs at least one finite
logit, and ``+inf``/NaN logits are not supported.

Memory-lean variants split the work along the position axis (the axis just before
the vocabulary / hidden axis) into blocks of ``chunk_size`` positions, keeping all
other leading axes (e.g. a data-sharded batch) whole, so the largest live intermediate
is ``batch × chunk_size × V`` float32. The ``fused_*`` variants take final hidden
states and an LM-head matrix and form logits block by block, under ``jax.checkpoint``
so the backward pass is blocked too: ``[..., T, V]`` logits never exist. The head is
used as stored, ``[D, V]`` (layout ``"dv"``, an ``nnx.Linear`` kernel, the default) or
``[V, D]`` (``"vd"``, a tied embedding; ``CausalLM.lm_head_matrix()`` gives the pair):
a transposed copy of it is never made.

The public functions are defined here; their argument checks live in
``w2s_jax.divergence.checks`` and the jitted math in ``w2s_jax.divergence.kernels``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from w2s_jax.divergence import kernels
from w2s_jax.divergence.checks import (
    check_alpha,
    check_k,
    check_logits,
    check_loss_inputs,
    check_pair,
    check_positive_int,
    check_temperature,
    fused_pair_vocabs,
    head_vocab,
)
from w2s_jax.divergence.cross_vocab import (
    UNMAPPED_MASS_MODES,
    cross_kl_and_target,
    fused_cross_kl_and_target,
)

__all__ = [
    "CONTRASTIVE_FORMS",
    "DISTILL_DIRECTIONS",
    "UNMAPPED_MASS_MODES",
    "contrastive_scores",
    "contrastive_loss",
    "contrastive_target",
    "contrastive_target_chunked",
    "cross_kl_and_target",
    "fused_contrastive_loss",
    "fused_cross_kl_and_target",
    "fused_distillation",
    "fused_kl_and_target",
    "fused_loss_and_rank",
    "fused_token_kl",
    "plausibility_mask",
    "select_steps",
    "token_js",
    "token_kl",
    "token_kl_chunked",
    "token_reverse_kl",
]


# --- on logits [..., V] -------------------------------------------------------------------


def token_kl(p_logits, q_logits):
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) per position, from raw logits [..., V].

    Exact (log-softmax, no epsilon). Returns float32 [...]. Terms with p_v = 0
    (logit -inf) contribute 0; q_v = 0 where p_v > 0 gives +inf.
    """
    check_pair("p_logits", p_logits, "q_logits", q_logits)
    return kernels.kl(p_logits, q_logits)


def token_reverse_kl(p_logits, q_logits):
    """KL(q‖p) per position (the reverse direction of ``token_kl``)."""
    check_pair("p_logits", p_logits, "q_logits", q_logits)
    return kernels.kl(q_logits, p_logits)


def token_js(p_logits, q_logits):
    """Jensen–Shannon divergence ½KL(p‖m) + ½KL(q‖m), m = (p + q)/2, in nats (≤ log 2)."""
    check_pair("p_logits", p_logits, "q_logits", q_logits)
    return kernels.js(p_logits, q_logits)


def plausibility_mask(expert_logits, alpha):
    """bool [..., V]: πE(a) ≥ alpha · max_b πE(b), alpha in (0, 1]. Never empty."""
    log_alpha = check_alpha(alpha)
    check_logits("expert_logits", expert_logits)
    return kernels.mask(expert_logits, log_alpha)


def contrastive_target(expert_logits, amateur_logits, alpha, k, *, with_stats=False):
    """LightReasoner's sparse soft target from expert and amateur logits [..., V].

    Over the plausible set A = {a : πE(a) ≥ alpha·max πE} the target is
    softmax(log πE − log πA), zero elsewhere. Returns ``(ids, weights)``: int32 and
    float32 [..., k], sorted by weight descending, summing to 1. If |A| < k the extra
    slots have weight 0 and repeat the first id. If |A| > k only the k heaviest tokens
    are kept and renormalized. With ``with_stats=True`` also returns
    ``{"dropped_mass": f32[...], "plausible_size": i32[...]}``: the target mass those
    dropped tokens had, and |A|.

    Picking k: every plausible token has πE ≥ alpha·max πE, so
    |A| ≤ 1/(alpha · max πE); with alpha = 0.2 and a confident expert (max πE ≥ 0.3)
    |A| ≤ 16, so k = 16 drops nothing there. Check ``dropped_mass`` (it should be ~0)
    and raise k if it is not.
    """
    log_alpha = check_alpha(alpha)
    check_pair("expert_logits", expert_logits, "amateur_logits", amateur_logits)
    k = check_k(k, jnp.shape(expert_logits)[-1])
    return kernels.target(
        expert_logits, amateur_logits, log_alpha=log_alpha, k=k, with_stats=bool(with_stats)
    )


CONTRASTIVE_FORMS = ("weighted", "difference")


def contrastive_scores(
    expert_logits, amateur_logits, alpha=0.1, beta=0.5, *, form="weighted", amateur_temperature=1.0
):
    """Contrastive-decoding scores, float32 [..., V], from expert and amateur logits [..., V].

    On the plausible set (``plausibility_mask``: s_E ≥ log alpha + max s_E, s the
    log-probabilities) ``form="weighted"`` scores (1+beta)·s_E − beta·s_A (O'Brien & Lewis
    2023) and ``"difference"`` s_E − s_A (Li et al. 2022; beta unused), with
    s_A = log softmax(amateur_logits / amateur_temperature); −inf outside the set, +inf
    where the amateur gives a plausible token probability 0. ``alpha`` and ``form`` are
    static; ``beta`` (≥ 0) and ``amateur_temperature`` (> 0) may be traced.
    """
    log_alpha = check_alpha(alpha)
    check_pair("expert_logits", expert_logits, "amateur_logits", amateur_logits)
    if form not in CONTRASTIVE_FORMS:
        raise ValueError(f"form must be one of {CONTRASTIVE_FORMS}, got {form!r}")
    if isinstance(beta, (int, float)) and not 0 <= beta < math.inf:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if isinstance(amateur_temperature, (int, float)):
        check_temperature(amateur_temperature)
    return kernels.contrastive_scores(
        expert_logits, amateur_logits, beta, amateur_temperature, log_alpha=log_alpha, form=form
    )


def select_steps(kl, beta, valid=None):
    """bool [...]: KL > beta at valid (non-padding) positions; ``valid=None`` means all."""
    if isinstance(beta, (int, float)) and math.isnan(beta):
        raise ValueError(f"beta must be a number, got {beta!r}")
    selected = jnp.asarray(kl) > beta
    if valid is None:
        return selected
    if jnp.shape(valid) != jnp.shape(kl):
        raise ValueError(
            f"valid must have the shape of kl, got {jnp.shape(valid)} and {jnp.shape(kl)}"
        )
    return selected & jnp.asarray(valid).astype(bool)


def contrastive_loss(logits, target_ids, target_weights, position_mask):
    """Mean over selected positions of −Σ_j w_j log softmax(logits)[ids_j] (float32 scalar).

    ``logits`` [..., V], ``target_ids``/``target_weights`` [..., k], ``position_mask``
    [...] (True where a target applies). This is KL(v_C‖πθ) up to a constant. With no
    selected position the loss is 0 with zero gradient. Ids of slots with nonzero
    weight must lie in [0, V); an id outside makes the loss NaN (values cannot raise
    under jit).
    """
    check_logits("logits", logits)
    check_loss_inputs(jnp.shape(logits)[:-1], target_ids, target_weights, position_mask)
    return kernels.loss(logits, target_ids, target_weights, position_mask)


def token_kl_chunked(p_logits, q_logits, *, chunk_size):
    """``token_kl`` computed ``chunk_size`` positions at a time (same values)."""
    check_pair("p_logits", p_logits, "q_logits", q_logits)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    return kernels.kl_chunked(p_logits, q_logits, chunk_size=chunk_size)


def contrastive_target_chunked(
    expert_logits, amateur_logits, alpha, k, *, chunk_size, with_stats=False
):
    """``contrastive_target`` computed ``chunk_size`` positions at a time (same values)."""
    log_alpha = check_alpha(alpha)
    check_pair("expert_logits", expert_logits, "amateur_logits", amateur_logits)
    k = check_k(k, jnp.shape(expert_logits)[-1])
    chunk_size = check_positive_int("chunk_size", chunk_size)
    return kernels.target_chunked(
        expert_logits,
        amateur_logits,
        log_alpha=log_alpha,
        k=k,
        with_stats=bool(with_stats),
        chunk_size=chunk_size,
    )


# --- fused: from hidden states [..., T, D] and an LM head, never [..., T, V] logits --------


def fused_token_kl(
    p_hidden, p_head, q_hidden, q_head, *, chunk_size, p_head_layout="dv", q_head_layout="dv"
):
    """``token_kl`` of the logits ``p_hidden @ p_head`` and ``q_hidden @ q_head``, fused.

    Hidden states [..., T, D_p] and [..., T, D_q] (D may differ). Each head is [D, V]
    (layout ``"dv"``, an ``nnx.Linear`` kernel) or [V, D] (``"vd"``, a tied embedding),
    with the same V. Differentiable (a head's gradient comes in its layout); the
    backward pass is blocked too.
    """
    names = ("p_hidden", "p_head", "q_hidden", "q_head")
    layouts = (p_head_layout, q_head_layout)
    v_p, v_q = fused_pair_vocabs(names, p_hidden, p_head, layouts[0], q_hidden, q_head, layouts[1])
    if v_p != v_q:
        raise ValueError(
            f"p_head and q_head must have the same vocabulary size, got "
            f"{jnp.shape(p_head)} and {jnp.shape(q_head)}"
        )
    chunk_size = check_positive_int("chunk_size", chunk_size)
    return kernels.fused_kl(
        p_hidden, p_head, q_hidden, q_head, chunk_size=chunk_size, layouts=layouts
    )


def fused_kl_and_target(
    expert_hidden,
    expert_head,
    amateur_hidden,
    amateur_head,
    alpha,
    k,
    *,
    chunk_size,
    vocab_size=None,
    expert_head_layout="dv",
    amateur_head_layout="dv",
):
    """KL(πE‖πA) and the contrastive target straight from hidden states.

    Equals ``token_kl`` and ``contrastive_target(..., with_stats=True)`` on the logits
    ``hidden @ head`` of ids < ``vocab_size``, computed ``chunk_size`` positions at a
    time. Heads are [D, V] or [V, D] by their layouts, as in ``fused_token_kl``.
    ``vocab_size`` (default: the heads' common V) drops padded head rows; it must not
    exceed either head's V. Returns ``(kl, ids, weights, stats)``.
    """
    log_alpha = check_alpha(alpha)
    names = ("expert_hidden", "expert_head", "amateur_hidden", "amateur_head")
    layouts = (expert_head_layout, amateur_head_layout)
    v_expert, v_amateur = fused_pair_vocabs(
        names, expert_hidden, expert_head, layouts[0], amateur_hidden, amateur_head, layouts[1]
    )
    if vocab_size is None:
        if v_expert != v_amateur:
            raise ValueError(
                f"expert_head {jnp.shape(expert_head)} and amateur_head "
                f"{jnp.shape(amateur_head)} have different vocabulary sizes; "
                "pass vocab_size to compare the common ids"
            )
        vocab_size = v_expert
    vocab_size = check_positive_int("vocab_size", vocab_size)
    if vocab_size > min(v_expert, v_amateur):
        raise ValueError(
            f"vocab_size {vocab_size} exceeds the LM heads' vocabulary "
            f"({v_expert} expert, {v_amateur} amateur)"
        )
    k = check_k(k, vocab_size)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    return kernels.fused_kl_and_target(
        expert_hidden,
        expert_head,
        amateur_hidden,
        amateur_head,
        log_alpha=log_alpha,
        k=k,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
        layouts=layouts,
    )


def fused_contrastive_loss(
    hidden,
    head,
    target_ids,
    target_weights,
    position_mask,
    *,
    chunk_size,
    vocab_size=None,
    head_layout="dv",
):
    """``contrastive_loss(hidden @ head, ...)`` without [..., T, V] logits.

    ``hidden`` [..., T, D]; ``head`` [D, V] (``head_layout="dv"``, an ``nnx.Linear``
    kernel) or [V, D] (``"vd"``, a tied embedding). Gradients flow to both (the head's
    in its layout), computed block by block (logits are recomputed in the backward
    pass). ``vocab_size`` (default V) gives ids at and above it (padded head rows)
    logit -inf.
    """
    v = head_vocab("hidden", hidden, "head", head, head_layout)
    check_loss_inputs(jnp.shape(hidden)[:-1], target_ids, target_weights, position_mask)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    vocab_size = check_positive_int("vocab_size", v if vocab_size is None else vocab_size)
    if vocab_size > v:
        raise ValueError(f"vocab_size {vocab_size} exceeds head's vocabulary of {v} rows")
    return kernels.fused_loss(
        hidden,
        head,
        target_ids,
        target_weights,
        position_mask,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
        layout=head_layout,
    )


DISTILL_DIRECTIONS = ("forward", "reverse", "js")


def fused_distillation(
    student_hidden,
    student_head,
    teacher_hidden,
    teacher_head,
    target_ids,
    *,
    chunk_size,
    temperature=1.0,
    direction="forward",
    vocab_size=None,
    student_head_layout="dv",
    teacher_head_layout="dv",
):
    """Per position, from hidden states and LM heads: (ce, kd, agree), never [..., T, V].

    ce: −log softmax(z_s)[target_ids], the student's next-token loss. kd: the divergence
    between teacher and student at temperature τ, on softmax(z/τ): ``"forward"``
    KL(teacher‖student) (``token_kl``), ``"reverse"`` KL(student‖teacher)
    (``token_reverse_kl``) or ``"js"`` (``token_js``); no τ² factor. agree: argmax z_s ==
    argmax z_t. Hidden states [..., T, D_s] and [..., T, D_t], ``target_ids`` int [..., T];
    heads and layouts as in ``fused_token_kl``. ``vocab_size`` (default: the heads' common
    V) gives padded ids logit −inf in both. Gradients reach the student's hidden states
    and head only (the teacher's inputs are ``stop_gradient``-ed), block by block.
    """
    names = ("student_hidden", "student_head", "teacher_hidden", "teacher_head")
    layouts = (student_head_layout, teacher_head_layout)
    v_student, v_teacher = fused_pair_vocabs(
        names, student_hidden, student_head, layouts[0], teacher_hidden, teacher_head, layouts[1]
    )
    common = min(v_student, v_teacher)
    vocab_size = check_positive_int("vocab_size", common if vocab_size is None else vocab_size)
    if vocab_size > common:
        raise ValueError(
            f"vocab_size {vocab_size} exceeds the LM heads' vocabulary "
            f"({v_student} student, {v_teacher} teacher)"
        )
    if jnp.shape(target_ids) != jnp.shape(student_hidden)[:-1]:
        raise ValueError(
            f"target_ids must have shape {jnp.shape(student_hidden)[:-1]}, "
            f"got {jnp.shape(target_ids)}"
        )
    if direction not in DISTILL_DIRECTIONS:
        raise ValueError(f"direction must be one of {DISTILL_DIRECTIONS}, got {direction!r}")
    return kernels.fused_distill(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        target_ids,
        temperature=check_temperature(temperature),
        direction=direction,
        chunk_size=check_positive_int("chunk_size", chunk_size),
        vocab_size=vocab_size,
        layouts=layouts,
    )


def fused_loss_and_rank(hidden, head, target_ids, *, chunk_size, vocab_size=None, head_layout="dv"):
    """Per position: (−log softmax(z)[target], rank of the target), z = hidden @ head, fused.

    rank: how many ids have a strictly larger logit than the target (0 for the argmax),
    so the target is in the top-k iff rank < k. ``hidden`` [..., T, D], ``target_ids``
    int [..., T] below ``vocab_size`` (default V; ids at and above it are padded rows,
    logit −inf); head and layout as in ``fused_contrastive_loss``. Float32 and int32 [..., T].
    """
    v = head_vocab("hidden", hidden, "head", head, head_layout)
    if jnp.shape(target_ids) != jnp.shape(hidden)[:-1]:
        raise ValueError(
            f"target_ids must have shape {jnp.shape(hidden)[:-1]}, got {jnp.shape(target_ids)}"
        )
    vocab_size = check_positive_int("vocab_size", v if vocab_size is None else vocab_size)
    if vocab_size > v:
        raise ValueError(f"vocab_size {vocab_size} exceeds head's vocabulary of {v} rows")
    return kernels.fused_loss_and_rank(
        hidden,
        head,
        target_ids,
        chunk_size=check_positive_int("chunk_size", chunk_size),
        vocab_size=vocab_size,
        layout=head_layout,
    )
