"""Scanned layer stack vs the per-layer loop: same logits, generations, gradients, files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from tiny_checkpoints import make_tiny_model, make_tiny_qwen3
from tolerances import decoder_bound, reordered_sum_bound

from w2s_jax.checkpointing import TrainCheckpoints
from w2s_jax.files import NonFiniteError
from w2s_jax.generate import generate
from w2s_jax.lora import LoRAConfig, apply_lora, load_lora_into, merge_lora
from w2s_jax.models import load_pretrained, save_pretrained
from w2s_jax.models.safetensors_io import SafetensorsFolder, write_safetensors
from w2s_jax.models.stacking import AUTO_LAYER_STACK, resolve_layer_stack, stack_layers
from w2s_jax.sharding import make_mesh, spec_for

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 64], [0, 0, 10, 11, 12, 13, 14, 15]], np.int32)
MASK = (np.arange(8)[None] >= np.array([[0], [2]])).astype(np.int32)
TARGETS = np.roll(IDS, -1, axis=1)
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_qwen2_dir):
    root = tmp_path_factory.mktemp("stack")
    make_tiny_model(root / "llama", family="llama", num_layers=3, initializer_range=0.2, seed=3)
    make_tiny_qwen3(root / "qwen3", seed=4)
    return {"qwen2": tiny_qwen2_dir, "llama": root / "llama", "qwen3": root / "qwen3"}


def both(folder, **kwargs):
    """(loop model, scan model) of one checkpoint."""
    return tuple(
        load_pretrained(folder, dtype="float32", layer_stack=s, **kwargs) for s in ("loop", "scan")
    )


def flat(state) -> dict:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def assert_states_close(loop_state, scan_state, bound=None):
    """The loop's state, stacked, equals the scan's (same paths): exactly, or within
    bound(expected array) where the two computed it in another order."""
    expected, actual = flat(stack_layers(loop_state)), flat(scan_state)
    assert expected.keys() == actual.keys()
    for name, want in expected.items():
        atol = 0 if bound is None else bound(want)
        np.testing.assert_allclose(actual[name], want, rtol=0, atol=atol, err_msg=name)


def logits_bound(model, logits):
    """Float32 reordering bound for logits of IDS (8 positions) through the tiny decoders."""
    layers = model.config.num_hidden_layers
    return decoder_bound(logits, layers=layers, hidden=64, intermediate=128, positions=8)


def gradient_bound(model):
    """Float32 reordering bound for a gradient array of `loss`: the forward and backward
    passes through the decoder (2 * (9 * layers + 2) reductions), the log-softmax over
    V = 320 and the mean over positions; V is the longest reduction. Per array, as a
    gradient's rounding errors are relative to its own scale."""
    reductions = 2 * (9 * model.config.num_hidden_layers + 2) + 2
    return lambda grad: reordered_sum_bound(grad, terms=320, reductions=reductions)


def loss(model):
    logp = jax.nn.log_softmax(model(IDS, MASK))
    return -jnp.mean(jnp.take_along_axis(logp, TARGETS[..., None], -1)[..., 0] * MASK)


def gradients(model, what):
    graphdef, params, rest = nnx.split(model, what, ...)
    return jax.jit(jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest))))(params)


def randomize_adapters(loop, scan):
    """Equal random non-zero adapters in both layouts (B starts at zero)."""
    state = nnx.state(loop, nnx.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    nnx.update(loop, jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), state))
    nnx.update(scan, stack_layers(nnx.state(loop, nnx.LoRAParam)))


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_logits_and_greedy_generations_equal(folders, family):
    loop, scan = both(folders[family])
    assert not loop.stacked and scan.stacked
    assert scan.model.layers.mlp.up_proj.kernel.shape[0] == loop.config.num_hidden_layers
    expected = np.asarray(loop(IDS, MASK))
    # scanning reorders float32 sums; a layer applied twice or skipped moves logits by O(1)
    np.testing.assert_allclose(scan(IDS, MASK), expected, rtol=0, atol=logits_bound(loop, expected))
    prompts = [[1, 7, 9, 11, 30], [1, 7, 9, 40, 41, 42, 43, 44, 45], [1, 7, 9, 12]]
    runs = [
        generate(m, prompts, max_new_tokens=10, eos_ids=[2], pad_to_multiple=4, prefill_groups=2)
        for m in (loop, scan)
    ]
    np.testing.assert_array_equal(runs[1].tokens, runs[0].tokens)
    np.testing.assert_array_equal(runs[1].lengths, runs[0].lengths)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_full_and_lora_gradients_equal(folders, family):
    loop, scan = both(folders[family])
    bound = gradient_bound(loop)
    assert_states_close(gradients(loop, nnx.Param), gradients(scan, nnx.Param), bound)
    apply_lora(loop, LORA, seed=5)
    apply_lora(scan, LORA, seed=5)
    # the stacked adapters are drawn as the per-layer ones: both layouts start equal
    assert_states_close(nnx.state(loop, nnx.LoRAParam), nnx.state(scan, nnx.LoRAParam))
    randomize_adapters(loop, scan)
    grads = [gradients(m, nnx.LoRAParam) for m in (loop, scan)]
    assert max(np.abs(x).max() for x in jax.tree.leaves(grads[1])) > 1e-4
    assert_states_close(*grads, bound)


def test_save_in_either_layout_reload_in_the_other(folders, tmp_path):
    loop, scan = both(folders["llama"])
    original = SafetensorsFolder(folders["llama"])
    for model, name in ((loop, "from_loop"), (scan, "from_scan")):
        save_pretrained(model, tmp_path / name)
        written = SafetensorsFolder(tmp_path / name)
        assert written.entries.keys() == original.entries.keys()
        for key in original.entries:
            np.testing.assert_array_equal(written.get(key), original.get(key), err_msg=key)
    reloaded = load_pretrained(tmp_path / "from_scan", dtype="float32", layer_stack="loop")
    assert_states_close(nnx.state(reloaded), nnx.state(scan))
    reloaded = load_pretrained(tmp_path / "from_loop", dtype="float32", layer_stack="scan")
    assert_states_close(nnx.state(loop), nnx.state(reloaded))


@pytest.mark.parametrize("saved_by", ["loop", "scan"])
def test_lora_checkpoint_restores_into_the_other_layout(folders, tmp_path, saved_by):
    loop, scan = both(folders["qwen2"])
    apply_lora(loop, LORA, seed=0)
    apply_lora(scan, LORA, seed=0)
    randomize_adapters(loop, scan)
    writer = loop if saved_by == "loop" else scan
    params = nnx.state(writer, nnx.LoRAParam)
    checkpoints = TrainCheckpoints(tmp_path, save_every=1, keep=1)
    checkpoints.save(3, params, {"mu": params}, {"lora": LORA.to_dict()}, force=True)
    checkpoints.close()
    expected = np.asarray(loop(IDS, MASK))
    reader = load_pretrained(
        folders["qwen2"], dtype="float32", layer_stack="scan" if saved_by == "loop" else "loop"
    )
    load_lora_into(reader, tmp_path)
    bound = logits_bound(reader, expected)  # adapters in the wrong layers: O(1) off
    np.testing.assert_allclose(reader(IDS, MASK), expected, rtol=0, atol=bound)
    merge_lora(reader)  # stacked adapters fold into stacked kernels too
    np.testing.assert_allclose(reader(IDS, MASK), expected, rtol=0, atol=bound)


def test_stacked_parameters_keep_the_layer_axis_unsharded(folders):
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    assert spec_for("model/layers/mlp/up_proj/kernel", (3, 64, 128), mesh) == P(
        None, "fsdp", "tensor"
    )
    assert spec_for("model/layers/2/mlp/up_proj/kernel", (64, 128), mesh) == P("fsdp", "tensor")
    loop = load_pretrained(folders["llama"], dtype="float32")
    scan = load_pretrained(folders["llama"], dtype="float32", mesh=mesh, layer_stack="scan")
    kernel = scan.model.layers.self_attn.o_proj.kernel.get_value()
    assert kernel.sharding.spec == P(None, "tensor", "fsdp")
    expected = np.asarray(loop(IDS, MASK))
    np.testing.assert_allclose(scan(IDS, MASK), expected, rtol=0, atol=logits_bound(loop, expected))


def test_nonfinite_weight_is_named_by_layer(folders, tmp_path):
    source = SafetensorsFolder(folders["llama"])
    tensors = {key: np.array(source.get(key)) for key in source.entries}
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = np.nan
    specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    write_safetensors(tmp_path / "model.safetensors", specs, tensors.__getitem__)
    (tmp_path / "config.json").write_bytes((folders["llama"] / "config.json").read_bytes())
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj\.weight$"):
        load_pretrained(tmp_path, dtype="float32", layer_stack="scan")


def test_auto_layer_stack_follows_the_backend_rule():
    for backend, (layout, reason) in AUTO_LAYER_STACK.items():
        assert resolve_layer_stack("auto", backend) == layout and reason
    assert resolve_layer_stack("loop", "tpu") == "loop"
    assert resolve_layer_stack("scan", "cpu") == "scan"
