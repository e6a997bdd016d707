"""Weak-to-strong losses against numpy float64 versions written from the published formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import reordered_sum_bound

from w2s_jax.objectives.w2s_losses import (
    aux_coefficient,
    check_soft_labels,
    logconf_loss,
    loss_function,
    product_loss,
    xent_loss,
)

# --- numpy float64 references (weak_to_strong/loss.py, written from its formulas) ----------


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_xent(z, w):
    return float(np.mean(-(w * np_log_softmax(z)).sum(-1)))


def np_product(z, w, alpha=1.0, beta=1.0):
    p = np.exp(np_log_softmax(z))
    t = p**beta * w**alpha
    t = t / t.sum(-1, keepdims=True)
    return np_xent(z, t)


def np_logconf(z, w, step_frac, aux_coef=0.5, warmup_frac=0.1):
    coef = (1.0 if step_frac > warmup_frac else step_frac) * aux_coef
    p = np.exp(np_log_softmax(z))
    threshold = np.quantile(p[:, 0], w.mean(0)[1])  # linear, as torch.quantile
    hard = np.stack([p[:, 0] >= threshold, p[:, 0] < threshold], axis=1).astype(np.float64)
    return np_xent(z, w * (1 - coef) + hard * coef)


def random_case(n=16, c=2, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * scale
    labels = rng.dirichlet(np.ones(c), size=n)
    return logits.astype(np.float32), labels.astype(np.float32)


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("c", [2, 3, 5])
def test_xent_and_product_match_numpy(seed, c):
    z, w = random_case(n=13, c=c, seed=seed)
    np.testing.assert_allclose(xent_loss(z, w), np_xent(z, w), rtol=1e-5)
    np.testing.assert_allclose(product_loss(z, w), np_product(z, w), rtol=1e-5)
    got = product_loss(z, w, alpha=0.5, beta=2.0)
    np.testing.assert_allclose(got, np_product(z, w, alpha=0.5, beta=2.0), rtol=1e-5)


def test_product_hard_labels_and_zero_exponent():
    z, _ = random_case(n=8, seed=3)
    hard = np.eye(2, dtype=np.float32)[np.arange(8) % 2]
    np.testing.assert_allclose(product_loss(z, hard), np_product(z, hard), rtol=1e-5)
    # alpha = 0: labels^0 = 1 even where labels are 0, so the target is p^beta
    np.testing.assert_allclose(
        product_loss(z, hard, alpha=0.0), np_product(z, hard, alpha=0.0), rtol=1e-5
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("step_frac", [0.0, 0.03, 0.1, 0.1000001, 0.5, 1.0])
def test_logconf_matches_numpy(seed, step_frac):
    z, w = random_case(n=17, seed=seed)
    np.testing.assert_allclose(
        logconf_loss(z, w, step_frac=step_frac), np_logconf(z, w, step_frac), rtol=1e-5
    )
    got = logconf_loss(z, w, step_frac=step_frac, aux_coef=0.75, warmup_frac=0.2)
    np.testing.assert_allclose(got, np_logconf(z, w, step_frac, 0.75, 0.2), rtol=1e-5)


def test_logconf_threshold_follows_the_weak_class_balance():
    """With a large coefficient the hardened half decides the loss: check its class shares."""
    z, w = random_case(n=40, seed=7)
    w = np.stack([1 - w[:, 0] * 0.5, w[:, 0] * 0.5], 1).astype(np.float32)  # ~25% class 1
    p0 = np.exp(np_log_softmax(z.astype(np.float64)))[:, 0]
    threshold = np.quantile(p0, w.mean(0)[1])
    hard = np.stack([p0 >= threshold, p0 < threshold], 1).astype(np.float64)
    assert 0.15 < hard[:, 1].mean() < 0.35
    np.testing.assert_allclose(
        logconf_loss(z, w, step_frac=1.0, aux_coef=1.0), np_xent(z, hard), rtol=1e-5
    )


def test_warmup_edge_is_published_jump_not_ramp():
    assert float(aux_coefficient(0.1)) == pytest.approx(0.05)  # step_frac == warmup_frac
    assert float(aux_coefficient(0.10001)) == pytest.approx(0.5)
    assert float(aux_coefficient(0.05, warmup="linear")) == pytest.approx(0.25)
    assert float(aux_coefficient(0.1, warmup="linear")) == pytest.approx(0.5)
    assert float(aux_coefficient(0.3, warmup="linear", warmup_frac=0.0)) == pytest.approx(0.5)
    z, w = random_case(seed=1)
    np.testing.assert_allclose(logconf_loss(z, w, step_frac=0.1), np_logconf(z, w, 0.1), rtol=1e-5)
    with pytest.raises(ValueError, match="warmup must be one of"):
        aux_coefficient(0.1, warmup="cosine")


@pytest.mark.parametrize("cls", [0, 1])
def test_logconf_all_one_class_labels(cls):
    z, _ = random_case(n=11, seed=4)
    w = np.zeros_like(z)
    w[:, cls] = 1.0
    for step_frac in (0.05, 0.5):
        np.testing.assert_allclose(
            logconf_loss(z, w, step_frac=step_frac), np_logconf(z, w, step_frac), rtol=1e-5
        )


def test_logconf_more_classes_hardens_at_argmax():
    z, w = random_case(n=9, c=4, seed=2)
    p = np.exp(np_log_softmax(z.astype(np.float64)))
    hard = np.eye(4)[p.argmax(1)]
    coef = 0.5
    np.testing.assert_allclose(
        logconf_loss(z, w, step_frac=0.5), np_xent(z, w * (1 - coef) + hard * coef), rtol=1e-5
    )


# --- padding, dtype, jit --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["xent", "product", "logconf"])
def test_padding_rows_change_nothing(name):
    z, w = random_case(n=10, seed=5)
    rng = np.random.default_rng(9)
    pad_z = np.concatenate([z, rng.normal(size=(6, 2)).astype(np.float32) * 9])
    pad_w = np.concatenate([w, np.tile(np.float32([[0.0, 1.0]]), (6, 1))])
    valid = np.arange(16) < 10
    fn = jax.jit(loss_function(name))
    # other shapes sum in other orders: the 2-class log-softmax and the mean over <= 16 rows,
    # at the loss's scale; counting the padding rows moves the loss by O(1)
    want = fn(z, w, 0.5, None)
    bound = reordered_sum_bound(want, terms=16, reductions=2)
    np.testing.assert_allclose(fn(pad_z, pad_w, 0.5, valid), want, rtol=0, atol=bound)
    want = fn(z, w, 0.05, None)
    bound = reordered_sum_bound(want, terms=16, reductions=2)
    np.testing.assert_allclose(want, fn(pad_z, pad_w, 0.05, valid), rtol=0, atol=bound)


def test_bfloat16_inputs_accumulate_in_float32():
    z, w = random_case(n=64, seed=6)
    z16 = jnp.asarray(z, jnp.bfloat16)
    loss = logconf_loss(z16, w, step_frac=0.5)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, np_logconf(np.asarray(z16, np.float64), w, 0.5), rtol=1e-5)


# --- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["xent", "product", "logconf"])
def test_gradients_match_finite_differences(name):
    """The targets are detached: d loss / d z is the CE gradient with the target held fixed."""
    z, w = random_case(n=6, seed=8)
    fn = loss_function(name)
    grad = np.asarray(jax.grad(lambda x: fn(x, w, 0.5, None))(jnp.asarray(z)), np.float64)
    z64 = z.astype(np.float64)
    p = np.exp(np_log_softmax(z64))
    if name == "xent":
        target = w
    elif name == "product":
        target = p * w / (p * w).sum(-1, keepdims=True)
    else:
        threshold = np.quantile(p[:, 0], w.mean(0)[1])
        hard = np.stack([p[:, 0] >= threshold, p[:, 0] < threshold], 1)
        target = 0.5 * w + 0.5 * hard
    eps = 1e-5
    numeric = np.zeros_like(z64)
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            up, down = z64.copy(), z64.copy()
            up[i, j] += eps
            down[i, j] -= eps
            numeric[i, j] = (np_xent(up, target) - np_xent(down, target)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=1e-5)


# --- label checks ---------------------------------------------------------------------------


def test_check_soft_labels():
    check_soft_labels([[0.3, 0.7], [1.0, 0.0]], 2)
    with pytest.raises(ValueError, match=r"weak.jsonl: labels are not distributions.*row 1"):
        check_soft_labels([[0.3, 0.7], [0.6, 0.6]], where="weak.jsonl")
    with pytest.raises(ValueError, match="row 0"):
        check_soft_labels([[-0.1, 1.1]])
    with pytest.raises(ValueError, match="row 0"):
        check_soft_labels([[np.nan, 1.0]])
    with pytest.raises(ValueError, match="3 classes but the classifier head has 2"):
        check_soft_labels([[0.2, 0.3, 0.5]], 2)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        check_soft_labels([0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="unknown weak-to-strong loss"):
        loss_function("hinge")
