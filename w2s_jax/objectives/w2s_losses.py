"""Weak-to-strong losses (Burns et al., 2023) on class logits [N, C] and soft labels [N, C].

Pure `jax.numpy`, jittable, float32 accumulation whatever the input dtype; each returns
the mean over the batch's rows. `valid` [N] (optional, bool) marks the real rows of a
padded batch: padding rows enter neither the mean, nor logconf's class balance, nor its
quantile.

By default the three match openai/weak-to-strong's `weak_to_strong/loss.py` numerically:

- `xent_loss`: soft-label cross-entropy −Σ_c w_c log softmax(z)_c.
- `product_loss`: cross-entropy against t ∝ p^β · w^α per row (p = softmax(z)), t detached.
  Computed in log space (β log p + α log w, then a softmax): the same target, without the
  underflow of p^β · w^α for confident rows. A row whose product is 0 for every class
  (e.g. hard labels on a class with p = 0) has no target: NaN, as in the reference.
- `logconf_loss`: cross-entropy against t = (1 − c) w + c ĥ, ĥ the strong model's own
  prediction hardened (detached). For C = 2, as published: the threshold τ is the
  batch quantile of p_0 at q = mean_n w_{n,1} (linear interpolation, as torch.quantile),
  and ĥ = (p_0 ≥ τ, p_0 < τ), so the share of rows hardened to class 1 follows the weak
  labels' class balance. For C > 2 (the reference asserts C = 2) ĥ is one-hot at
  argmax p: with more than two classes no single threshold exists, and per-class
  quantile thresholds may give a row zero or several classes (not a distribution);
  matching all C shares at once needs an iterative assignment whose result jumps with
  tiny changes of p. Argmax is the natural hardening and reduces to p_0 ≥ 0.5 at C = 2.

Warm-up of logconf's coefficient c (`warmup`):
- "published" (default, as loss.py): c = step_frac · aux_coef while step_frac ≤
  warmup_frac, then aux_coef. This is not a ramp to aux_coef: at the end of warm-up
  c is warmup_frac · aux_coef (0.05 with the defaults) and it jumps to aux_coef.
- "linear": c = aux_coef · min(1, step_frac / warmup_frac), a smooth ramp from 0 to
  aux_coef over the warm-up (what the paper's text describes); aux_coef at once when
  warmup_frac is 0.

`check_soft_labels` is the eager check of user labels (outside jit).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

WARMUPS = ("published", "linear")
LOSS_NAMES = ("xent", "logconf", "product")

__all__ = [
    "LOSS_NAMES",
    "WARMUPS",
    "aux_coefficient",
    "check_soft_labels",
    "logconf_loss",
    "loss_function",
    "product_loss",
    "xent_loss",
]


def _prepare(logits, labels, valid):
    """float32 logits and labels, and row weights (1 real, 0 padding)."""
    logits_nc = jnp.asarray(logits, jnp.float32)
    labels_nc = jnp.asarray(labels, jnp.float32)
    if logits_nc.ndim != 2 or logits_nc.shape != labels_nc.shape:
        raise ValueError(
            f"need logits and labels of one shape [N, C], got {logits_nc.shape} and "
            f"{labels_nc.shape}"
        )
    n = logits_nc.shape[0]
    weights_n = jnp.ones((n,), jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
    return logits_nc, labels_nc, weights_n


def _mean(values_n, weights_n):
    """Mean of `values_n` over the real rows (0 for a batch with none)."""
    return jnp.sum(values_n * weights_n) / jnp.maximum(jnp.sum(weights_n), 1.0)


def _soft_cross_entropy(logits_nc, target_nc):
    """−Σ_c t_c log softmax(z)_c per row; classes with t_c = 0 add nothing (even at z = −inf)."""
    logp_nc = jax.nn.log_softmax(logits_nc, axis=-1)
    return -jnp.sum(jnp.where(target_nc > 0, target_nc * logp_nc, 0.0), axis=-1)


def xent_loss(logits, labels, *, valid=None):
    """Soft-label cross-entropy of logits [N, C] against labels [N, C], batch mean."""
    logits_nc, labels_nc, weights_n = _prepare(logits, labels, valid)
    return _mean(_soft_cross_entropy(logits_nc, labels_nc), weights_n)


def _scaled_log(log_x, exponent):
    """exponent · log_x with 0 · (−inf) = 0 (x**0 = 1, as torch.pow)."""
    scaled = exponent * jnp.where(jnp.isneginf(log_x), 0.0, log_x)
    return jnp.where(jnp.isneginf(log_x) & (exponent != 0), -jnp.inf, scaled)


def product_loss(logits, labels, *, alpha=1.0, beta=1.0, valid=None):
    """Cross-entropy against the detached target ∝ softmax(logits)^β · labels^α, batch mean."""
    logits_nc, labels_nc, weights_n = _prepare(logits, labels, valid)
    log_labels = jnp.log(jnp.where(labels_nc > 0, labels_nc, 0.0))
    log_target = _scaled_log(jax.nn.log_softmax(logits_nc, axis=-1), beta)
    log_target = log_target + _scaled_log(log_labels, alpha)
    target_nc = jax.lax.stop_gradient(jax.nn.softmax(log_target, axis=-1))
    return _mean(_soft_cross_entropy(logits_nc, target_nc), weights_n)


def aux_coefficient(step_frac, *, aux_coef=0.5, warmup_frac=0.1, warmup="published"):
    """logconf's coefficient c at `step_frac` (see the module docstring for both schedules)."""
    step_frac = jnp.asarray(step_frac, jnp.float32)
    if warmup == "published":
        return jnp.where(step_frac > warmup_frac, 1.0, step_frac) * aux_coef
    if warmup == "linear":
        if warmup_frac <= 0:
            return jnp.asarray(aux_coef, jnp.float32)
        return jnp.clip(step_frac / warmup_frac, 0.0, 1.0) * aux_coef
    raise ValueError(f"warmup must be one of {', '.join(WARMUPS)}, got {warmup!r}")


def _masked_quantile(x_n, q, weights_n):
    """Quantile `q` of x over the real rows, linear interpolation (torch.quantile, np.quantile)."""
    count = jnp.sum(weights_n > 0)
    sorted_n = jnp.sort(jnp.where(weights_n > 0, x_n, jnp.inf))
    position = q * jnp.maximum(count - 1, 0).astype(jnp.float32)
    low = jnp.floor(position).astype(jnp.int32)
    high = jnp.minimum(low + 1, jnp.maximum(count - 1, 0))
    below, above = sorted_n[low], sorted_n[high]
    return below + (position - low) * jnp.where(high > low, above - below, 0.0)


def _hardened(probs_nc, labels_nc, weights_n):
    """ĥ: the strong predictions hardened (class-balance threshold at C = 2, else argmax)."""
    classes = probs_nc.shape[-1]
    if classes != 2:
        return jax.nn.one_hot(jnp.argmax(probs_nc, axis=-1), classes, dtype=jnp.float32)
    weak_share_1 = _mean(labels_nc[:, 1], weights_n)
    threshold = _masked_quantile(probs_nc[:, 0], weak_share_1, weights_n)
    class_0 = probs_nc[:, 0] >= threshold
    return jnp.stack([class_0, ~class_0], axis=-1).astype(jnp.float32)


def logconf_loss(
    logits,
    labels,
    *,
    step_frac,
    aux_coef=0.5,
    warmup_frac=0.1,
    warmup="published",
    valid=None,
):
    """Auxiliary-confidence loss: cross-entropy against (1 − c) · labels + c · ĥ, batch mean.

    step_frac: the share of training done (step / steps), a float or traced scalar.
    warmup: "published" or "linear" (see the module docstring). ĥ is detached.
    """
    logits_nc, labels_nc, weights_n = _prepare(logits, labels, valid)
    coef = aux_coefficient(step_frac, aux_coef=aux_coef, warmup_frac=warmup_frac, warmup=warmup)
    probs_nc = jax.nn.softmax(logits_nc, axis=-1)
    hard_nc = jax.lax.stop_gradient(_hardened(probs_nc, labels_nc, weights_n))
    target_nc = labels_nc * (1.0 - coef) + hard_nc * coef
    return _mean(_soft_cross_entropy(logits_nc, target_nc), weights_n)


def loss_function(name: str, **options) -> Callable:
    """fn(logits, labels, step_frac, valid) -> scalar for loss `name` in LOSS_NAMES.

    options: product's alpha/beta; logconf's aux_coef/warmup_frac/warmup (others ignored).
    """
    if name == "xent":
        return lambda logits, labels, step_frac, valid: xent_loss(logits, labels, valid=valid)
    if name == "product":
        kw = {k: options[k] for k in ("alpha", "beta") if k in options}
        return lambda logits, labels, step_frac, valid: product_loss(
            logits, labels, valid=valid, **kw
        )
    if name == "logconf":
        kw = {k: options[k] for k in ("aux_coef", "warmup_frac", "warmup") if k in options}
        return lambda logits, labels, step_frac, valid: logconf_loss(
            logits, labels, step_frac=step_frac, valid=valid, **kw
        )
    raise ValueError(f"unknown weak-to-strong loss {name!r}; known: {', '.join(LOSS_NAMES)}")


def check_soft_labels(labels, num_classes: int | None = None, *, where: str = "labels") -> None:
    """ValueError unless `labels` is [N, C] of finite probabilities whose rows sum to 1.

    num_classes: the classifier's class count, which C must equal. `where` names the
    source (a file, a run) in the message. Eager (numpy), for inputs before any jit.
    """
    array = np.asarray(labels, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 2:
        raise ValueError(f"{where}: need soft labels [N, C] with C >= 2, got shape {array.shape}")
    if num_classes is not None and array.shape[1] != num_classes:
        raise ValueError(
            f"{where}: labels have {array.shape[1]} classes but the classifier head has "
            f"{num_classes}"
        )
    bad_value = ~np.isfinite(array).all(axis=1) | (array < 0).any(axis=1) | (array > 1).any(axis=1)
    bad_sum = np.abs(array.sum(axis=1) - 1.0) > 1e-3
    bad = np.flatnonzero(bad_value | bad_sum)
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"{where}: labels are not distributions (each row must be finite, in [0, 1] and "
            f"sum to 1): row {row} is {array[row].tolist()} ({bad.size} bad rows)"
        )
