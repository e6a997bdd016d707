"""w2s_jax.divergence against independent numpy float64 references and the published formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import reordered_sum_bound

from w2s_jax import divergence as dv

# --- numpy float64 references (the formulas of docs/METHOD.md, written independently) ---


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = np.max(z, axis=-1, keepdims=True)
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def np_kl(zp, zq):
    lp, lq = np_log_softmax(zp), np_log_softmax(zq)
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(p > 0, p * (lp - lq), 0.0), axis=-1)


def np_js(zp, zq):
    p, q = np.exp(np_log_softmax(zp)), np.exp(np_log_softmax(zq))
    m = (p + q) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        kl_pm = np.where(p > 0, p * np.log(p / m), 0.0).sum(-1)
        kl_qm = np.where(q > 0, q * np.log(q / m), 0.0).sum(-1)
    return 0.5 * kl_pm + 0.5 * kl_qm


def np_mask(ze, alpha):
    p = np.exp(np_log_softmax(ze))
    return p >= alpha * p.max(axis=-1, keepdims=True)


def np_dense_target(ze, za, alpha):
    """softmax(log πE − log πA) over the plausible set, dense [..., V]."""
    mask = np_mask(ze, alpha)
    with np.errstate(invalid="ignore"):
        score = np.where(mask, np_log_softmax(ze) - np_log_softmax(za), -np.inf)
    score = score - score.max(axis=-1, keepdims=True)
    w = np.exp(score)
    return w / w.sum(axis=-1, keepdims=True)


def np_loss(z, ids, w, mask):
    lp = np_log_softmax(z)
    ce = -np.sum(np.asarray(w, np.float64) * np.take_along_axis(lp, ids, axis=-1), axis=-1)
    return float(np.sum(np.where(mask, ce, 0.0)) / max(int(np.sum(mask)), 1))


def dense(ids, weights, vocab):
    """Scatter-add sparse (ids, weights) [..., k] into [..., V] (float64)."""
    one_hot = np.asarray(ids)[..., None] == np.arange(vocab)
    return np.sum(one_hot * np.asarray(weights, np.float64)[..., None], axis=-2)


def logits(seed, shape, scale=2.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


# 21 rows > the CPU row block (exercises blocked path + remainder); 5 rows: whole-array path.
SHAPES = [(3, 7, 257), (5, 131)]


# --- token_kl / reverse / JS ---------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_token_kl_matches_float64(shape):
    zp, zq = logits(0, shape), logits(1, shape)
    kl = dv.token_kl(zp, zq)
    assert kl.dtype == jnp.float32 and kl.shape == shape[:-1]
    np.testing.assert_allclose(kl, np_kl(zp, zq), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dv.token_reverse_kl(zp, zq), np_kl(zq, zp), rtol=1e-5, atol=1e-6)
    js = dv.token_js(zp, zq)
    np.testing.assert_allclose(js, np_js(zp, zq), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(js) <= np.log(2) + 1e-6)
    np.testing.assert_allclose(dv.token_kl(zp, zp), 0.0, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_token_kl_low_precision_inputs_accumulate_in_float32(dtype):
    zp = jnp.asarray(logits(2, (4, 6, 300), 4.0), dtype)
    zq = jnp.asarray(logits(3, (4, 6, 300), 4.0), dtype)
    kl = dv.token_kl(zp, zq)
    assert kl.dtype == jnp.float32
    # Reference on exactly the rounded inputs: only float32 accumulation error remains.
    ref = np_kl(np.asarray(zp, np.float32), np.asarray(zq, np.float32))
    np.testing.assert_allclose(kl, ref, rtol=1e-5, atol=1e-5)


def test_token_kl_minus_inf_entries():
    zp, zq = logits(4, (3, 7, 64)), logits(5, (3, 7, 64))
    zp[..., -5:] = -np.inf  # padded vocabulary rows: p = q = 0
    zq[..., -5:] = -np.inf
    zp[..., 3] = -np.inf  # p = 0 where q > 0: contributes 0
    kl = dv.token_kl(zp, zq)
    assert np.all(np.isfinite(kl))
    np.testing.assert_allclose(kl, np_kl(zp, zq), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dv.token_js(zp, zq), np_js(zp, zq), rtol=1e-5, atol=1e-6)
    # q = 0 where p > 0: KL(p‖q) is infinite at that position only.
    zq[0, 0, 7] = -np.inf
    kl = np.asarray(dv.token_kl(zp, zq))
    assert kl[0, 0] == np.inf and np.isfinite(kl.flat[1:]).all()
    # Gradients stay finite with -inf logits present.
    grad = jax.grad(lambda a, b: dv.token_kl(a, b).sum(), argnums=(0, 1))(zp, logits(5, zp.shape))
    assert all(np.all(np.isfinite(g)) for g in grad)


def test_token_kl_gradient_is_analytic():
    zp, zq = logits(6, (4, 9, 50)), logits(7, (4, 9, 50))
    gp, gq = jax.grad(lambda a, b: dv.token_kl(a, b).sum(), argnums=(0, 1))(zp, zq)
    lp, lq = np_log_softmax(zp), np_log_softmax(zq)
    p, q = np.exp(lp), np.exp(lq)
    kl = np_kl(zp, zq)[..., None]
    # float32 vs float64: both log-normalisers and the KL sum over V = 50 feed each entry;
    # dropping the -kl term would be off by up to p * kl ~ 0.5
    want_p, want_q = p * (lp - lq - kl), q - p
    bound = reordered_sum_bound(max(1.0, np.abs(want_p).max()), terms=50, reductions=3)
    np.testing.assert_allclose(gp, want_p, atol=bound, rtol=0)
    np.testing.assert_allclose(gq, want_q, atol=bound, rtol=0)


# --- plausibility mask and contrastive target ------------------------------------------


@pytest.mark.parametrize("alpha", [0.2, 0.05, 1.0])
def test_plausibility_mask(alpha):
    ze = logits(8, (3, 7, 257))
    mask = np.asarray(dv.plausibility_mask(ze, alpha))
    np.testing.assert_array_equal(mask, np_mask(ze, alpha))
    assert mask.any(axis=-1).all()
    if alpha == 1.0:
        np.testing.assert_array_equal(mask.sum(-1), 1)


def target_bound(vocab):
    """Float32 vs float64 for the target's weights (at most 1) and sums of them: the two
    log-normalisers behind each score and the normaliser over the plausible set, each a
    sum of at most `vocab` terms. A token wrongly in or out of the plausible set, or a
    wrong score, moves weights by far more (~1e-2 and up)."""
    return reordered_sum_bound(1.0, terms=vocab, reductions=3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [0.2, 0.05])
def test_contrastive_target_matches_float64(shape, alpha):
    ze, za = logits(9, shape), logits(10, shape)
    ref = np_dense_target(ze, za, alpha)
    sizes = np_mask(ze, alpha).sum(-1)
    k = int(sizes.max()) + 2  # room for every plausible token plus padding slots
    ids, w, stats = dv.contrastive_target(ze, za, alpha, k, with_stats=True)
    assert ids.dtype == jnp.int32 and w.dtype == jnp.float32 and ids.shape == shape[:-1] + (k,)
    ids, w = np.asarray(ids), np.asarray(w)
    bound = target_bound(shape[-1])
    np.testing.assert_allclose(dense(ids, w, shape[-1]), ref, atol=bound)
    assert np.all(np.diff(w, axis=-1) <= 0), "weights sorted descending"
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=bound)
    np.testing.assert_array_equal(stats["plausible_size"], sizes)
    np.testing.assert_allclose(stats["dropped_mass"], 0.0, atol=bound)
    # Padding slots: weight 0, id = the first id (valid).
    slot = np.arange(k)
    padding = slot >= sizes[..., None]
    assert np.all(w[padding] == 0) and np.all(w[~padding] > 0)
    np.testing.assert_array_equal(ids, np.where(padding, ids[..., :1], ids))
    assert ids.min() >= 0 and ids.max() < shape[-1]


def test_contrastive_target_truncates_to_k_and_reports_dropped_mass():
    ze, za = logits(11, (4, 5, 200), 1.0), logits(12, (4, 5, 200), 1.0)
    alpha, k = 0.2, 3
    ref = np_dense_target(ze, za, alpha)
    assert (np_mask(ze, alpha).sum(-1) > k).all(), "test needs |A| > k everywhere"
    ids, w, stats = dv.contrastive_target(ze, za, alpha, k, with_stats=True)
    ref_ids = np.argsort(-ref, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(ids, ref_ids)
    kept = np.take_along_axis(ref, ref_ids, -1)
    np.testing.assert_allclose(w, kept / kept.sum(-1, keepdims=True), atol=target_bound(200))
    np.testing.assert_allclose(stats["dropped_mass"], 1.0 - kept.sum(-1), atol=target_bound(200))


def test_contrastive_target_low_precision_and_minus_inf():
    ze = jnp.asarray(logits(13, (3, 7, 128), 3.0), jnp.bfloat16)
    za = np.asarray(logits(14, (3, 7, 128), 3.0))
    za[..., -8:] = -np.inf  # amateur's padded rows (never plausible for the expert)
    ze = ze.at[..., -8:].set(-jnp.inf)
    ze32 = np.asarray(ze, np.float32)
    ids, w = dv.contrastive_target(ze, za, 0.2, 16)
    want = np_dense_target(ze32, za, 0.2)
    np.testing.assert_allclose(dense(ids, w, 128), want, atol=target_bound(128))
    assert np.asarray(ids).max() < 120
    # The amateur gives probability 0 to a plausible token: all mass moves there, no NaN.
    top = np.argmax(ze32[0, 0])
    za[0, 0, top] = -np.inf
    ids, w = dv.contrastive_target(ze, za, 0.2, 16)
    assert np.all(np.isfinite(w))
    assert ids[0, 0, 0] == top and w[0, 0, 0] == 1.0 and np.all(w[0, 0, 1:] == 0)


def published_reference(ze, za, alpha):
    """The published sampling code, per position, in float64 torch (epsilon 1e-12 included)."""
    import torch
    import torch.nn.functional as F

    kls, targets = [], []
    for e, a in zip(torch.from_numpy(ze).double(), torch.from_numpy(za).double(), strict=True):
        pe, pa = F.softmax(e, dim=-1), F.softmax(a, dim=-1)
        kls.append(F.kl_div((pa + 1e-12).log(), pe + 1e-12, reduction="sum").item())
        mask = pe >= alpha * pe.max()
        scores = torch.log(pe + 1e-12) - torch.log(pa + 1e-12)
        target = torch.zeros_like(pe)
        target[mask] = torch.softmax(scores[mask], dim=-1)
        targets.append(target.numpy())
    return np.array(kls), np.stack(targets)


def test_matches_published_reference_formula():
    rng = np.random.default_rng(15)
    n, vocab = 24, 4096
    # LM-like logits: a broad background plus a few strong candidates; the amateur is a
    # noisier version of the expert that sometimes prefers a wrong token, so KLs span
    # ~0.01 to ~2 nats. (Much wilder amateurs push πA below 1e-12 where πE is not, and
    # the published epsilon then biases its KL by > 1e-4; ours stays exact.)
    ze = rng.normal(size=(n, vocab)) * 2.0
    for row in range(n):
        ze[row, rng.choice(vocab, 4, replace=False)] += rng.uniform(6, 14, 4)
    za = ze + rng.normal(size=(n, vocab)) * rng.uniform(0.5, 2.0, (n, 1))
    for row in range(0, n, 3):
        za[row, rng.integers(vocab)] += 12
    ze, za = ze.astype(np.float32), za.astype(np.float32)
    ref_kl, ref_target = published_reference(ze, za, 0.2)
    assert ref_kl.min() < 0.1 and ref_kl.max() > 1.0
    np.testing.assert_allclose(np_kl(ze, za), ref_kl, atol=1e-5)  # the epsilon is harmless here
    np.testing.assert_allclose(dv.token_kl(ze, za), ref_kl, atol=1e-4)
    ids, w = dv.contrastive_target(ze, za, 0.2, 16)
    np.testing.assert_allclose(dense(ids, w, vocab), ref_target, atol=1e-4)


def test_contrastive_target_under_jit_with_static_alpha_and_k():
    ze, za = logits(16, (2, 9, 77)), logits(17, (2, 9, 77))
    fn = jax.jit(dv.contrastive_target, static_argnames=("alpha", "k", "with_stats"))
    got, want = fn(ze, za, alpha=0.2, k=8), dv.contrastive_target(ze, za, 0.2, 8)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    traced = jax.jit(lambda e, a, alpha: dv.contrastive_target(e, a, alpha, 8))
    with pytest.raises(ValueError, match="alpha must be a static Python number"):
        traced(ze, za, 0.2)


# --- step selection ---------------------------------------------------------------------


def test_select_steps():
    kl = jnp.array([[0.1, 0.4, 0.41, np.inf], [2.0, 0.0, 0.5, 0.39]])
    valid = np.array([[True, True, True, True], [False, True, True, True]])
    np.testing.assert_array_equal(
        dv.select_steps(kl, 0.4, valid), [[False, False, True, True], [False, False, True, False]]
    )
    np.testing.assert_array_equal(dv.select_steps(kl, 0.4), np.asarray(kl) > 0.4)
    assert dv.select_steps(kl, 0.4, valid).dtype == jnp.bool_


# --- contrastive loss -----------------------------------------------------------------


def loss_inputs(seed, lead=(3, 7), vocab=61, k=4):
    rng = np.random.default_rng(seed)
    z = logits(seed, lead + (vocab,))
    ids = np.stack([rng.permutation(vocab)[:k] for _ in range(int(np.prod(lead)))])
    ids = ids.reshape(lead + (k,)).astype(np.int32)
    w = rng.uniform(size=lead + (k,))
    w[..., -1] = 0.0  # a padding slot
    w = (w / w.sum(-1, keepdims=True)).astype(np.float32)
    mask = rng.uniform(size=lead) < 0.5
    mask.flat[0] = True
    return z, ids, w, mask


@pytest.mark.parametrize("lead", [(3, 7), (2,)])
def test_contrastive_loss_matches_float64(lead):
    z, ids, w, mask = loss_inputs(18, lead)
    loss = dv.contrastive_loss(z, ids, w, mask)
    assert loss.shape == () and loss.dtype == jnp.float32
    want = np_loss(z, ids, w, mask)
    # float32 vs float64: log-normaliser over V = 61, the sum over k = 4 targets, the mean
    # over <= 21 positions, at the scale of the loss; a wrong mask or denominator moves it
    # by > 10%
    bound = reordered_sum_bound(want, terms=61, reductions=3)
    np.testing.assert_allclose(loss, want, atol=bound, rtol=0)
    loss16 = dv.contrastive_loss(jnp.asarray(z, jnp.bfloat16), ids, w, mask)
    want16 = np_loss(np.asarray(jnp.asarray(z, jnp.bfloat16), np.float32), ids, w, mask)
    np.testing.assert_allclose(loss16, want16, atol=bound, rtol=0)


def test_contrastive_loss_gradient_analytic_and_finite_differences():
    z, ids, w, mask = loss_inputs(19)
    grad = np.asarray(jax.grad(dv.contrastive_loss)(z, ids, w, mask), np.float64)
    # Analytic: (softmax · Σw − scattered w) / #selected at selected positions, 0 elsewhere.
    target = dense(ids, w, z.shape[-1])
    analytic = np.exp(np_log_softmax(z)) * target.sum(-1, keepdims=True) - target
    analytic = np.where(mask[..., None], analytic, 0.0) / mask.sum()
    # the softmax's normaliser over V = 61 and the sum of the k weights, at the gradient's scale
    bound = reordered_sum_bound(analytic, terms=61, reductions=2)
    np.testing.assert_allclose(grad, analytic, atol=bound, rtol=0)
    # Central differences of the float64 reference along random directions.
    rng = np.random.default_rng(0)
    for _ in range(3):
        direction = rng.normal(size=z.shape)
        eps = 1e-4
        z64 = z.astype(np.float64)
        numeric = (
            np_loss(z64 + eps * direction, ids, w, mask)
            - np_loss(z64 - eps * direction, ids, w, mask)
        ) / (2 * eps)
        np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-5, atol=1e-7)


def test_contrastive_loss_without_selected_positions_is_zero_with_zero_gradient():
    z, ids, w, _ = loss_inputs(20)
    z[0, 0, :] = -np.inf  # even a degenerate row at an unselected position stays harmless
    z[0, 0, 0] = 0.0
    mask = np.zeros(z.shape[:-1], bool)
    loss, grad = jax.value_and_grad(dv.contrastive_loss)(z, ids, w, mask)
    assert float(loss) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


# --- bad input ------------------------------------------------------------------------


def test_mismatched_shapes_name_both_shapes():
    a, b = np.zeros((2, 3, 10), np.float32), np.zeros((2, 3, 11), np.float32)
    for fn in (dv.token_kl, dv.token_js, dv.token_reverse_kl):
        with pytest.raises(ValueError, match=r"\(2, 3, 10\) and \(2, 3, 11\)"):
            fn(a, b)
    with pytest.raises(ValueError, match=r"\(2, 3, 10\) and \(2, 3, 11\)"):
        dv.contrastive_target(a, b, 0.2, 4)
    with pytest.raises(ValueError, match="vocabulary axis"):
        dv.token_kl(np.float32(1.0), np.float32(1.0))


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan"), float("inf"), "x", None])
def test_bad_alpha(alpha):
    z = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError, match="alpha"):
        dv.plausibility_mask(z, alpha)
    with pytest.raises(ValueError, match="alpha"):
        dv.contrastive_target(z, z, alpha, 2)


@pytest.mark.parametrize("k", [0, -3, 2.5, True, 11])
def test_bad_k(k):
    z = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError, match=rf"k must .*got {k}"):
        dv.contrastive_target(z, z, 0.2, k)


def test_bad_loss_and_selection_inputs():
    z, ids, w, mask = loss_inputs(21)
    with pytest.raises(ValueError, match=r"target_ids and target_weights .*\(3, 7, 4\) and"):
        dv.contrastive_loss(z, ids, w[..., :3], mask)
    with pytest.raises(ValueError, match=r"position_mask must have shape \(3, 7\), got \(7,\)"):
        dv.contrastive_loss(z, ids, w, mask[0])
    with pytest.raises(ValueError, match=r"target_ids must have shape \(3, 7, 'k'\)"):
        dv.contrastive_loss(z, ids[0], w[0], mask)
    with pytest.raises(ValueError, match="must be integers"):
        dv.contrastive_loss(z, ids.astype(np.float32), w, mask)
    with pytest.raises(ValueError, match=r"valid must have the shape of kl, got \(3,\) and \(2,\)"):
        dv.select_steps(np.zeros(2), 0.4, np.ones(3, bool))
    with pytest.raises(ValueError, match="beta"):
        dv.select_steps(np.zeros(2), float("nan"), np.ones(2, bool))


def test_out_of_range_target_ids_make_the_loss_nan_unless_weight_is_zero():
    z, ids, w, mask = loss_inputs(22)
    assert np.isfinite(dv.contrastive_loss(z, ids, w, mask))
    for bad in (-1, z.shape[-1]):
        padded = ids.copy()
        padded[..., -1] = bad  # the weight-0 slot: ignored
        assert np.isfinite(dv.contrastive_loss(z, padded, w, mask))
        used = ids.copy()
        used[0, 0, 0] = bad  # a weighted slot at a selected position
        assert np.isnan(dv.contrastive_loss(z, used, w, mask))
