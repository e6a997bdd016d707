"""Trace-time checks of the divergence functions' arguments.

Static configuration (``alpha``, ``k``, ``chunk_size``, ``vocab_size``, head layouts)
must be Python values and shapes must agree; each error names the argument and the
shapes, and raises ``ValueError`` under ``jax.jit`` too (shapes are known when tracing).
"""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp

# Head layouts: a [D, V] matrix (an nnx.Linear kernel) or a [V, D] one (a tied embedding).
HEAD_AXES = {"dv": "[D, V]", "vd": "[V, D]"}


def _static_number(name, value, convert):
    try:
        return convert(value)
    except (TypeError, ValueError, jax.errors.JAXTypeError):
        raise ValueError(
            f"{name} must be a static Python number (mark it static under jax.jit), got {value!r}"
        ) from None


def check_alpha(alpha) -> float:
    """log(alpha) for alpha in (0, 1]."""
    value = _static_number("alpha", alpha, float)
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must lie in (0, 1], got {alpha!r}")
    return math.log(value)


def check_temperature(temperature) -> float:
    """A finite temperature > 0."""
    value = _static_number("temperature", temperature, float)
    if not 0.0 < value < math.inf:  # also rejects NaN
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


def check_positive_int(name, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    number = _static_number(name, value, operator.index)
    if number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return number


def check_logits(name, logits):
    if jnp.ndim(logits) < 1:
        raise ValueError(f"{name} must have a vocabulary axis, got shape {jnp.shape(logits)}")


def check_pair(p_name, p_logits, q_name, q_logits):
    check_logits(p_name, p_logits)
    if jnp.shape(p_logits) != jnp.shape(q_logits):
        raise ValueError(
            f"{p_name} and {q_name} must have the same shape, got "
            f"{jnp.shape(p_logits)} and {jnp.shape(q_logits)}"
        )


def check_k(k, vocab: int) -> int:
    k = check_positive_int("k", k)
    if k > vocab:
        raise ValueError(f"k must be at most the vocabulary size {vocab}, got {k}")
    return k


def check_loss_inputs(lead, target_ids, target_weights, position_mask):
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


def head_vocab(hidden_name, hidden, head_name, head, layout) -> int:
    """V of ``head``, checked as [D, V] or [V, D] (by ``layout``) against hidden [..., D]."""
    layout_name = f"{head_name}_layout"
    if layout not in HEAD_AXES:
        raise ValueError(
            f"{layout_name} must be 'dv' ({head_name} [D, V], e.g. an nnx.Linear kernel) or "
            f"'vd' ({head_name} [V, D], e.g. a tied embedding), got {layout!r}"
        )
    axes, d_axis = HEAD_AXES[layout], layout.index("d")
    if jnp.ndim(head) != 2:
        raise ValueError(f"{head_name} must be {axes}, got shape {jnp.shape(head)}")
    d = jnp.shape(hidden)[-1] if jnp.ndim(hidden) else None
    if d != jnp.shape(head)[d_axis]:
        other = "vd" if layout == "dv" else "dv"
        hint = f" (for a {HEAD_AXES[other]} head pass {layout_name}={other!r})"
        raise ValueError(
            f"{hidden_name} [..., D] and {head_name} {axes} disagree on D: "
            f"{jnp.shape(hidden)} and {jnp.shape(head)}"
            + (hint if d == jnp.shape(head)[1 - d_axis] else "")
        )
    return jnp.shape(head)[1 - d_axis]


def fused_pair_vocabs(names, p_hidden, p_head, p_layout, q_hidden, q_head, q_layout):
    """(V_p, V_q) after checking both (hidden, head) pairs and their common leading shape."""
    p_hidden_name, p_head_name, q_hidden_name, q_head_name = names
    v_p = head_vocab(p_hidden_name, p_hidden, p_head_name, p_head, p_layout)
    v_q = head_vocab(q_hidden_name, q_hidden, q_head_name, q_head, q_layout)
    if jnp.shape(p_hidden)[:-1] != jnp.shape(q_hidden)[:-1]:
        raise ValueError(
            f"{p_hidden_name} and {q_hidden_name} must have the same leading shape, got "
            f"{jnp.shape(p_hidden)} and {jnp.shape(q_hidden)}"
        )
    return v_p, v_q
