"""Per-token divergences, LightReasoner's contrastive targets and the contrastive loss.

Pure ``jax.numpy``: every function is jit-able, works over any leading axes (the last
axis is the vocabulary, or the hidden size for the fused variants) and accumulates in
float32 whatever the input dtype. Scalars that fix shapes or masks (``alpha``, ``k``,
``chunk_size``, ``vocab_size``) must be static Python numbers; they are checked when
the function is traced, so bad values raise ``ValueError`` under ``jax.jit`` too.

Logits may contain ``-inf`` (e.g. padded vocabulary rows): tokens with probability 0
under the first distribution contribute 0 to a KL. Every row needs at least one finite
logit, and ``+inf``/NaN logits are not supported.

Memory-lean variants split the work along the position axis (the axis just before
the vocabulary / hidden axis) into blocks of ``chunk_size`` positions, keeping all
other leading axes (e.g. a data-sharded batch) whole, so the largest live intermediate
is ``batch × chunk_size × V`` float32. The ``fused_*`` variants take final hidden
states and the LM-head matrix ``[D, V]`` and form logits block by block, under
``jax.checkpoint`` so the backward pass is blocked too: ``[..., T, V]`` logits never exist.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "contrastive_loss",
    "contrastive_target",
    "contrastive_target_chunked",
    "fused_contrastive_loss",
    "fused_kl_and_target",
    "fused_token_kl",
    "plausibility_mask",
    "select_steps",
    "token_js",
    "token_kl",
    "token_kl_chunked",
    "token_reverse_kl",
]


# --- static argument checks (run at trace time) -----------------------------


def _static_number(name, value, convert):
    try:
        return convert(value)
    except (TypeError, ValueError, jax.errors.JAXTypeError):
        raise ValueError(
            f"{name} must be a static Python number (mark it static under jax.jit), got {value!r}"
        ) from None


def _check_alpha(alpha) -> float:
    """log(alpha) for alpha in (0, 1]."""
    value = _static_number("alpha", alpha, float)
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must lie in (0, 1], got {alpha!r}")
    return math.log(value)


def _check_positive_int(name, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    number = _static_number(name, value, operator.index)
    if number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return number


def _check_logits(name, logits):
    if jnp.ndim(logits) < 1:
        raise ValueError(f"{name} must have a vocabulary axis, got shape {jnp.shape(logits)}")


def _check_pair(p_name, p_logits, q_name, q_logits):
    _check_logits(p_name, p_logits)
    if jnp.shape(p_logits) != jnp.shape(q_logits):
        raise ValueError(
            f"{p_name} and {q_name} must have the same shape, got "
            f"{jnp.shape(p_logits)} and {jnp.shape(q_logits)}"
        )


def _check_k(k, vocab: int) -> int:
    k = _check_positive_int("k", k)
    if k > vocab:
        raise ValueError(f"k must be at most the vocabulary size {vocab}, got {k}")
    return k


# --- per-block math (shared by the plain, chunked and fused entry points) ----


def _kl_terms(logp, logr):
    """Σ_v exp(logp)·(logp − logr) over the last axis; terms with p = 0 give 0."""
    present = logp > -jnp.inf
    diff = jnp.where(present, logp - logr, 0.0)  # no inf - inf, no NaN gradient
    return jnp.sum(jnp.exp(logp) * diff, axis=-1)


# XLA:CPU turns a whole-array softmax pipeline into several [N, V] temporaries; blocks
# of a few rows (a power of two, up to this many elements) stay in cache and run ~4x faster.
_CPU_BLOCK_ELEMENTS = 1 << 20


def _explicit_spec(x) -> tuple:
    """x's PartitionSpec under explicit sharding, one entry per axis (all None otherwise)."""
    spec = tuple(getattr(jax.typeof(x).sharding, "spec", None) or ())
    return spec + (None,) * (jnp.ndim(x) - len(spec))


def _explicit_out(like):
    """out_sharding matching ``like`` on explicit meshes (where jax needs it), else None."""
    mesh = getattr(jax.typeof(like).sharding, "mesh", None)
    explicit = any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
    return jax.sharding.PartitionSpec(*_explicit_spec(like)) if explicit else None


def _gather_vocab(x):
    """x [..., V] with the last axis unsharded (a no-op unless explicitly sharded there)."""
    spec = _explicit_spec(x)
    if spec[-1] is None:
        return x
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*spec[:-1], None))


def _by_rows(fn, *arrays):
    """fn(*arrays) for arrays [..., X_i] sharing leading axes, in row blocks on CPU.

    Other backends, and leading axes explicitly sharded over a mesh, run ``fn`` on the
    whole arrays.
    """
    lead = jnp.shape(arrays[0])[:-1]
    n = math.prod(lead)
    width = max(jnp.shape(a)[-1] for a in arrays)
    rows = 1 << min(4, max(1, (_CPU_BLOCK_ELEMENTS // width).bit_length() - 1))
    if n <= rows or any(_explicit_spec(arrays[0])[:-1]):
        return fn(*arrays)

    def cpu(*arrays):
        flat = tuple(jnp.reshape(a, (n, jnp.shape(a)[-1])) for a in arrays)
        out = jax.lax.map(lambda xs: fn(*xs), flat, batch_size=rows)
        return jax.tree.map(lambda y: y.reshape(lead + y.shape[1:]), out)

    return jax.lax.platform_dependent(*arrays, cpu=cpu, default=fn)


def _kl_rows(p_logits, q_logits):
    return _kl_terms(
        jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1),
        jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1),
    )


# The kernels below are jitted (static configuration as keywords) so eager calls from a
# notebook compile once per shape instead of re-tracing the loops on every call.
def _jit(*static_argnames):
    return functools.partial(jax.jit, static_argnames=static_argnames)


@_jit()
def _kl(p_logits, q_logits):
    return _by_rows(_kl_rows, p_logits, q_logits)


def _js_rows(p_logits, q_logits):
    logp = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    logm = jnp.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * (_kl_terms(logp, logm) + _kl_terms(logq, logm))


@_jit()
def _js(p_logits, q_logits):
    return _by_rows(_js_rows, p_logits, q_logits)


def _mask(expert_logits, log_alpha):
    z = expert_logits.astype(jnp.float32)
    return z - jnp.max(z, axis=-1, keepdims=True) >= log_alpha


def _target_rows(expert_logits, amateur_logits, log_alpha, k, with_stats):
    """Top-k of softmax(log πE − log πA) over the plausible set, renormalized."""
    mask = _mask(expert_logits, log_alpha)
    # log πE − log πA = zE − zA + const per position; the constant cancels in the softmax.
    score = jnp.where(
        mask, expert_logits.astype(jnp.float32) - amateur_logits.astype(jnp.float32), -jnp.inf
    )
    score = _gather_vocab(score)  # top_k needs the vocabulary whole on explicit meshes
    top, ids = jax.lax.top_k(score, k)
    # No slicing of top/ids: XLA:CPU only keeps its fast TopK kernel (instead of a full
    # sort of V) when the outputs are used whole. Sorted, so slot 0 holds the best.
    first = jnp.arange(k) == 0
    best = jnp.max(top, axis=-1, keepdims=True)
    # Shift by the best score; `== best` keeps a +inf score (amateur gives 0 to a
    # plausible token) finite, so all mass goes to such tokens, as in the limit.
    unnorm = jnp.exp(jnp.where(top == best, 0.0, top - best))
    kept = jnp.sum(unnorm, axis=-1, keepdims=True)
    weights = unnorm / kept
    best_id = jnp.sum(jnp.where(first, ids, 0), axis=-1, keepdims=True)
    ids = jnp.where(top > -jnp.inf, ids, best_id).astype(jnp.int32)
    if not with_stats:
        return ids, weights
    total = jnp.sum(jnp.exp(jnp.where(score == best, 0.0, score - best)), axis=-1)
    stats = {
        "dropped_mass": jnp.clip(1.0 - kept[..., 0] / total, 0.0, 1.0),
        "plausible_size": jnp.sum(mask, axis=-1, dtype=jnp.int32),
    }
    return ids, weights, stats


@_jit("log_alpha", "k", "with_stats")
def _target(expert_logits, amateur_logits, *, log_alpha, k, with_stats):
    rows = functools.partial(_target_rows, log_alpha=log_alpha, k=k, with_stats=with_stats)
    return _by_rows(rows, expert_logits, amateur_logits)


def _soft_ce_rows(logits, target_ids, target_weights):
    """−Σ_j w_j log softmax(logits)[ids_j] per position, without forming log-probs."""
    z = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    z = _gather_vocab(z)  # the gather below needs the vocabulary whole on explicit meshes
    w = target_weights.astype(jnp.float32)
    used = w != 0  # weight-0 (padding) slots are skipped whatever their id
    in_range = (target_ids >= 0) & (target_ids < jnp.shape(z)[-1])
    z_ids = jnp.take_along_axis(z, jnp.clip(target_ids, 0, jnp.shape(z)[-1] - 1), axis=-1)
    z_ids = jnp.where(used, jnp.where(in_range, z_ids, jnp.nan), 0.0)  # bad id -> NaN loss
    return jnp.sum(jnp.where(used, w * (lse - z_ids), 0.0), axis=-1)


def _soft_ce(logits, target_ids, target_weights):
    return _by_rows(_soft_ce_rows, logits, target_ids, target_weights)


def _masked_mean(values, position_mask):
    mask = jnp.asarray(position_mask).astype(bool)
    total = jnp.sum(jnp.where(mask, values, 0.0))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


@_jit()
def _loss(logits, target_ids, target_weights, position_mask):
    return _masked_mean(_soft_ce(logits, target_ids, target_weights), position_mask)


@jax.custom_vjp
def _project(hidden, head_dv):
    """Logits hidden @ head_dv in float32 (float32 accumulation whatever the input dtype)."""
    return jnp.matmul(hidden, head_dv, preferred_element_type=jnp.float32)


def _project_fwd(hidden, head_dv):
    return _project(hidden, head_dv), (hidden, head_dv)


def _project_bwd(residuals, grad_logits):
    # The logits' cotangent is cast to the head's dtype (mixed-precision practice). Plain
    # autodiff would instead upcast the whole [D, V] head to float32 once, outside the
    # chunk loop: a bf16 Qwen2.5-1.5B head would cost 0.9 GB of extra memory.
    hidden, head_dv = residuals
    grad_logits = grad_logits.astype(head_dv.dtype)
    grad_hidden = jnp.einsum(
        "...v,dv->...d",
        grad_logits,
        head_dv,
        preferred_element_type=jnp.float32,
        out_sharding=_explicit_out(hidden),
    )
    grad_head = jnp.einsum(
        "...d,...v->dv",
        hidden,
        grad_logits,
        preferred_element_type=jnp.float32,
        out_sharding=_explicit_out(head_dv),
    )
    return grad_hidden.astype(hidden.dtype), grad_head.astype(head_dv.dtype)


_project.defvjp(_project_fwd, _project_bwd)


# --- position chunking ---------------------------------------------------------


def _map_position_chunks(fn, args, axis, chunk_size):
    """fn(*args) computed block by block along the position axis ``axis``.

    Every array in ``args`` has the same leading shape ``[..., T]`` (T at ``axis``)
    followed by its own trailing axes; ``fn`` maps blocks ``[..., c, *]`` to a pytree
    of ``[..., c, *]``.
    Blocks are taken in place with dynamic slices (no padded copy): the last block
    starts at T − c and overlaps its predecessor; the overlap is computed twice and
    kept once. ``fn`` runs under ``jax.checkpoint``, so its backward pass recomputes
    the block instead of storing it.
    """
    if axis < 0 or jnp.shape(args[0])[axis] <= chunk_size:
        return fn(*args)
    n = jnp.shape(args[0])[axis]
    starts = np.minimum(np.arange(0, n, chunk_size), n - chunk_size).astype(np.int32)
    block_fn = jax.checkpoint(fn, prevent_cse=False)

    def body(carry, start):
        blocks = [jax.lax.dynamic_slice_in_dim(a, start, chunk_size, axis) for a in args]
        return carry, block_fn(*blocks)

    _, stacked = jax.lax.scan(body, None, jnp.asarray(starts))
    overlap = len(starts) * chunk_size - n
    kept_full = (len(starts) - 1) * chunk_size

    def assemble(y):  # [n_blocks, ..., c, *] -> [..., T, *]
        y = jnp.moveaxis(y, 0, axis)
        y = y.reshape(y.shape[:axis] + (len(starts) * chunk_size,) + y.shape[axis + 2 :])
        head = jax.lax.slice_in_dim(y, 0, kept_full, axis=axis)
        tail = jax.lax.slice_in_dim(y, kept_full + overlap, y.shape[axis], axis=axis)
        return jnp.concatenate([head, tail], axis=axis)

    return jax.tree.map(assemble, stacked)


# --- public API ------------------------------------------------------------------


def token_kl(p_logits, q_logits):
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) per position, from raw logits [..., V].

    Exact (log-softmax, no epsilon). Returns float32 [...]. Terms with p_v = 0
    (logit -inf) contribute 0; q_v = 0 where p_v > 0 gives +inf.
    """
    _check_pair("p_logits", p_logits, "q_logits", q_logits)
    return _kl(p_logits, q_logits)


def token_reverse_kl(p_logits, q_logits):
    """KL(q‖p) per position (the reverse direction of ``token_kl``)."""
    _check_pair("p_logits", p_logits, "q_logits", q_logits)
    return _kl(q_logits, p_logits)


def token_js(p_logits, q_logits):
    """Jensen–Shannon divergence ½KL(p‖m) + ½KL(q‖m), m = (p + q)/2, in nats (≤ log 2)."""
    _check_pair("p_logits", p_logits, "q_logits", q_logits)
    return _js(p_logits, q_logits)


def plausibility_mask(expert_logits, alpha):
    """bool [..., V]: πE(a) ≥ alpha · max_b πE(b), alpha in (0, 1]. Never empty."""
    log_alpha = _check_alpha(alpha)
    _check_logits("expert_logits", expert_logits)
    return _mask(expert_logits, log_alpha)


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
    log_alpha = _check_alpha(alpha)
    _check_pair("expert_logits", expert_logits, "amateur_logits", amateur_logits)
    k = _check_k(k, jnp.shape(expert_logits)[-1])
    return _target(
        expert_logits, amateur_logits, log_alpha=log_alpha, k=k, with_stats=bool(with_stats)
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


def _check_loss_inputs(lead, target_ids, target_weights, position_mask):
    if jnp.shape(target_ids) != jnp.shape(target_weights):
        raise ValueError(
            f"target_ids and target_weights must have the same shape, got "
            f"{jnp.shape(target_ids)} and {jnp.shape(target_weights)}"
        )
    if jnp.ndim(target_ids) < 1 or jnp.shape(target_ids)[:-1] != lead:
        raise ValueError(f"target_ids must have shape {lead + ('k',)}, got {jnp.shape(target_ids)}")
    if not jnp.issubdtype(jnp.result_type(target_ids), jnp.integer):
        raise ValueError(f"target_ids must be integers, got {jnp.result_type(target_ids)}")
    if jnp.shape(position_mask) != lead:
        raise ValueError(f"position_mask must have shape {lead}, got {jnp.shape(position_mask)}")


def contrastive_loss(logits, target_ids, target_weights, position_mask):
    """Mean over selected positions of −Σ_j w_j log softmax(logits)[ids_j] (float32 scalar).

    ``logits`` [..., V], ``target_ids``/``target_weights`` [..., k], ``position_mask``
    [...] (True where a target applies). This is KL(v_C‖πθ) up to a constant. With no
    selected position the loss is 0 with zero gradient. Ids of slots with nonzero
    weight must lie in [0, V); an id outside makes the loss NaN (values cannot raise
    under jit).
    """
    _check_logits("logits", logits)
    _check_loss_inputs(jnp.shape(logits)[:-1], target_ids, target_weights, position_mask)
    return _loss(logits, target_ids, target_weights, position_mask)


def token_kl_chunked(p_logits, q_logits, *, chunk_size):
    """``token_kl`` computed ``chunk_size`` positions at a time (same values)."""
    _check_pair("p_logits", p_logits, "q_logits", q_logits)
    return _kl_chunked(p_logits, q_logits, chunk_size=_check_positive_int("chunk_size", chunk_size))


@_jit("chunk_size")
def _kl_chunked(p_logits, q_logits, *, chunk_size):
    return _map_position_chunks(_kl, (p_logits, q_logits), jnp.ndim(p_logits) - 2, chunk_size)


def contrastive_target_chunked(
    expert_logits, amateur_logits, alpha, k, *, chunk_size, with_stats=False
):
    """``contrastive_target`` computed ``chunk_size`` positions at a time (same values)."""
    log_alpha = _check_alpha(alpha)
    _check_pair("expert_logits", expert_logits, "amateur_logits", amateur_logits)
    k = _check_k(k, jnp.shape(expert_logits)[-1])
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    return _target_chunked(
        expert_logits,
        amateur_logits,
        log_alpha=log_alpha,
        k=k,
        with_stats=bool(with_stats),
        chunk_size=chunk_size,
    )


@_jit("log_alpha", "k", "with_stats", "chunk_size")
def _target_chunked(expert_logits, amateur_logits, *, log_alpha, k, with_stats, chunk_size):
    return _map_position_chunks(
        functools.partial(_target, log_alpha=log_alpha, k=k, with_stats=with_stats),
        (expert_logits, amateur_logits),
        jnp.ndim(expert_logits) - 2,
        chunk_size,
    )


def _check_hidden_head(hidden_name, hidden, head_name, head_dv):
    if jnp.ndim(head_dv) != 2:
        raise ValueError(f"{head_name} must be [D, V], got shape {jnp.shape(head_dv)}")
    if jnp.ndim(hidden) < 1 or jnp.shape(hidden)[-1] != jnp.shape(head_dv)[0]:
        raise ValueError(
            f"{hidden_name} [..., D] and {head_name} [D, V] disagree on D: "
            f"{jnp.shape(hidden)} and {jnp.shape(head_dv)}"
        )


def _check_fused_pair(p_hidden, p_head_dv, q_hidden, q_head_dv, names):
    p_hidden_name, p_head_name, q_hidden_name, q_head_name = names
    _check_hidden_head(p_hidden_name, p_hidden, p_head_name, p_head_dv)
    _check_hidden_head(q_hidden_name, q_hidden, q_head_name, q_head_dv)
    if jnp.shape(p_hidden)[:-1] != jnp.shape(q_hidden)[:-1]:
        raise ValueError(
            f"{p_hidden_name} and {q_hidden_name} must have the same leading shape, got "
            f"{jnp.shape(p_hidden)} and {jnp.shape(q_hidden)}"
        )


def fused_token_kl(p_hidden, p_head_dv, q_hidden, q_head_dv, *, chunk_size):
    """``token_kl(p_hidden @ p_head_dv, q_hidden @ q_head_dv)`` without [..., T, V] logits.

    Hidden states [..., T, D_p] and [..., T, D_q] (D may differ), heads [D, V] with the
    same V. Differentiable; the backward pass is blocked too.
    """
    names = ("p_hidden", "p_head_dv", "q_hidden", "q_head_dv")
    _check_fused_pair(p_hidden, p_head_dv, q_hidden, q_head_dv, names)
    if jnp.shape(p_head_dv)[1] != jnp.shape(q_head_dv)[1]:
        raise ValueError(
            f"p_head_dv and q_head_dv must have the same vocabulary size, got "
            f"{jnp.shape(p_head_dv)} and {jnp.shape(q_head_dv)}"
        )
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    return _fused_kl(p_hidden, p_head_dv, q_hidden, q_head_dv, chunk_size=chunk_size)


@_jit("chunk_size")
def _fused_kl(p_hidden, p_head_dv, q_hidden, q_head_dv, *, chunk_size):
    return _map_position_chunks(
        lambda hp, hq: _kl(_project(hp, p_head_dv), _project(hq, q_head_dv)),
        (p_hidden, q_hidden),
        jnp.ndim(p_hidden) - 2,
        chunk_size,
    )


def fused_kl_and_target(
    expert_hidden,
    expert_head_dv,
    amateur_hidden,
    amateur_head_dv,
    alpha,
    k,
    *,
    chunk_size,
    vocab_size=None,
):
    """KL(πE‖πA) and the contrastive target straight from hidden states.

    Equals ``token_kl`` and ``contrastive_target(..., with_stats=True)`` on the logits
    ``hidden @ head[:, :vocab_size]``, computed ``chunk_size`` positions at a time.
    ``vocab_size`` (default: the heads' common V) drops padded rows of the LM heads;
    it must not exceed either head's V. Returns ``(kl, ids, weights, stats)``.
    """
    log_alpha = _check_alpha(alpha)
    names = ("expert_hidden", "expert_head_dv", "amateur_hidden", "amateur_head_dv")
    _check_fused_pair(expert_hidden, expert_head_dv, amateur_hidden, amateur_head_dv, names)
    v_expert, v_amateur = jnp.shape(expert_head_dv)[1], jnp.shape(amateur_head_dv)[1]
    if vocab_size is None:
        if v_expert != v_amateur:
            raise ValueError(
                f"expert_head_dv {jnp.shape(expert_head_dv)} and amateur_head_dv "
                f"{jnp.shape(amateur_head_dv)} have different vocabulary sizes; "
                "pass vocab_size to compare the common ids"
            )
        vocab_size = v_expert
    vocab_size = _check_positive_int("vocab_size", vocab_size)
    if vocab_size > min(v_expert, v_amateur):
        raise ValueError(
            f"vocab_size {vocab_size} exceeds the LM heads' vocabulary "
            f"({v_expert} expert, {v_amateur} amateur)"
        )
    k = _check_k(k, vocab_size)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    common = min(v_expert, v_amateur)
    return _fused_kl_and_target(
        expert_hidden,
        jax.lax.slice_in_dim(expert_head_dv, 0, common, axis=1),
        amateur_hidden,
        jax.lax.slice_in_dim(amateur_head_dv, 0, common, axis=1),
        log_alpha=log_alpha,
        k=k,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
    )


@_jit("log_alpha", "k", "chunk_size", "vocab_size")
def _fused_kl_and_target(
    expert_hidden,
    expert_head_dv,
    amateur_hidden,
    amateur_head_dv,
    *,
    log_alpha,
    k,
    chunk_size,
    vocab_size,
):
    # Ids >= vocab_size get logit -inf (probability 0 under both models) rather than being
    # sliced off: same numbers, and no uneven split of a vocabulary sharded over a mesh.
    real = jnp.arange(jnp.shape(expert_head_dv)[1]) < vocab_size

    def block(he, ha):
        ze = jnp.where(real, _project(he, expert_head_dv), -jnp.inf)
        za = jnp.where(real, _project(ha, amateur_head_dv), -jnp.inf)
        return (_kl(ze, za), *_target(ze, za, log_alpha=log_alpha, k=k, with_stats=True))

    return _map_position_chunks(
        block, (expert_hidden, amateur_hidden), jnp.ndim(expert_hidden) - 2, chunk_size
    )


def fused_contrastive_loss(
    hidden, head_dv, target_ids, target_weights, position_mask, *, chunk_size, vocab_size=None
):
    """``contrastive_loss(hidden @ head_dv, ...)`` without [..., T, V] logits.

    ``hidden`` [..., T, D], ``head_dv`` [D, V]; gradients flow to both, computed block
    by block (logits are recomputed in the backward pass). ``vocab_size`` (default V)
    gives ids at and above it (padded head rows) logit -inf.
    """
    _check_hidden_head("hidden", hidden, "head_dv", head_dv)
    _check_loss_inputs(jnp.shape(hidden)[:-1], target_ids, target_weights, position_mask)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    rows = jnp.shape(head_dv)[1]
    vocab_size = _check_positive_int("vocab_size", rows if vocab_size is None else vocab_size)
    if vocab_size > rows:
        raise ValueError(f"vocab_size {vocab_size} exceeds head_dv's {rows} rows")
    return _fused_loss(
        hidden,
        head_dv,
        target_ids,
        target_weights,
        position_mask,
        chunk_size=chunk_size,
        vocab_size=vocab_size,
    )


@_jit("chunk_size", "vocab_size")
def _fused_loss(
    hidden, head_dv, target_ids, target_weights, position_mask, *, chunk_size, vocab_size
):
    real = jnp.arange(jnp.shape(head_dv)[1]) < vocab_size
    per_position = _map_position_chunks(
        lambda h, ids, w: _soft_ce(jnp.where(real, _project(h, head_dv), -jnp.inf), ids, w),
        (hidden, target_ids, target_weights),
        jnp.ndim(hidden) - 2,
        chunk_size,
    )
    return _masked_mean(per_position, position_mask)
