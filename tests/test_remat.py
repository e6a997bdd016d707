"""Rematerialization of each decoder layer: the policies change memory, never gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core
from tolerances import reordered_sum_bound

from w2s_jax.lora import LoRAConfig, apply_lora
from w2s_jax.models import load_pretrained
from w2s_jax.models.stacking import REMAT_POLICIES

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 64], [0, 0, 10, 11, 12, 13, 14, 15]], np.int32)
MASK = (np.arange(8)[None] >= np.array([[0], [2]])).astype(np.int32)
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "up_proj"))


def grad_fn(model, what):
    """(jitted params -> gradients of a next-token loss, the trainable params)."""
    graphdef, params, rest = nnx.split(model, what, ...)

    def loss(params, rest):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, params, rest, copy=True)(IDS, MASK))
        picked = jnp.take_along_axis(logp[:, :-1], IDS[:, 1:, None], -1)[..., 0]
        return -jnp.mean(picked * MASK[:, 1:])

    return jax.grad(loss), params, rest


def gradients(folder, layer_stack, remat, lora: bool):
    model = load_pretrained(folder, dtype="float32", layer_stack=layer_stack, remat=remat)
    if lora:
        apply_lora(model, LORA, seed=0)
        # B starts at zero; a random B makes every adapter's gradient non-trivial
        state = nnx.state(model, nnx.LoRAParam)
        keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
        nnx.update(
            model, jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), state)
        )
    return grad_fn(model, nnx.LoRAParam if lora else nnx.Param)


@pytest.mark.parametrize("layer_stack", ["loop", "scan"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_remat_policies_give_the_gradients_of_no_remat(tiny_qwen2_dir, layer_stack, lora):
    fn, params, rest = gradients(tiny_qwen2_dir, layer_stack, "none", lora)
    reference = jax.jit(fn)(params, rest)
    assert not _remat_equations(jax.make_jaxpr(fn)(params, rest).jaxpr)
    for remat, policy in REMAT_POLICIES.items():
        fn, params, rest = gradients(tiny_qwen2_dir, layer_stack, remat, lora)
        # each layer is wrapped in jax.checkpoint with the policy asked for
        jaxpr = jax.make_jaxpr(fn)(params, rest)
        policies = {eqn.params["policy"] for eqn in _remat_equations(jaxpr.jaxpr)}
        assert policies == {policy}, remat
        grads = jax.jit(fn)(params, rest)
        pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(reference), strict=True)
        for actual, expected in pairs:
            # recomputed activations fuse and round differently: the forward and backward
            # passes through the 2 layers (2 * (9 * 2 + 2) reductions), the log-softmax over
            # V = 320 and the mean, V the longest; a layer's gradient lost is off by O(1)
            bound = reordered_sum_bound(expected, terms=320, reductions=2 * (9 * 2 + 2) + 2)
            np.testing.assert_allclose(actual, expected, rtol=0, atol=bound, err_msg=remat)


def _remat_equations(jaxpr) -> list:
    """Every jax.checkpoint equation in `jaxpr` and its sub-jaxprs (scan, pjit, ...)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("remat2", "checkpoint"):
            found.append(eqn)
        for sub in jax_core.jaxprs_in_params(eqn.params):
            found.extend(_remat_equations(sub))
    return found
