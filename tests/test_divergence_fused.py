"""Chunked and fused (hidden states + LM head) divergence kernels equal the plain ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import reordered_sum_bound

from w2s_jax import divergence as dv

# T = 13 positions with chunk 4: three full blocks plus an overlapping last one;
# V = 203 is not a multiple of the chunk size either.
B, T, D_E, D_A, V, CHUNK = 2, 13, 24, 16, 203, 4


# Chunked, fused and plain kernels reduce in different orders. Every quantity here is
# built from at most 5 chained sums of at most V terms (the logits' sum over D <= 24, the
# two log-normalisers, the sum over V of a KL or loss, a gradient's sum over V or over
# the B * T = 26 positions), which bounds the float32 difference. A chunk computed at the
# wrong positions or a padded row left in moves values by O(0.1) and more.
def kl_bound(kl, reductions=4):
    """For KL values: the normalisers are sums of probabilities (scale 1), the KL's own
    sum has terms p * log(p / q) at about the KL's scale."""
    return reordered_sum_bound(1.0 + np.abs(kl).max(), terms=V, reductions=reductions)


def weights_bound(reductions=4):
    """For target weights and masses (at most 1)."""
    return reordered_sum_bound(1.0, terms=V, reductions=reductions)


def float32_bound(x):
    """For losses and gradients, at their own scale."""
    return reordered_sum_bound(x, terms=V, reductions=5)


def bfloat16_bound(x):
    """With bfloat16 inputs both computations also round the logits' gradient and the
    result to bfloat16: where their float32 values straddle a rounding boundary they land
    an ulp (at most eps * |x|) apart. Counted for both roundings, and twice, as the rounded
    gradient's terms can partly cancel in the sum over V that follows."""
    return float32_bound(x) + reordered_sum_bound(x, terms=1, reductions=4, dtype=jnp.bfloat16)


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
    bound = kl_bound(plain_kl, reductions=3)  # from logits: no sum over D
    for chunk in (1, CHUNK, 64):
        got = dv.token_kl_chunked(zp, zq, chunk_size=chunk)
        np.testing.assert_allclose(got, plain_kl, rtol=0, atol=bound)
    chunked = dv.contrastive_target_chunked(zp, zq, 0.2, 8, chunk_size=CHUNK, with_stats=True)
    np.testing.assert_array_equal(chunked[0], plain[0])
    np.testing.assert_allclose(chunked[1], plain[1], atol=weights_bound(3))
    np.testing.assert_array_equal(chunked[2]["plausible_size"], plain[2]["plausible_size"])
    np.testing.assert_allclose(
        chunked[2]["dropped_mass"], plain[2]["dropped_mass"], atol=weights_bound(3)
    )
    # One leading axis ([N, V], a notebook's flattened positions) and none ([V]).
    np.testing.assert_allclose(
        dv.token_kl_chunked(zp[0], zq[0], chunk_size=CHUNK), plain_kl[0], rtol=0, atol=bound
    )
    np.testing.assert_allclose(
        dv.token_kl_chunked(zp[0, 0], zq[0, 0], chunk_size=CHUNK), plain_kl[0, 0], atol=bound
    )


def test_fused_token_kl_equals_plain_in_value_and_gradient(hidden_and_heads):
    he, we, ha, wa = hidden_and_heads

    def plain(he, we, ha, wa):
        return jnp.sum(dv.token_kl(he @ we, ha @ wa) * jnp.arange(1.0, T + 1))

    def fused(he, we, ha, wa):
        kl = dv.fused_token_kl(he, we, ha, wa, chunk_size=CHUNK)
        return jnp.sum(kl * jnp.arange(1.0, T + 1))

    plain_kl = dv.token_kl(he @ we, ha @ wa)
    fused_kl = dv.fused_token_kl(he, we, ha, wa, chunk_size=CHUNK)
    np.testing.assert_allclose(fused_kl, plain_kl, rtol=0, atol=kl_bound(plain_kl))
    want = jax.grad(plain, argnums=(0, 1, 2, 3))(he, we, ha, wa)
    got = jax.grad(fused, argnums=(0, 1, 2, 3))(he, we, ha, wa)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=float32_bound(w))


def test_fused_kl_and_target_equals_plain_and_cuts_padded_vocab(hidden_and_heads):
    he, we, ha, wa = hidden_and_heads
    vocab = V - 11  # the heads carry 11 padded rows past the tokenizer's vocabulary
    # Make a padded row the expert's favourite: only the cut keeps it out of the target.
    we = we.at[:, V - 1].set(he[0, 0] * 5.0)
    kl, ids, w, stats = dv.fused_kl_and_target(
        he, we, ha, wa, 0.2, 6, chunk_size=CHUNK, vocab_size=vocab
    )
    ze, za = he @ we[:, :vocab], ha @ wa[:, :vocab]
    ref_kl = dv.token_kl(ze, za)
    np.testing.assert_allclose(kl, ref_kl, rtol=0, atol=kl_bound(ref_kl))
    ref_ids, ref_w, ref_stats = dv.contrastive_target(ze, za, 0.2, 6, with_stats=True)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(w, ref_w, atol=weights_bound())
    np.testing.assert_array_equal(stats["plausible_size"], ref_stats["plausible_size"])
    np.testing.assert_allclose(
        stats["dropped_mass"], ref_stats["dropped_mass"], atol=weights_bound()
    )
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

    bound = float32_bound if dtype == jnp.float32 else bfloat16_bound
    want_loss = plain(h, head)
    np.testing.assert_allclose(fused(h, head), want_loss, rtol=0, atol=bound(want_loss))
    want = jax.grad(plain, argnums=(0, 1))(h, head)
    got = jax.grad(fused, argnums=(0, 1))(h, head)
    for g, ref in zip(got, want, strict=True):
        assert g.dtype == dtype
        ref = np.asarray(ref, np.float32)
        np.testing.assert_allclose(np.asarray(g, np.float32), ref, rtol=0, atol=bound(ref))
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


# --- head layouts: "vd" ([V, D], a tied embedding) as stored equals "dv" on its transpose ---


def grads_in_both_layouts(fn_of_layout, hidden, head_dv, extra=()):
    """(value, grads) of fn(hidden, head, *extra) with head_dv as "dv" and head_dv.T as "vd"."""
    out = {}
    for layout, head in (("dv", head_dv), ("vd", jnp.asarray(head_dv).T)):
        fn = fn_of_layout(layout)
        out[layout] = jax.value_and_grad(fn, argnums=tuple(range(2 + len(extra))))(
            hidden, head, *extra
        )
    return out["dv"], out["vd"]


def assert_same_in_both_layouts(dv_result, vd_result, bound=float32_bound, head_args=(1,)):
    """Values and gradients agree within bound(expected array), gradients in each layout."""
    (value_dv, grads_dv), (value_vd, grads_vd) = dv_result, vd_result
    np.testing.assert_allclose(value_vd, value_dv, rtol=0, atol=bound(value_dv))
    assert np.all(np.isfinite(np.asarray(value_vd)))
    for i, (g_dv, g_vd) in enumerate(zip(grads_dv, grads_vd, strict=True)):
        want = g_dv.T if i in head_args else g_dv  # a head's gradient comes in its layout
        assert g_vd.shape == want.shape
        assert np.any(np.asarray(want) != 0)
        np.testing.assert_allclose(g_vd, want, rtol=0, atol=bound(want))


def test_fused_token_kl_vd_layout_equals_dv_on_the_transpose(hidden_and_heads):
    he, we, ha, wa = hidden_and_heads
    coef = jnp.arange(1.0, T + 1)

    def fn_of(layout):
        def fn(he, we, ha, wa):
            kl = dv.fused_token_kl(
                he, we, ha, wa, chunk_size=CHUNK, p_head_layout=layout, q_head_layout="dv"
            )
            return jnp.sum(kl * coef)

        return fn

    # The expert head in the layout under test, the amateur's [D, V] in both runs.
    dv_run, vd_run = grads_in_both_layouts(fn_of, he, we, (ha, wa))
    assert_same_in_both_layouts(dv_run, vd_run)
    # Both heads [V, D]: same KL as plain logits.
    kl = dv.fused_token_kl(
        he, we.T, ha, wa.T, chunk_size=CHUNK, p_head_layout="vd", q_head_layout="vd"
    )
    plain_kl = dv.token_kl(he @ we, ha @ wa)
    np.testing.assert_allclose(kl, plain_kl, rtol=0, atol=kl_bound(plain_kl))


@pytest.mark.parametrize("amateur_rows", [V, V - 3])
def test_fused_kl_and_target_vd_layout_with_padded_vocab(hidden_and_heads, amateur_rows):
    he, we, ha, wa = hidden_and_heads
    wa = wa[:, :amateur_rows]  # heads of different V are compared over the common ids
    vocab = V - 11
    we = we.at[:, V - 1].set(he[0, 0] * 5.0)  # a loud padded row, as above
    ze, za = he @ we[:, :vocab], ha @ wa[:, :vocab]
    ref_kl = dv.token_kl(ze, za)
    ref_ids, ref_w, ref_stats = dv.contrastive_target(ze, za, 0.2, 6, with_stats=True)
    for layouts in (("vd", "vd"), ("vd", "dv"), ("dv", "vd")):
        heads = [w.T if layout == "vd" else w for w, layout in zip((we, wa), layouts, strict=True)]
        kl, ids, w, stats = dv.fused_kl_and_target(
            he,
            heads[0],
            ha,
            heads[1],
            0.2,
            6,
            chunk_size=CHUNK,
            vocab_size=vocab,
            expert_head_layout=layouts[0],
            amateur_head_layout=layouts[1],
        )
        np.testing.assert_allclose(kl, ref_kl, rtol=0, atol=kl_bound(ref_kl))
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(w, ref_w, atol=weights_bound())
        np.testing.assert_array_equal(stats["plausible_size"], ref_stats["plausible_size"])
        mass = ref_stats["dropped_mass"]
        np.testing.assert_allclose(stats["dropped_mass"], mass, atol=weights_bound())

    # Gradients (KL and weights both depend on the heads), expert head in either layout.
    coef = jnp.asarray(np.random.default_rng(8).normal(size=(B, T, 6)), jnp.float32)

    def fn_of(layout):
        def fn(he, we, ha, wa):
            kl, _, w, _ = dv.fused_kl_and_target(
                he,
                we,
                ha,
                wa,
                0.2,
                6,
                chunk_size=CHUNK,
                vocab_size=vocab,
                expert_head_layout=layout,
            )
            return jnp.sum(kl) + jnp.sum(w * coef)

        return fn

    dv_run, vd_run = grads_in_both_layouts(fn_of, he, we, (ha, wa))
    assert_same_in_both_layouts(dv_run, vd_run)
    # The padded rows get no gradient in either layout.
    assert not np.any(np.asarray(vd_run[1][1])[vocab:])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_contrastive_loss_vd_layout_equals_dv_on_the_transpose(hidden_and_heads, dtype):
    he, we, ha, wa = hidden_and_heads
    vocab = V - 11
    ids, w = dv.contrastive_target(he @ we[:, :vocab], ha @ wa[:, :vocab], 0.1, 5)
    mask = np.random.default_rng(9).uniform(size=(B, T)) < 0.6
    h, head = he.astype(dtype), we.astype(dtype)

    def fn_of(layout):
        def fn(h, head):
            return dv.fused_contrastive_loss(
                h, head, ids, w, mask, chunk_size=CHUNK, vocab_size=vocab, head_layout=layout
            )

        return fn

    dv_run, vd_run = grads_in_both_layouts(fn_of, h, head)
    for grad in (*dv_run[1], *vd_run[1]):
        assert grad.dtype == dtype
    bound = float32_bound if dtype == jnp.float32 else bfloat16_bound
    as32 = lambda run: (run[0], tuple(np.asarray(g, np.float32) for g in run[1]))
    assert_same_in_both_layouts(as32(dv_run), as32(vd_run), bound)
    # And the plain loss on the real ids (the padded rows are masked in both layouts).
    logits = jnp.matmul(h, head[:, :vocab], preferred_element_type=jnp.float32)
    want = dv.contrastive_loss(logits, ids, w, mask)
    np.testing.assert_allclose(vd_run[0], want, rtol=0, atol=bound(want))


def test_fused_bad_head_layout_names_the_argument(hidden_and_heads):
    he, we, ha, wa = hidden_and_heads
    with pytest.raises(ValueError, match=r"head_layout must be 'dv' .* or 'vd' .*got 'VD'"):
        dv.fused_contrastive_loss(he, we.T, None, None, None, chunk_size=4, head_layout="VD")
    with pytest.raises(
        ValueError,
        match=r"hidden \[\.\.\., D\] and head \[D, V\] disagree on D: \(2, 13, 24\) and "
        r"\(203, 24\) \(for a \[V, D\] head pass head_layout='vd'\)",
    ):
        dv.fused_contrastive_loss(he, we.T, None, None, None, chunk_size=4)
    with pytest.raises(
        ValueError, match=r"amateur_hidden \[\.\.\., D\] and amateur_head \[V, D\] disagree on D"
    ):
        dv.fused_kl_and_target(he, we, ha, we.T, 0.2, 4, chunk_size=4, amateur_head_layout="vd")
    with pytest.raises(ValueError, match=r"q_head must be \[V, D\], got shape \(16,\)"):
        dv.fused_token_kl(he, we, ha, wa[:, 0], chunk_size=4, q_head_layout="vd")
    with pytest.raises(ValueError, match=r"p_head_layout must be 'dv'"):
        dv.fused_token_kl(he, we, ha, wa, chunk_size=4, p_head_layout=None)
    with pytest.raises(ValueError, match=r"vocab_size 300 exceeds .*\(203 expert, 200 amateur\)"):
        dv.fused_kl_and_target(
            he,
            we.T,
            ha,
            wa[:, :200].T,
            0.2,
            4,
            chunk_size=4,
            vocab_size=300,
            expert_head_layout="vd",
            amateur_head_layout="vd",
        )


def test_tied_head_as_stored_needs_no_transposed_copy():
    """Compile only: a [V, D] embedding passed as "vd" costs what an untied [D, V] kernel
    does; passed as embedding.T with "dv", XLA:CPU materializes that transposed operand of
    the chunk loop whole."""
    batch, length, d, vocab, k, chunk = 4, 64, 256, 16384, 8, 16
    head_bytes = d * vocab * 4
    sd = jax.ShapeDtypeStruct
    hidden = sd((batch, length, d), jnp.float32)
    targets = (sd((batch, length, k), jnp.int32), sd((batch, length, k), jnp.float32))
    mask = sd((batch, length), bool)

    def temp_bytes(head_shape, layout, transpose=False):
        def run(h, head, ids, w, mask):
            head = head.T if transpose else head
            kl, *_ = dv.fused_kl_and_target(
                h,
                head,
                h,
                head,
                0.2,
                k,
                chunk_size=chunk,
                vocab_size=vocab - 5,
                expert_head_layout=layout,
                amateur_head_layout=layout,
            )
            loss = lambda h, head: dv.fused_contrastive_loss(
                h, head, ids, w, mask, chunk_size=chunk, vocab_size=vocab - 5, head_layout=layout
            )
            return kl, jax.grad(loss, argnums=(0, 1))(h, head)

        shapes = (hidden, sd(head_shape, jnp.float32), *targets, mask)
        return jax.jit(run).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    untied = temp_bytes((d, vocab), "dv")
    tied_as_stored = temp_bytes((vocab, d), "vd")
    assert tied_as_stored <= untied + 0.1 * head_bytes, (tied_as_stored, untied)
    tied_transposed = temp_bytes((vocab, d), "dv", transpose=True)
    assert tied_as_stored <= tied_transposed - 0.5 * head_bytes, (tied_as_stored, tied_transposed)


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_matrix_is_the_head_as_stored(tied):
    from flax import nnx

    from w2s_jax.models import CausalLM, ModelConfig

    config = ModelConfig.from_hf_json(
        {
            "model_type": "qwen2",
            "vocab_size": 40,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "tie_word_embeddings": tied,
        }
    )
    model = CausalLM(config, rngs=nnx.Rngs(0))
    head, layout = model.lm_head_matrix()
    if tied:
        assert layout == "vd"
        np.testing.assert_array_equal(head, model.model.embed_tokens.embedding[...])
        np.testing.assert_array_equal(head.T, model.lm_head_kernel())
    else:
        assert layout == "dv"
        np.testing.assert_array_equal(head, model.lm_head.kernel[...])
    assert head.shape == ((40, 16) if tied else (16, 40))
    # With padded ids, the fused loss on it equals the plain loss on the model's logits.
    model.restrict_vocab(37)
    hidden = model.hidden_states(np.arange(12).reshape(2, 6) % 37)
    ids = jnp.asarray(np.random.default_rng(10).integers(0, 37, size=(2, 6, 3)), jnp.int32)
    w = jnp.full((2, 6, 3), 1 / 3, jnp.float32)
    mask = np.ones((2, 6), bool)
    fused = dv.fused_contrastive_loss(
        hidden, head, ids, w, mask, chunk_size=4, vocab_size=37, head_layout=layout
    )
    plain = dv.contrastive_loss(model.logits(hidden), ids, w, mask)
    # the logits' sum over hidden 16, the log-normaliser over 40 rows, k = 3 targets, 12 positions
    np.testing.assert_allclose(fused, plain, rtol=0, atol=reordered_sum_bound(plain, 40, 4))
