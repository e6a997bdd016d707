"""Divergence kernels on a (data=2, tensor=4) mesh, vocabulary sharded, equal unsharded results.

Auto mesh axes, as w2s_jax.sharding.make_mesh builds them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from tolerances import reordered_sum_bound

from w2s_jax import divergence as dv

B, T, D, V, K = 4, 6, 16, 512, 8


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == 8, "conftest gives 8 simulated devices"
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        yield mesh


def rand(seed, shape, scale=1.0):
    return np.asarray(np.random.default_rng(seed).normal(size=shape) * scale, np.float32)


def put(mesh, x, *spec):
    x = jax.device_put(x, NamedSharding(mesh, P(*spec)))
    assert len(x.sharding.device_set) == 8
    return x


def check_tree(got, want):
    """Integers equal; floats within the float32 bound of reordered sums. Each value is at
    most 5 chained sums of at most V terms (the logits' sum over D, two log-normalisers,
    the KL or loss sum, a gradient's sum), at the scale of the value or of probabilities
    (1). A shard's softmax normalised on its own slice of V is off by O(1)."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if jnp.issubdtype(w.dtype, jnp.integer) or w.dtype == bool:
            np.testing.assert_array_equal(g, w)
        else:
            w = np.asarray(w)
            scale = max(1.0, float(np.abs(w[np.isfinite(w)]).max(initial=0.0)))
            bound = reordered_sum_bound(scale, terms=V, reductions=5)
            np.testing.assert_allclose(g, w, rtol=0, atol=bound)


def test_logit_kernels_with_vocab_sharded_over_tensor(mesh):
    ze, za = rand(0, (B, T, V), 2.0), rand(1, (B, T, V), 2.0)
    ze[..., -7:] = -np.inf
    mask = np.random.default_rng(2).uniform(size=(B, T)) < 0.5

    def everything(ze, za, mask):
        kl = dv.token_kl(ze, za)
        ids, w, stats = dv.contrastive_target(ze, za, 0.2, K, with_stats=True)
        loss, grad = jax.value_and_grad(dv.contrastive_loss)(ze, ids, w, mask)
        return {
            "kl": kl,
            "js": dv.token_js(ze, za),
            "mask": dv.plausibility_mask(ze, 0.2),
            "target": (ids, w, stats),
            "selected": dv.select_steps(kl, 0.4, mask),
            "loss": loss,
            "grad": grad,
            "kl_chunked": dv.token_kl_chunked(ze, za, chunk_size=4),
        }

    fn = jax.jit(everything)
    want = fn(ze, za, mask)
    got = fn(put(mesh, ze, "data", None, "tensor"), put(mesh, za, "data", None, "tensor"), mask)
    check_tree(got, want)


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_fused_kernels_with_head_sharded_over_tensor(mesh, layout):
    """Heads [D, V] ("dv") or [V, D] ("vd", a tied embedding), vocabulary over "tensor"."""
    he, ha = rand(3, (B, T, D)), rand(4, (B, T, D // 2))
    we, wa = rand(5, (D, V), 0.7), rand(6, (D // 2, V), 0.7)
    vocab = V - 9  # not a multiple of the 4 vocabulary shards
    ids, w = dv.contrastive_target(he @ we, ha @ wa, 0.2, K)
    mask = np.random.default_rng(7).uniform(size=(B, T)) < 0.5
    if layout == "vd":
        we, wa = we.T, wa.T
    vocab_spec = (None, "tensor") if layout == "dv" else ("tensor", None)
    layouts = {"expert_head_layout": layout, "amateur_head_layout": layout}

    def everything(he, we, ha, wa):
        loss, grads = jax.value_and_grad(
            lambda h, head: dv.fused_contrastive_loss(
                h, head, ids, w, mask, chunk_size=4, head_layout=layout
            ),
            argnums=(0, 1),
        )(he, we)
        return {
            "kl_target": dv.fused_kl_and_target(
                he, we, ha, wa, 0.2, K, chunk_size=4, vocab_size=vocab, **layouts
            ),
            "kl": dv.fused_token_kl(
                he, we, ha, wa, chunk_size=4, p_head_layout=layout, q_head_layout=layout
            ),
            "loss": loss,
            "grads": grads,
        }

    fn = jax.jit(everything)
    want = fn(he, we, ha, wa)
    got = fn(
        put(mesh, he, "data", None, None),
        put(mesh, we, *vocab_spec),
        put(mesh, ha, "data", None, None),
        put(mesh, wa, *vocab_spec),
    )
    check_tree(got, want)
