"""Mixed precision: float32 master weights and AdamW state under bfloat16 compute.

Full fine-tuning in bfloat16 with bfloat16 weights loses small updates: a bf16 weight
moves in steps of 2^-8..2^-7 of its size, so an AdamW step of ~lr rounds away when lr
is below half of that. float32 masters (the default for --lora-rank 0 in half precision)
keep them; the layers cast the masters to bf16 inside, so gradients reach them.
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from test_train import write_samples

from w2s_jax.checkpointing import restore_params
from w2s_jax.cli import main
from w2s_jax.data.kd_selection import step_stream
from w2s_jax.data.packing import find_sample_files, load_trajectories
from w2s_jax.models import load_pretrained, save_pretrained
from w2s_jax.models.dtypes import resolve_dtypes, resolve_param_dtype
from w2s_jax.sharding import make_mesh
from w2s_jax.train import compile_step, configured_objective, shard_batch, train
from w2s_jax.train_config import TrainSettings

# Small enough that bf16 weights of the tiny model (|w| ~ 0.2: steps of ~1e-3) stay put
# while float32 masters move by ~lr per AdamW step.
TINY_LR = 1e-5
STEPS = 4


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tiny_qwen2_dir):
    return write_samples(tmp_path_factory.mktemp("samples"), tiny_qwen2_dir, n=3)


@pytest.fixture(scope="module")
def one_device():
    return make_mesh("data=1", devices=jax.devices()[:1])


def _settings(samples, expert, **kw):
    values = dict(
        samples=str(samples),
        expert=str(expert),
        out="unused",
        lora_rank=0,
        learning_rate=TINY_LR,
        steps=100,  # a flat schedule over the few steps run here
        batch_positions=8,
        grad_accum=2,
        length_bucket=32,
        progress=False,
    )
    return TrainSettings(**(values | kw))


def _run(settings, mesh, steps=STEPS):
    """(initial params, final (params, opt_state), losses, last metrics) of `steps` steps."""
    settings = resolve_dtypes(settings, master_weights=settings.full_finetuning)
    step_fn, state, rest, _ = compile_step(settings, mesh)
    objective = configured_objective(settings)
    trajectories, stats = load_trajectories(find_sample_files(settings.samples))
    stream = step_stream(trajectories, settings, 0, None)
    initial = jax.device_get(state[0])
    losses = []
    for step in range(steps):
        arrays = objective.collate(
            trajectories, next(stream), k=stats["k"], pad_id=0, length_bucket=32, row_multiple=1
        )
        batch = shard_batch(arrays, mesh, objective.layout)
        state, metrics = step_fn(state, rest, batch, jax.random.key(step))
        losses.append(float(metrics["loss"]))
    return initial, jax.device_get(state), losses, metrics


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _float_dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.fixture(scope="module")
def runs(samples, tiny_qwen2_dir, one_device):
    """The same steps in float32, bf16 compute on float32 masters, and pure bf16."""
    settings = {
        "float32": dict(dtype="float32"),
        "masters": dict(dtype="bfloat16"),  # param_dtype: the default
        "bf16": dict(dtype="bfloat16", param_dtype="bfloat16"),
    }
    return {
        name: _run(_settings(samples, tiny_qwen2_dir, **kw), one_device)
        for name, kw in settings.items()
    }


def _update_error(run, reference) -> float:
    """||update - reference update|| / ||reference update|| (each from its own start)."""
    (start, (end, _), *_), (ref_start, (ref_end, _), *_) = run, reference
    ref_update = _flat(ref_end) - _flat(ref_start)
    return np.linalg.norm(_flat(end) - _flat(start) - ref_update) / np.linalg.norm(ref_update)


def test_float32_masters_follow_the_float32_run(runs):
    start, (params, opt_state), losses, metrics = runs["masters"]
    assert _float_dtypes(params) == _float_dtypes(opt_state) == {"float32"}
    assert metrics["loss"].dtype == np.float32  # accumulated in float32
    # Every master weight moved: the gradient reached it through the bf16 cast.
    assert np.mean(_flat(params) != _flat(start)) > 0.99
    # bf16 compute rounds activations and gradients to 8 significant bits, and AdamW's first
    # steps move each weight by ~lr * sign(gradient), so weights whose gradient lies within
    # that noise may move differently: measured 0.085-0.091 at lr 1e-5..1e-3; bound 0.2.
    assert _update_error(runs["masters"], runs["float32"]) < 0.2
    # The loss (accumulated in float32) averages many positions whose bf16 roundings are
    # independent: it lands well within bf16's resolution of the float32 run's, measured
    # 5e-4 to 8.4e-4 relative. (The worst case, every rounding adding up, is ~15% of it.)
    eps_bf16 = float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)
    np.testing.assert_allclose(losses, runs["float32"][2], rtol=eps_bf16)


def test_bf16_weights_lose_the_small_updates(runs):
    start, (params, opt_state), losses, _ = runs["bf16"]
    assert _float_dtypes(params) == _float_dtypes(opt_state) == {"bfloat16"}
    moved = np.mean(_flat(params) != _flat(start))
    assert moved < 0.05, moved  # measured 0.016: only weights near 0 have steps below lr
    assert _update_error(runs["bf16"], runs["float32"]) > 0.9  # measured 0.99
    assert 5 * _update_error(runs["masters"], runs["float32"]) < _update_error(
        runs["bf16"], runs["float32"]
    )


def test_lora_adapters_and_their_state_stay_float32(samples, tiny_qwen2_dir, one_device):
    settings = _settings(samples, tiny_qwen2_dir, lora_rank=4, dtype="bfloat16")
    _, (params, opt_state), _, metrics = _run(settings, one_device, steps=1)
    assert _float_dtypes(params) == _float_dtypes(opt_state) == {"float32"}
    assert metrics["loss"].dtype == np.float32
    # The frozen base weights stay in the compute dtype (no float32 copy by default).
    assert resolve_dtypes(settings).param_dtype is None


def test_param_dtype_defaults():
    full = dict(master_weights=True)
    assert resolve_param_dtype(None, "bfloat16", **full) is None  # the default: float32 masters
    assert resolve_param_dtype("float32", "bfloat16", **full) is None  # the same, recorded alike
    assert resolve_param_dtype("bfloat16", "bfloat16", **full) == "bfloat16"
    assert resolve_param_dtype(None, "float32", **full) is None
    assert resolve_param_dtype("bfloat16", "bfloat16") is None  # LoRA or inference
    assert resolve_param_dtype("float32", "bfloat16") == "float32"
    with pytest.raises(ValueError, match="'float8' is not supported"):
        resolve_param_dtype("float8", "bfloat16")


def test_export_writes_the_base_dtype_from_float32_masters(tmp_path, tiny_qwen2_dir, one_device):
    base = tmp_path / "bf16_base"
    bf16 = load_pretrained(tiny_qwen2_dir, dtype="bfloat16")
    save_pretrained(bf16, base, tokenizer=tiny_qwen2_dir)
    samples = write_samples(tmp_path / "samples", base, n=3)
    run = tmp_path / "run"
    kw = dict(out=str(run), dtype="bfloat16", steps=2, learning_rate=1e-3, layer_stack="loop")
    train(_settings(samples, base, **kw), mesh=one_device)
    recorded = json.loads((run / "train_config.json").read_text())
    assert (recorded["dtype"], recorded["param_dtype"]) == ("bfloat16", None)  # float32 masters
    model = load_pretrained(base, param_dtype="float32", layer_stack="loop")
    masters = restore_params(run, nnx.state(model, nnx.Param))
    assert _float_dtypes(masters) == {"float32"}

    out = tmp_path / "export"
    assert main(["export", "--expert", str(base), "--lora", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    written = load_file(out / "model.safetensors")
    assert {str(x.dtype) for x in written.values()} == {"bfloat16"}
    kernel = masters["model"]["layers"][0]["mlp"]["up_proj"]["kernel"].get_value()
    expected = np.asarray(kernel).astype(ml_dtypes.bfloat16).T  # rounded once, from float32
    np.testing.assert_array_equal(written["model.layers.0.mlp.up_proj.weight"], expected)
    base_weights = load_file(base / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert np.mean(expected != base_weights) > 0.5  # the update survived the export


def test_save_pretrained_records_the_written_dtype(tmp_path, tiny_qwen2_dir):
    """config.json's dtype is the tensors' (the stored float32), not the compute dtype."""
    model = load_pretrained(tiny_qwen2_dir, dtype="bfloat16", param_dtype="float32")
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    assert {str(x.dtype) for x in load_file(tmp_path / "model.safetensors").values()} == {"float32"}


def test_random_init_stores_weights_in_the_parameter_dtype(tiny_qwen2_dir):
    """`--init random` with float32 masters under bf16 compute: float32 weights (not bf16)."""
    import dataclasses

    from w2s_jax.models import ModelConfig, init_random

    config = ModelConfig.from_hf_json(tiny_qwen2_dir / "config.json")
    config = dataclasses.replace(config, dtype="bfloat16", param_dtype="float32")
    model = init_random(config, seed=0)
    stored = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert stored == {jnp.dtype("float32")}
    assert model(jnp.ones((1, 4), jnp.int32)).dtype == jnp.float32  # float32 logits
