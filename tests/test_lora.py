"""LoRA adapters: PEFT's formula, merging, targeting by name, checkpoint round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import decoder_bound

from w2s_jax.checkpointing import TrainCheckpoints
from w2s_jax.lora import (
    LoRAConfig,
    ScaledLoRA,
    apply_lora,
    load_lora_into,
    merge_lora,
    trainable_filter,
)
from w2s_jax.models import load_pretrained
from w2s_jax.settings import comma_list
from w2s_jax.sharding import make_mesh

_forward = nnx.jit(lambda model, ids: model(ids))


def logits(model):
    return np.asarray(_forward(model, IDS))


IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 64], [8, 9, 10, 11, 12, 13, 14, 15]], np.int32)


def _randomize_adapters(model, seed=0, scale=0.3):
    """Give every adapter a non-zero B (A is already random) so merges are not trivial."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, new))


@pytest.fixture(scope="module")
def expert(tiny_qwen2_dir):
    return load_pretrained(tiny_qwen2_dir, dtype="float32")


def test_scaled_lora_is_peft_formula():
    base = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
    layer = ScaledLoRA(base, LoRAConfig(rank=4, alpha=8.0, dropout=0.0), rngs=nnx.Rngs(1))
    layer.lora_b[...] = jax.random.normal(jax.random.key(2), (4, 6))
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    w, b = (np.asarray(v, np.float64) for v in (base.kernel[...], base.bias[...]))
    a_, b_ = (np.asarray(v, np.float64) for v in (layer.lora_a[...], layer.lora_b[...]))
    expected = x @ w + b + (8.0 / 4) * (x @ a_ @ b_)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)
    # PEFT's init: A ~ U(±1/sqrt(in)), B = 0
    fresh = ScaledLoRA(base, LoRAConfig(rank=4), rngs=nnx.Rngs(3))
    assert np.abs(np.asarray(fresh.lora_a[...])).max() <= 1 / np.sqrt(8)
    assert not np.asarray(fresh.lora_b[...]).any()
    np.testing.assert_allclose(layer.merged_kernel(), w + 2 * a_ @ b_, rtol=1e-5, atol=1e-6)


def test_apply_and_merge(tiny_qwen2_dir, expert):
    model = load_pretrained(tiny_qwen2_dir, dtype="float32")
    base_logits = logits(expert)
    paths = apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    assert paths == [
        f"model/layers/{i}/self_attn/{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
    ]
    # B = 0 at initialisation: the adapted model is the base model
    np.testing.assert_array_equal(logits(model), base_logits)
    _randomize_adapters(model)
    adapted = logits(model)
    assert np.abs(adapted - base_logits).max() > 1e-2
    lora_state = nnx.state(model, nnx.LoRAParam)
    assert {x.dtype for x in jax.tree.leaves(lora_state)} == {jnp.dtype("float32")}
    merge_lora(model)
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    assert type(model.model.layers[0].self_attn.q_proj) is nnx.Linear
    # Merging only reorders float32 roundings (x @ (W + s A B) vs x @ W + s (x A) B); a
    # merge missing the alpha / rank scale moves logits by ~9, a 0.1% scale error by ~2e-2.
    bound = decoder_bound(adapted, layers=2, hidden=64, intermediate=128, positions=8)
    assert bound < 1e-3 * np.abs(adapted - base_logits).max()
    np.testing.assert_allclose(logits(model), adapted, rtol=0, atol=bound)
    # untouched layers keep their exact weights
    np.testing.assert_array_equal(
        model.model.layers[1].self_attn.k_proj.kernel[...],
        expert.model.layers[1].self_attn.k_proj.kernel[...],
    )


def test_unknown_target_is_a_clear_error(tiny_qwen2_dir):
    model = load_pretrained(tiny_qwen2_dir, dtype="float32")
    with pytest.raises(ValueError, match=r"qproj match no linear layer .*available: .*q_proj"):
        apply_lora(model, LoRAConfig(targets=("qproj", "v_proj")))
    assert apply_lora(model, LoRAConfig(rank=0)) == []
    assert trainable_filter(LoRAConfig(rank=0)) is nnx.Param
    assert trainable_filter(LoRAConfig()) is nnx.LoRAParam
    with pytest.raises(ValueError, match="rank must be >= 0"):
        LoRAConfig(rank=-1)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoRAConfig(dropout=1.0)
    assert comma_list(" q_proj, v_proj ,") == ("q_proj", "v_proj")


def test_bf16_compute_with_float32_adapters(tiny_qwen2_dir):
    model = load_pretrained(tiny_qwen2_dir, dtype="bfloat16")
    apply_lora(model, LoRAConfig(rank=4, dropout=0.0))
    _randomize_adapters(model)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora):
        m = nnx.merge(graphdef, lora, rest)
        return m(IDS).mean()

    grads = jax.jit(jax.grad(loss))(lora)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype("float32")}
    q = model.model.layers[0].self_attn.q_proj
    x = jnp.ones((2, 64), jnp.bfloat16)
    assert q(x).dtype == jnp.bfloat16 and q.lora_a[...].dtype == jnp.float32


def test_dropout_is_seeded():
    layer = ScaledLoRA(
        nnx.Linear(8, 6, rngs=nnx.Rngs(0)),
        LoRAConfig(rank=4, dropout=0.5),
        rngs=nnx.Rngs(params=1, dropout=2),
    )
    layer.lora_b[...] = jnp.ones((4, 6))
    x = jnp.ones((3, 8))

    def run(seed):
        nnx.reseed(layer, dropout=seed)
        return np.asarray(layer(x))

    assert np.array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    layer.dropout.deterministic = True
    np.testing.assert_allclose(
        run(1), layer.base_module(x) + 4.0 * (x @ layer.lora_a[...] @ layer.lora_b[...]), rtol=1e-6
    )


def test_load_lora_into_round_trip(tmp_path, tiny_qwen2_dir, tiny_qwen2_amateur_dir):
    config = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), dropout=0)
    model = load_pretrained(tiny_qwen2_dir, dtype="float32")
    apply_lora(model, config)
    _randomize_adapters(model, seed=7)
    params = nnx.state(model, nnx.LoRAParam)
    checkpoints = TrainCheckpoints(tmp_path, save_every=1, keep=2)
    checkpoints.save(3, params, {"mu": params}, {"lora": config.to_dict()})
    checkpoints.close()
    expected = logits(model)

    fresh = load_lora_into(load_pretrained(tiny_qwen2_dir, dtype="float32"), tmp_path)
    np.testing.assert_allclose(logits(fresh), expected, rtol=1e-6, atol=1e-6)
    # onto a model sharded over a (4, 2) mesh: adapters follow it, merged or not
    mesh = make_mesh("fsdp=4,tensor=2")
    sharded = load_lora_into(load_pretrained(tiny_qwen2_dir, dtype="float32", mesh=mesh), tmp_path)
    # sharded sums split and reorder the same float32 reductions
    bound = decoder_bound(expected, layers=2, hidden=64, intermediate=128, positions=8)
    np.testing.assert_allclose(logits(sharded), expected, rtol=0, atol=bound)
    np.testing.assert_allclose(logits(merge_lora(sharded)), expected, rtol=0, atol=bound)

    with pytest.raises(ValueError, match="does not fit the model: parameter model/layers/0"):
        load_lora_into(load_pretrained(tiny_qwen2_amateur_dir, dtype="float32"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 5"):
        load_lora_into(load_pretrained(tiny_qwen2_dir, dtype="float32"), tmp_path, step=5)
