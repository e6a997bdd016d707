"""Activation sharding constraints: the rules land in the program and change no number."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import write_samples

from w2s_jax import sharding
from w2s_jax.checkpointing import restore_params
from w2s_jax.lora import LoRAConfig, apply_lora
from w2s_jax.models import load_pretrained
from w2s_jax.sharding import P, activation_spec, constrain, make_mesh
from w2s_jax.train import train
from w2s_jax.train_config import TrainSettings

MESH = "data=2,fsdp=2,tensor=2"


def test_activation_spec_follows_the_rules_and_falls_back_when_an_axis_does_not_divide():
    mesh = make_mesh(MESH)
    heads = ("batch", "length", "heads", "head_dim")
    assert activation_spec(heads, (8, 5, 4, 16), mesh) == P(("data", "fsdp"), None, "tensor")
    assert activation_spec(("batch", "length", "mlp"), (4, 5, 128), mesh) == P(
        ("data", "fsdp"), None, "tensor"
    )
    assert activation_spec(("batch", "length", "embed"), (4, 5, 64), mesh) == P(("data", "fsdp"))
    # 6 rows over data x fsdp = 4 and 3 heads over tensor = 2 do not divide: unsharded
    assert activation_spec(heads, (6, 5, 3, 16), mesh) == P()
    assert activation_spec(heads, (6, 5, 4, 16), mesh) == P(None, None, "tensor")
    one = make_mesh("data=1", devices=jax.devices()[:1])
    assert activation_spec(heads, (8, 5, 4, 16), one) == P()


def test_constrain_is_a_no_op_without_a_mesh_and_constrains_on_one():
    x = jnp.ones((8, 5, 64))
    assert constrain(x, ("batch", "length", "embed")) is x
    double = jax.jit(lambda y: constrain(y * 2, ("batch", "length", "embed")))
    assert "sharding_constraint" not in double.lower(x).as_text()
    mesh = make_mesh(MESH)
    # the mesh comes from the traced input, or from `jax.set_mesh` for an unplaced one
    assert double(jax.device_put(x, jax.NamedSharding(mesh, P()))).sharding.spec == P(
        ("data", "fsdp")
    )
    with jax.set_mesh(mesh):
        assert double(x).sharding.spec == P(("data", "fsdp"))


def _constraints(text: str) -> set[tuple[str, str]]:
    """(spec, shape) of every sdy.sharding_constraint in a lowered module's text."""
    pattern = r"sdy\.sharding_constraint %\S+ <@\w+, (\[.*?\])> : tensor<([\dx]+)x\w+>"
    return set(re.findall(pattern, text))


@pytest.mark.parametrize("layer_stack", ["loop", "scan"])
def test_forward_on_a_mesh_constrains_residual_heads_and_mlp(tiny_qwen2_dir, layer_stack):
    mesh = make_mesh(MESH)
    model = load_pretrained(tiny_qwen2_dir, dtype="float32", mesh=mesh, layer_stack=layer_stack)
    graphdef, state = nnx.split(model)
    ids = sharding.place_batch(np.ones((4, 8), np.int32), mesh)
    text = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i)).lower(state, ids).as_text()
    rows = '{"data", "fsdp"}, {}'
    assert {
        (f"[{rows}, {{}}]", "4x8x64"),  # residual stream [B, T, D]
        (f'[{rows}, {{"tensor"}}]', "4x8x128"),  # MLP hidden [B, T, F]
        (f'[{rows}, {{"tensor"}}, {{}}]', "4x8x4x16"),  # query heads [B, T, N, H]
        (f'[{rows}, {{"tensor"}}, {{}}]', "4x8x2x16"),  # key/value heads [B, T, K, H]
    } <= _constraints(text)


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tiny_qwen2_dir):
    return write_samples(tmp_path_factory.mktemp("samples"), tiny_qwen2_dir, n=3)


def _step(samples, expert, out, mesh, **kw):
    """One `w2s train` step; returns (its metrics, the trained parameters)."""
    settings = TrainSettings(
        samples=str(samples),
        expert=str(expert),
        out=str(out),
        steps=1,
        batch_positions=8,
        dtype="float32",
        # Adam's first update is lr * g / (|g| + eps): eps = 1 keeps it smooth in g, so float32
        # summation order (8 shards vs 1) cannot flip the update of a gradient near 0
        learning_rate=1.0,
        adam_eps=1.0,
        length_bucket=32,
        lora_dropout=0.0,
        progress=False,
        **kw,
    )
    train(settings, mesh=mesh)
    model = load_pretrained(expert, dtype="float32", layer_stack=kw["layer_stack"])
    if kw["lora_rank"]:
        apply_lora(model, LoRAConfig(rank=kw["lora_rank"], dropout=0.0))
    kind = nnx.LoRAParam if kw["lora_rank"] else nnx.Param
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return metrics, restore_params(out, nnx.state(model, kind))


@pytest.mark.parametrize("layer_stack", ["loop", "scan"])
@pytest.mark.parametrize("lora_rank", [8, 0], ids=["lora", "full"])
def test_train_step_on_data_fsdp_tensor_mesh_equals_one_device(
    tmp_path, samples, tiny_qwen2_dir, layer_stack, lora_rank
):
    kw = dict(layer_stack=layer_stack, lora_rank=lora_rank)
    one = make_mesh("data=1", devices=jax.devices()[:1])
    metrics_one, params_one = _step(samples, tiny_qwen2_dir, tmp_path / "one", one, **kw)
    metrics_mesh, params_mesh = _step(
        samples, tiny_qwen2_dir, tmp_path / "mesh", make_mesh(MESH), **kw
    )
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics_mesh[key], metrics_one[key], rtol=1e-5)
    trained = nnx.to_flat_state(params_mesh)
    assert len(trained) > 0
    for (path, mine), (_, theirs) in zip(trained, nnx.to_flat_state(params_one), strict=True):
        np.testing.assert_allclose(
            np.asarray(mine.get_value()), np.asarray(theirs.get_value()), atol=1e-5, err_msg=path
        )
