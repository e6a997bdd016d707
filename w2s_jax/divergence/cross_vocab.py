"""KL(πE‖πA) and LightReasoner's contrastive target when expert and amateur have different
vocabularies, over the EXPERT's vocabulary.

The amateur's distribution is moved onto expert ids by the vocabulary map
(`w2s_jax.vocab_map`: `amateur_to_expert` int [Va], expert id or −1): the probabilities
of every amateur id mapped to expert id e add up at e (a log-sum-exp per segment, so
nothing underflows), and the amateur ids without an expert counterpart add up in one
extra residual slot r_A. `expert_mapped` (bool [Ve]) marks the expert ids some amateur
id lands on; the expert's mass off them is r_E.

Two ways to treat mass without a counterpart (``mode``):

- ``"renormalize"``: πE and πA both restricted to the mapped expert ids and renormalized;
  KL over them.
- ``"residual"``: each side keeps one residual bucket (r_E and r_A); KL over the mapped
  ids plus the bucket. An amateur that maps every id has r_A = 0: its bucket is floored
  at the smallest normal float32 (log ≈ −87.3) so the KL stays finite.

The contrastive target (docs/METHOD.md §1): the plausible set A = {a : πE(a) ≥ α·max πE} is
taken over the expert's FULL vocabulary; weights softmax(log πE − log πA) over A, the
top k kept and renormalized. A plausible expert id without an amateur counterpart is
dropped from the target in ``"renormalize"`` mode (where πA gives it no number) and
scored against the residual, log πA(a) := log r_A (an upper bound on what the amateur
could give it, so its weight is a lower bound), in ``"residual"`` mode. When no
plausible id is left (renormalize, every plausible id unmapped) the position has no
target: ``has_target`` is False and it must not be selected.

Per position the functions also report ``mapped_mass`` = 1 − r_A, the share of the
amateur's probability that the map carries. Everything is float32, jittable, and the
fused variant works from hidden states and LM heads chunk by chunk like
``fused_kl_and_target`` (never [..., T, V] logits of both models at once).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from w2s_jax.divergence import kernels
from w2s_jax.divergence.checks import (
    check_alpha,
    check_k,
    check_positive_int,
    fused_pair_vocabs,
)
from w2s_jax.vocab_map import UNMAPPED_MASS_MODES

_LOG_TINY = math.log(float(np.finfo(np.float32).tiny))


def _mapped_log_probs(amateur_logits, amateur_to_expert, expert_vocab):
    """log πA summed onto expert ids: ([..., Ve] (−inf where nothing maps), [...] log r_A)."""
    lead = jnp.shape(amateur_logits)[:-1]
    logp = jax.nn.log_softmax(amateur_logits.astype(jnp.float32), axis=-1)
    flat = jnp.reshape(logp, (-1, jnp.shape(logp)[-1])).T  # [Va, N]: segments on axis 0
    seg = jnp.where(amateur_to_expert >= 0, amateur_to_expert, expert_vocab)
    n = expert_vocab + 1
    top = jax.ops.segment_max(flat, seg, num_segments=n)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jax.ops.segment_sum(jnp.exp(flat - top[seg]), seg, num_segments=n)
    log_mass = (top + jnp.log(total)).T.reshape(lead + (n,))
    return log_mass[..., :expert_vocab], log_mass[..., expert_vocab]


def _cross_rows(
    expert_logits, amateur_logits, amateur_to_expert, expert_mapped, *, log_alpha, k, mode
):
    """(kl, ids, weights, stats) at positions [...] from logits [..., Ve] and [..., Va]."""
    z_e = expert_logits.astype(jnp.float32)
    logp_e = jax.nn.log_softmax(z_e, axis=-1)
    log_a, log_res_a = _mapped_log_probs(amateur_logits, amateur_to_expert, jnp.shape(z_e)[-1])
    mapped_mass = -jnp.expm1(log_res_a)
    mapped_e = jnp.where(expert_mapped, logp_e, -jnp.inf)
    if mode == "renormalize":
        kl = kernels._kl_terms(
            jax.nn.log_softmax(mapped_e, axis=-1), jax.nn.log_softmax(log_a, axis=-1)
        )
        log_a_target = log_a  # −inf at unmapped ids: dropped below
    else:
        log_res_e = jax.nn.logsumexp(jnp.where(expert_mapped, -jnp.inf, logp_e), axis=-1)
        log_res_a = jnp.maximum(log_res_a, _LOG_TINY)
        kl = kernels._kl_terms(
            jnp.concatenate([mapped_e, log_res_e[..., None]], axis=-1),
            jnp.concatenate([log_a, log_res_a[..., None]], axis=-1),
        )
        log_a_target = jnp.where(expert_mapped, log_a, log_res_a[..., None])
    plausible = kernels.mask(z_e, log_alpha)
    candidates = plausible & (expert_mapped if mode == "renormalize" else True)
    score = jnp.where(candidates, logp_e - log_a_target, -jnp.inf)
    ids, weights, stats = kernels.sparse_target(score, plausible, k, True)
    stats["has_target"] = jnp.any(candidates, axis=-1)
    stats["mapped_mass"] = mapped_mass
    return kl, ids, weights, stats


def _check_map(amateur_to_expert, expert_mapped, v_expert, v_amateur):
    if jnp.shape(amateur_to_expert) != (v_amateur,):
        raise ValueError(
            f"amateur_to_expert must have shape ({v_amateur},) (the amateur vocabulary), "
            f"got {jnp.shape(amateur_to_expert)}"
        )
    if jnp.shape(expert_mapped) != (v_expert,):
        raise ValueError(
            f"expert_mapped must have shape ({v_expert},) (the expert vocabulary), "
            f"got {jnp.shape(expert_mapped)}"
        )


def _check_mode(mode):
    if mode not in UNMAPPED_MASS_MODES:
        raise ValueError(f"mode must be one of {UNMAPPED_MASS_MODES}, got {mode!r}")


def cross_kl_and_target(
    expert_logits, amateur_logits, amateur_to_expert, expert_mapped, alpha, k, *, mode
):
    """KL(πE‖πA) over expert ids and the contrastive target, from logits [..., Ve], [..., Va].

    Returns ``(kl, ids, weights, stats)``; stats: ``plausible_size`` (|A| over the full
    expert vocabulary), ``dropped_mass`` (target mass cut by top-k), ``has_target``,
    ``mapped_mass``. See the module docstring for ``mode``.
    """
    log_alpha = check_alpha(alpha)
    _check_mode(mode)
    v_expert, v_amateur = jnp.shape(expert_logits)[-1], jnp.shape(amateur_logits)[-1]
    if jnp.shape(expert_logits)[:-1] != jnp.shape(amateur_logits)[:-1]:
        raise ValueError(
            f"expert_logits {jnp.shape(expert_logits)} and amateur_logits "
            f"{jnp.shape(amateur_logits)} must share their leading axes"
        )
    _check_map(amateur_to_expert, expert_mapped, v_expert, v_amateur)
    return _cross(
        expert_logits,
        amateur_logits,
        jnp.asarray(amateur_to_expert, jnp.int32),
        jnp.asarray(expert_mapped, bool),
        log_alpha=log_alpha,
        k=check_k(k, v_expert),
        mode=mode,
    )


@functools.partial(jax.jit, static_argnames=("log_alpha", "k", "mode"))
def _cross(expert_logits, amateur_logits, a2e, mapped, *, log_alpha, k, mode):
    return _cross_rows(
        expert_logits, amateur_logits, a2e, mapped, log_alpha=log_alpha, k=k, mode=mode
    )


def fused_cross_kl_and_target(
    expert_hidden,
    expert_head,
    amateur_hidden,
    amateur_head,
    amateur_to_expert,
    expert_mapped,
    alpha,
    k,
    *,
    mode,
    chunk_size,
    expert_vocab_size,
    amateur_vocab_size,
    expert_head_layout="dv",
    amateur_head_layout="dv",
):
    """``cross_kl_and_target`` of the logits ``hidden @ head``, ``chunk_size`` positions at
    a time. Heads as in ``fused_kl_and_target``; ids at and above ``expert_vocab_size`` /
    ``amateur_vocab_size`` (padded head rows) are dropped. ``amateur_to_expert`` has
    ``amateur_vocab_size`` entries, ``expert_mapped`` ``expert_vocab_size``."""
    log_alpha = check_alpha(alpha)
    _check_mode(mode)
    names = ("expert_hidden", "expert_head", "amateur_hidden", "amateur_head")
    layouts = (expert_head_layout, amateur_head_layout)
    v_e, v_a = fused_pair_vocabs(
        names, expert_hidden, expert_head, layouts[0], amateur_hidden, amateur_head, layouts[1]
    )
    expert_vocab_size = check_positive_int("expert_vocab_size", expert_vocab_size)
    amateur_vocab_size = check_positive_int("amateur_vocab_size", amateur_vocab_size)
    if expert_vocab_size > v_e or amateur_vocab_size > v_a:
        raise ValueError(
            f"vocab sizes {expert_vocab_size} (expert) and {amateur_vocab_size} (amateur) "
            f"exceed the LM heads' {v_e} and {v_a} rows"
        )
    _check_map(amateur_to_expert, expert_mapped, expert_vocab_size, amateur_vocab_size)
    return _fused_cross(
        expert_hidden,
        expert_head,
        amateur_hidden,
        amateur_head,
        jnp.asarray(amateur_to_expert, jnp.int32),
        jnp.asarray(expert_mapped, bool),
        log_alpha=log_alpha,
        k=check_k(k, expert_vocab_size),
        mode=mode,
        chunk_size=check_positive_int("chunk_size", chunk_size),
        sizes=(expert_vocab_size, amateur_vocab_size),
        layouts=layouts,
    )


@functools.partial(
    jax.jit, static_argnames=("log_alpha", "k", "mode", "chunk_size", "sizes", "layouts")
)
def _fused_cross(
    he, head_e, ha, head_a, a2e, mapped, *, log_alpha, k, mode, chunk_size, sizes, layouts
):
    def block(he, ha):
        ze = kernels._logits(he, head_e, layouts[0], sizes[0], sizes[0])
        za = kernels._logits(ha, head_a, layouts[1], sizes[1], sizes[1])
        return _cross_rows(ze, za, a2e, mapped, log_alpha=log_alpha, k=k, mode=mode)

    return kernels._map_position_chunks(block, (he, ha), kernels._position_axis(he), chunk_size)
