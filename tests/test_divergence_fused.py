"""Chunked and fused (hidden states + LM head) divergence kernels equal the plain ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2s_jax import divergence as dv

# T = 13 positions with chunk 4: three full blocks plus an overlapping last one;
# V = 203 is not a multiple of the chunk size either.
B, T, D_E, D_A, V, CHUNK = 2, 13, 24, 16, 203, 4


def rand(seed, shape, scale=1.0, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, dtype)


@pytest.fixture(scope="module")
def hidden_and_heads():
    return (
        rand(0, (B, T, D_E)),
        rand(1, (D_E, V), 0.6),
        rand(2, (B, T, D_A)),
        rand(3, (D_A, V), 0.6),
    )


def test_chunked_equals_plain():
    zp, zq = rand(4, (B, T, V), 2.0), rand(5, (B, T, V), 2.0)
    zp = zp.at[..., -3:].set(-jnp.inf)
    zq = zq.at[..., -3:].set(-jnp.inf)
    plain_kl = dv.token_kl(zp, zq)
    plain = dv.contrastive_target(zp, zq, 0.2, 8, with_stats=True)
    for chunk in (1, CHUNK, 64):
        np.testing.assert_allclose(dv.token_kl_chunked(zp, zq, chunk_size=chunk), plain_kl, 1e-6)
    chunked = dv.contrastive_target_chunked(zp, zq, 0.2, 8, chunk_size=CHUNK, with_stats=True)
    np.testing.assert_array_equal(chunked[0], plain[0])
    np.testing.assert_allclose(chunked[1], plain[1], atol=1e-7)
    np.testing.assert_array_equal(chunked[2]["plausible_size"], plain[2]["plausible_size"])
    np.testing.assert_allclose(chunked[2]["dropped_mass"], plain[2]["dropped_mass"], atol=1e-7)
    # One leading axis ([N, V], a notebook's flattened positions) and none ([V]).
    np.testing.assert_allclose(
        dv.token_kl_chunked(zp[0], zq[0], chunk_size=CHUNK), plain_kl[0], rtol=1e-6
    )
    np.testing.assert_allclose(
        dv.token_kl_chunked(zp[0, 0], zq[0, 0], chunk_size=CHUNK), plain_kl[0, 0], rtol=1e-6
    )


def test_fused_token_kl_equals_plain_in_value_and_gradient(hidden_and_heads):
    he, we, ha, wa = hidden_and_heads

    def plain(he, we, ha, wa):
        return jnp.sum(dv.token_kl(he @ we, ha @ wa) * jnp.arange(1.0, T + 1))

    def fused(he, we, ha, wa):
        kl = dv.fused_token_kl(he, we, ha, wa, chunk_size=CHUNK)
        return jnp.sum(kl * jnp.arange(1.0, T + 1))

    np.testing.assert_allclose(
        dv.fused_token_kl(he, we, ha, wa, chunk_size=CHUNK), dv.token_kl(he @ we, ha @ wa), 1e-5
    )
    want = jax.grad(plain, argnums=(0, 1, 2, 3))(he, we, ha, wa)
    got = jax.grad(fused, argnums=(0, 1, 2, 3))(he, we, ha, wa)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_fused_kl_and_target_equals_plain_and_cuts_padded_vocab(hidden_and_heads):
    he, we, ha, wa = hidden_and_heads
    vocab = V - 11  # the heads carry 11 padded rows past the tokenizer's vocabulary
    # Make a padded row the expert's favourite: only the cut keeps it out of the target.
    we = we.at[:, V - 1].set(he[0, 0] * 5.0)
    kl, ids, w, stats = dv.fused_kl_and_target(
        he, we, ha, wa, 0.2, 6, chunk_size=CHUNK, vocab_size=vocab
    )
    ze, za = he @ we[:, :vocab], ha @ wa[:, :vocab]
    np.testing.assert_allclose(kl, dv.token_kl(ze, za), rtol=1e-5, atol=1e-6)
    ref_ids, ref_w, ref_stats = dv.contrastive_target(ze, za, 0.2, 6, with_stats=True)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(w, ref_w, atol=1e-6)
    np.testing.assert_array_equal(stats["plausible_size"], ref_stats["plausible_size"])
    np.testing.assert_allclose(stats["dropped_mass"], ref_stats["dropped_mass"], atol=1e-6)
    assert int(ids.max()) < vocab
    # Without the cut, the padded row dominates the first position.
    _, uncut_ids, _, _ = dv.fused_kl_and_target(he, we, ha, wa, 0.2, 6, chunk_size=CHUNK)
    assert int(uncut_ids[0, 0, 0]) == V - 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_contrastive_loss_equals_plain_in_value_and_gradient(hidden_and_heads, dtype):
    he, we, ha, wa = hidden_and_heads
    ids, w = dv.contrastive_target(he @ we, ha @ wa, 0.1, 5)
    mask = np.random.default_rng(6).uniform(size=(B, T)) < 0.6
    h, head = he.astype(dtype), we.astype(dtype)

    def plain(h, head):
        logits = jnp.matmul(h, head, preferred_element_type=jnp.float32)
        return dv.contrastive_loss(logits, ids, w, mask)

    def fused(h, head):
        return dv.fused_contrastive_loss(h, head, ids, w, mask, chunk_size=CHUNK)

    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(fused(h, head), plain(h, head), rtol=tol)
    want = jax.grad(plain, argnums=(0, 1))(h, head)
    got = jax.grad(fused, argnums=(0, 1))(h, head)
    for g, ref in zip(got, want, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol * 0.1
        )
    # Nothing selected: 0 and zero gradient.
    none = np.zeros((B, T), bool)
    loss, grads = jax.value_and_grad(
        lambda h: dv.fused_contrastive_loss(h, head, ids, w, none, chunk_size=CHUNK)
    )(h)
    assert float(loss) == 0.0 and not np.any(np.asarray(grads, np.float32))


def test_fused_path_keeps_temporary_memory_below_a_fifth_of_naive():
    """Compiled memory analysis, forward + backward (compile only, nothing runs)."""
    batch, length, d_e, d_a, vocab, k = 4, 256, 64, 32, 16384, 8
    shapes = [
        jax.ShapeDtypeStruct((batch, length, d_e), jnp.float32),
        jax.ShapeDtypeStruct((d_e, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, length, d_a), jnp.float32),
        jax.ShapeDtypeStruct((d_a, vocab), jnp.float32),
    ]

    def naive(he, we, ha, wa):
        ze, za = he @ we, ha @ wa
        kl = dv.token_kl(ze, za)
        ids, w = dv.contrastive_target(ze, za, 0.2, k)
        selected = dv.select_steps(kl, 0.4, None)
        loss, grad = jax.value_and_grad(lambda h: dv.contrastive_loss(h @ we, ids, w, selected))(he)
        return kl, loss, grad

    def fused(he, we, ha, wa):
        kl, ids, w, _ = dv.fused_kl_and_target(he, we, ha, wa, 0.2, k, chunk_size=16)
        selected = dv.select_steps(kl, 0.4, None)
        loss, grad = jax.value_and_grad(
            lambda h: dv.fused_contrastive_loss(h, we, ids, w, selected, chunk_size=16)
        )(he)
        return kl, loss, grad

    def temp_bytes(fn):
        return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    naive_bytes, fused_bytes = temp_bytes(naive), temp_bytes(fused)
    logits_bytes = batch * length * vocab * 4
    assert naive_bytes >= 2 * logits_bytes  # it does hold full logits
    assert fused_bytes <= 0.2 * naive_bytes, (fused_bytes, naive_bytes)


def test_fused_bad_inputs_name_the_shapes(hidden_and_heads):
    he, we, ha, wa = hidden_and_heads
    with pytest.raises(ValueError, match=r"disagree on D: \(2, 13, 24\) and \(16, 203\)"):
        dv.fused_token_kl(he, wa, ha, wa, chunk_size=4)
    with pytest.raises(ValueError, match=r"must be \[D, V\], got shape \(203,\)"):
        dv.fused_contrastive_loss(he, we[0], None, None, None, chunk_size=4)
    with pytest.raises(
        ValueError, match=r"same leading shape, got \(2, 13, 24\) and \(2, 12, 16\)"
    ):
        dv.fused_kl_and_target(he, we, ha[:, :12], wa, 0.2, 4, chunk_size=4)
    with pytest.raises(ValueError, match=r"vocab_size 300 exceeds .*\(203 expert, 203 amateur\)"):
        dv.fused_kl_and_target(he, we, ha, wa, 0.2, 4, chunk_size=4, vocab_size=300)
    with pytest.raises(ValueError, match="different vocabulary sizes; pass vocab_size"):
        dv.fused_kl_and_target(he, we, ha, wa[:, :200], 0.2, 4, chunk_size=4)
    with pytest.raises(ValueError, match=r"same vocabulary size, got \(24, 203\) and \(16, 200\)"):
        dv.fused_token_kl(he, we, ha, wa[:, :200], chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        dv.token_kl_chunked(he, he, chunk_size=0)
    with pytest.raises(ValueError, match="alpha must lie in"):
        dv.fused_kl_and_target(he, we, ha, wa, 1.2, 4, chunk_size=4)
    with pytest.raises(ValueError, match="k must be at most the vocabulary size 100, got 101"):
        dv.fused_kl_and_target(he, we, ha, wa, 0.2, 101, chunk_size=4, vocab_size=100)
