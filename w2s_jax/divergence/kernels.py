"""The jitted math behind ``w2s_jax.divergence``: arguments are already checked.

Per-block math shared by the plain, chunked and fused entry points; row blocking
for XLA:CPU; position chunking under ``jax.checkpoint``; the LM-head projection in
the head's stored layout. Static configuration is passed as keywords.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# --- per-block math -------------------------------------------------------------------


def _kl_terms(logp, logr):
    """Σ_v exp(logp)·(logp − logr) over the last axis; terms with p = 0 give 0."""
    present = logp > -jnp.inf
    diff = jnp.where(present, logp - logr, 0.0)  # no inf - inf, no NaN gradient
    return jnp.sum(jnp.exp(logp) * diff, axis=-1)


# XLA:CPU turns a whole-array softmax pipeline into several [N, V] temporaries; blocks
# of a few rows (a power of two, up to this many elements) stay in cache and run ~4x faster.
_CPU_BLOCK_ELEMENTS = 1 << 20


def _by_rows(fn, *arrays):
    """fn(*arrays) for arrays [..., X_i] sharing leading axes, in row blocks on CPU.

    Other backends run ``fn`` on the whole arrays.
    """
    lead = jnp.shape(arrays[0])[:-1]
    n = math.prod(lead)
    width = max(jnp.shape(a)[-1] for a in arrays)
    rows = 1 << min(4, max(1, (_CPU_BLOCK_ELEMENTS // width).bit_length() - 1))
    if n <= rows:
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


# The kernels are jitted (static configuration as keywords) so eager calls from a
# notebook compile once per shape instead of re-tracing the loops on every call.
def _jit(*static_argnames):
    return functools.partial(jax.jit, static_argnames=static_argnames)


@_jit()
def kl(p_logits, q_logits):
    return _by_rows(_kl_rows, p_logits, q_logits)


def _js_rows(p_logits, q_logits):
    logp = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    logm = jnp.logaddexp(logp, logq) - math.log(2.0)
    return 0.5 * (_kl_terms(logp, logm) + _kl_terms(logq, logm))


@_jit()
def js(p_logits, q_logits):
    return _by_rows(_js_rows, p_logits, q_logits)


def mask(expert_logits, log_alpha):
    z = expert_logits.astype(jnp.float32)
    return z - jnp.max(z, axis=-1, keepdims=True) >= log_alpha


def _target_rows(expert_logits, amateur_logits, log_alpha, k, with_stats):
    """Top-k of softmax(log πE − log πA) over the plausible set, renormalized."""
    plausible = mask(expert_logits, log_alpha)
    # log πE − log πA = zE − zA + const per position; the constant cancels in the softmax.
    score = jnp.where(
        plausible, expert_logits.astype(jnp.float32) - amateur_logits.astype(jnp.float32), -jnp.inf
    )
    return sparse_target(score, plausible, k, with_stats)


def sparse_target(score, plausible, k, with_stats):
    """Top-k of softmax(score) (score −inf outside the candidates), renormalized."""
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
        "plausible_size": jnp.sum(plausible, axis=-1, dtype=jnp.int32),
    }
    return ids, weights, stats


@_jit("log_alpha", "k", "with_stats")
def target(expert_logits, amateur_logits, *, log_alpha, k, with_stats):
    rows = functools.partial(_target_rows, log_alpha=log_alpha, k=k, with_stats=with_stats)
    return _by_rows(rows, expert_logits, amateur_logits)


def _soft_ce_rows(logits, target_ids, target_weights):
    """−Σ_j w_j log softmax(logits)[ids_j] per position, without forming log-probs."""
    z = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
    w = target_weights.astype(jnp.float32)
    used = w != 0  # weight-0 (padding) slots are skipped whatever their id
    in_range = (target_ids >= 0) & (target_ids < jnp.shape(z)[-1])
    z_ids = jnp.take_along_axis(z, jnp.clip(target_ids, 0, jnp.shape(z)[-1] - 1), axis=-1)
    z_ids = jnp.where(used, jnp.where(in_range, z_ids, jnp.nan), 0.0)  # bad id -> NaN loss
    return jnp.sum(jnp.where(used, w * (lse - z_ids), 0.0), axis=-1)


def _soft_ce(logits, target_ids, target_weights):
    return _by_rows(_soft_ce_rows, logits, target_ids, target_weights)


def _masked_mean(values, position_mask):
    selected = jnp.asarray(position_mask).astype(bool)
    total = jnp.sum(jnp.where(selected, values, 0.0))
    return total / jnp.maximum(jnp.sum(selected), 1).astype(jnp.float32)


@_jit()
def loss(logits, target_ids, target_weights, position_mask):
    return _masked_mean(_soft_ce(logits, target_ids, target_weights), position_mask)


# --- position chunking ------------------------------------------------------------------


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


def _position_axis(x):
    return jnp.ndim(x) - 2  # the axis before the vocabulary / hidden axis (-1: none)


@_jit("chunk_size")
def kl_chunked(p_logits, q_logits, *, chunk_size):
    return _map_position_chunks(kl, (p_logits, q_logits), _position_axis(p_logits), chunk_size)


@_jit("log_alpha", "k", "with_stats", "chunk_size")
def target_chunked(expert_logits, amateur_logits, *, log_alpha, k, with_stats, chunk_size):
    return _map_position_chunks(
        functools.partial(target, log_alpha=log_alpha, k=k, with_stats=with_stats),
        (expert_logits, amateur_logits),
        _position_axis(expert_logits),
        chunk_size,
    )


# --- fused: logits from hidden states and an LM head, block by block ---------------------

# Per head layout, einsum specs of the logits and of the cotangents wrt hidden and head.
# Every product contracts the head as stored: a transposed view of it passed into the
# position-chunk loop is materialized by XLA:CPU (0.87 GiB for the float32 embedding of
# Qwen2.5-Math-1.5B; benchmarks/fused_head_memory.py).
_PROJECTION = {
    "dv": ("...d,dv->...v", "...v,dv->...d", "...d,...v->dv"),
    "vd": ("...d,vd->...v", "...v,vd->...d", "...v,...d->vd"),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(hidden, head, layout):
    """Logits [..., V] of hidden [..., D] in float32 (float32 accumulation whatever the dtype)."""
    return jnp.einsum(_PROJECTION[layout][0], hidden, head, preferred_element_type=jnp.float32)


def _project_fwd(hidden, head, layout):
    return _project(hidden, head, layout), (hidden, head)


def _project_bwd(layout, residuals, grad_logits):
    # The logits' cotangent is cast to the head's dtype (mixed-precision practice). Plain
    # autodiff would instead upcast the whole head to float32 once, outside the chunk
    # loop: a bf16 Qwen2.5-1.5B head would cost 0.9 GB of extra memory.
    hidden, head = residuals
    _, hidden_spec, head_spec = _PROJECTION[layout]
    grad_logits = grad_logits.astype(head.dtype)
    grad_hidden = jnp.einsum(hidden_spec, grad_logits, head, preferred_element_type=jnp.float32)
    # Operands in the order of the head's axes: the gradient comes out in its layout.
    pair = (hidden, grad_logits) if layout == "dv" else (grad_logits, hidden)
    grad_head = jnp.einsum(head_spec, *pair, preferred_element_type=jnp.float32)
    return grad_hidden.astype(hidden.dtype), grad_head.astype(head.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def _logits(hidden, head, layout, width, vocab_size):
    """Logits of ids < width; ids >= vocab_size (padded head rows) get -inf.

    Padded ids are masked rather than sliced off: same numbers, and no uneven split of a
    vocabulary sharded over a mesh. A wider head is cut block by block (cutting the head
    itself would copy it).
    """
    z = _project(hidden, head, layout)
    if jnp.shape(z)[-1] > width:
        z = jax.lax.slice_in_dim(z, 0, width, axis=-1)
    if vocab_size == width:
        return z
    return jnp.where(jnp.arange(width) < vocab_size, z, -jnp.inf)


def _vocab(head, layout):
    return jnp.shape(head)[1 - layout.index("d")]


@_jit("chunk_size", "layouts")
def fused_kl(p_hidden, p_head, q_hidden, q_head, *, chunk_size, layouts):
    v = _vocab(p_head, layouts[0])

    def block(hp, hq):
        return kl(_logits(hp, p_head, layouts[0], v, v), _logits(hq, q_head, layouts[1], v, v))

    return _map_position_chunks(block, (p_hidden, q_hidden), _position_axis(p_hidden), chunk_size)


@_jit("log_alpha", "k", "chunk_size", "vocab_size", "layouts")
def fused_kl_and_target(he, head_e, ha, head_a, *, log_alpha, k, chunk_size, vocab_size, layouts):
    common = min(_vocab(head_e, layouts[0]), _vocab(head_a, layouts[1]))

    def block(he, ha):
        ze = _logits(he, head_e, layouts[0], common, vocab_size)
        za = _logits(ha, head_a, layouts[1], common, vocab_size)
        return (kl(ze, za), *target(ze, za, log_alpha=log_alpha, k=k, with_stats=True))

    return _map_position_chunks(block, (he, ha), _position_axis(he), chunk_size)


@_jit("chunk_size", "vocab_size", "layout")
def fused_loss(
    hidden, head, target_ids, target_weights, position_mask, *, chunk_size, vocab_size, layout
):
    width = _vocab(head, layout)

    def block(h, ids, w):
        return _soft_ce(_logits(h, head, layout, width, vocab_size), ids, w)

    per_position = _map_position_chunks(
        block, (hidden, target_ids, target_weights), _position_axis(hidden), chunk_size
    )
    return _masked_mean(per_position, position_mask)


# Knowledge distillation: D(teacher ‖ student) by direction, both logits already at τ.
_DISTILL = {
    "forward": lambda zt, zs: kl(zt, zs),
    "reverse": lambda zt, zs: kl(zs, zt),
    "js": lambda zt, zs: js(zt, zs),
}


@_jit("temperature", "direction", "chunk_size", "vocab_size", "layouts")
def fused_distill(
    hs, head_s, ht, head_t, target_ids, *, temperature, direction, chunk_size, vocab_size, layouts
):
    common = min(_vocab(head_s, layouts[0]), _vocab(head_t, layouts[1]))
    ht, head_t = jax.lax.stop_gradient((ht, head_t))  # the teacher is frozen
    divergence = _DISTILL[direction]

    def block(hs, ht, ids):
        zs = _logits(hs, head_s, layouts[0], common, vocab_size)
        zt = _logits(ht, head_t, layouts[1], common, vocab_size)
        ce = _soft_ce(zs, ids[..., None], jnp.ones(jnp.shape(ids) + (1,), jnp.float32))
        kd = divergence(zt / temperature, zs / temperature)
        agree = jnp.argmax(zs, axis=-1) == jnp.argmax(zt, axis=-1)
        return ce, kd, agree

    return _map_position_chunks(block, (hs, ht, target_ids), _position_axis(hs), chunk_size)


@_jit("chunk_size", "vocab_size", "layout")
def fused_loss_and_rank(hidden, head, target_ids, *, chunk_size, vocab_size, layout):
    width = _vocab(head, layout)

    def block(h, ids):
        z = _logits(h, head, layout, width, vocab_size)
        ce = _soft_ce(z, ids[..., None], jnp.ones(jnp.shape(ids) + (1,), jnp.float32))
        z_target = jnp.take_along_axis(z, ids[..., None], axis=-1)
        return ce, jnp.sum(z > z_target, axis=-1, dtype=jnp.int32)

    return _map_position_chunks(block, (hidden, target_ids), _position_axis(hidden), chunk_size)


@_jit("log_alpha", "form")
def contrastive_scores(
    expert_logits, amateur_logits, beta, amateur_temperature, *, log_alpha, form
):
    s_e = jax.nn.log_softmax(expert_logits.astype(jnp.float32), axis=-1)
    s_a = jax.nn.log_softmax(amateur_logits.astype(jnp.float32) / amateur_temperature, axis=-1)
    if form == "difference":
        score = s_e - s_a
    else:  # (1+β)·s_E − β·s_A, written so that β = 0 gives s_E even where s_A = −inf
        score = s_e + jnp.where(beta == 0, 0.0, beta * (s_e - s_a))
    return jnp.where(mask(expert_logits, log_alpha), score, -jnp.inf)
