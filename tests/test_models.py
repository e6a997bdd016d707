"""NNX ports vs Hugging Face PyTorch on tiny random checkpoints: logits, export, mesh, errors."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_checkpoints import make_tiny_model, make_tiny_qwen3
from tolerances import decoder_bound, reordered_sum_bound
from transformers import AutoModelForCausalLM

from w2s_jax import sharding
from w2s_jax.models import (
    CheckpointError,
    ConfigError,
    ModelConfig,
    init_random,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
)
from w2s_jax.models.safetensors_io import SafetensorsFolder, write_safetensors

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_qwen2_dir):
    """name -> (folder, HF float32 model)."""
    root = tmp_path_factory.mktemp("models")
    out = {"qwen2_tied": (tiny_qwen2_dir, AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir))}
    out["qwen2_untied"] = (
        root / "qwen2_untied",
        make_tiny_model(root / "qwen2_untied", tie_word_embeddings=False, initializer_range=0.2),
    )
    out["llama3"] = (
        root / "llama3",
        make_tiny_model(
            root / "llama3",
            family="llama",
            tie_word_embeddings=False,
            rope_parameters=LLAMA3_ROPE,
            initializer_range=0.2,
            seed=3,
        ),
    )
    out["qwen3"] = (root / "qwen3", make_tiny_qwen3(root / "qwen3"))
    return out


def padded_batch(seed=0, vocab=320):
    """Left-padded ids/mask [3, 12] and HF position ids (count of real tokens - 1)."""
    ids = np.random.RandomState(seed).randint(0, vocab, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, :4] = 0
    mask[2, :9] = 0
    ids[mask == 0] = 0
    return ids, mask, np.maximum(mask.cumsum(-1) - 1, 0)


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def forward(model, ids, mask=None):
    """Jitted model(ids, mask) as numpy (eager op-by-op dispatch is slow on a mesh)."""
    return np.asarray(_forward(model, ids, np.ones_like(ids) if mask is None else mask))


def logits_bound(logits, positions=12):
    """Float32 reordering bound for logits of the tiny 2-layer decoders (hidden 64,
    intermediate 128; heads * head_dim <= 96), e.g. transformers vs w2s_jax."""
    return decoder_bound(logits, layers=2, hidden=64, intermediate=128, positions=positions)


def hf_logits(hf_model, ids, mask, positions):
    with torch.no_grad():
        return (
            hf_model(
                torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions),
            )
            .logits.float()
            .numpy()
        )


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen2_untied", "llama3", "qwen3"])
def test_float32_logits_match_hf_on_padded_batch(checkpoints, name):
    folder, hf_model = checkpoints[name]
    ids, mask, positions = padded_batch()
    ref = hf_logits(hf_model, ids, mask, positions)
    model = load_pretrained(folder)
    logits, explicit, via_head = (np.asarray(x) for x in _three_ways(model, ids, mask, positions))
    assert logits.dtype == np.float32 and logits.shape == (3, 12, 320)
    real = mask == 1
    # A wrong RoPE (theta off by 1%) moves these logits by 9e-3 to 3e-2, ignoring llama3's
    # rope scaling by 2.6; both stay above the bound (~2e-3).
    np.testing.assert_allclose(logits[real], ref[real], atol=logits_bound(ref[real]), rtol=0)
    assert model.config.rms_norm_eps == hf_model.config.rms_norm_eps  # its effect is below it
    # explicit positions equal the mask-derived default (the same sums)
    np.testing.assert_allclose(explicit[real], logits[real], atol=1e-6, rtol=0)
    # hidden states @ head are the logits: the head's sum over hidden 64, maybe reordered
    head_bound = reordered_sum_bound(logits, terms=64)
    np.testing.assert_allclose(via_head, logits, atol=head_bound, rtol=0)


@nnx.jit
def _three_ways(model, ids, mask, positions):
    return (
        model(ids, mask),
        model(ids, mask, positions_bt=positions),
        model.hidden_states(ids, mask) @ model.lm_head_kernel(),
    )


def test_features_are_exercised(checkpoints):
    """The parity tests above cover biases, untied heads, llama3 scaling and q/k norms."""
    configs = {name: load_pretrained(folder).config for name, (folder, _) in checkpoints.items()}
    assert configs["qwen2_tied"].qkv_bias and configs["qwen2_tied"].tie_word_embeddings
    assert not configs["qwen2_untied"].tie_word_embeddings
    assert configs["llama3"].rope_type == "llama3" and not configs["llama3"].qkv_bias
    assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim == 24
    hf_biases = checkpoints["qwen2_tied"][1].model.layers[0].self_attn.q_proj.bias
    assert hf_biases.abs().max() > 0.1  # random, not the zero init


def test_left_padding_does_not_change_a_row(checkpoints):
    folder, _ = checkpoints["llama3"]
    model = load_pretrained(folder)
    ids, mask, _ = padded_batch()
    alone = forward(model, ids[2:, 9:])
    batched = forward(model, ids, mask)
    # padded batch: the same sums in other shapes; attending to a pad moves logits by O(1)
    np.testing.assert_allclose(batched[2, 9:], alone[0], atol=logits_bound(alone), rtol=0)


def test_bfloat16_logits_close_to_float32(checkpoints):
    """bf16 params and compute: max |error| < 0.4 and mean < 0.04 against the float32
    reference (logits span about +-7), and within 1.5x of HF's own bf16 error."""
    folder, hf_model = checkpoints["qwen2_untied"]
    ids, mask, positions = padded_batch()
    real = mask == 1
    ref32 = hf_logits(hf_model, ids, mask, positions)
    hf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    hf_error = np.abs(hf_logits(hf16, ids, mask, positions) - ref32)[real]
    model = load_pretrained(folder, dtype="bfloat16")
    assert model.model.layers[0].mlp.up_proj.kernel[...].dtype == jax.numpy.bfloat16
    logits = forward(model, ids, mask)
    assert logits.dtype == np.float32
    error = np.abs(logits - ref32)[real]
    assert error.max() < 0.4 and error.mean() < 0.04
    assert error.max() < 1.5 * hf_error.max() and error.mean() < 1.5 * hf_error.mean()


@pytest.mark.parametrize("name", ["qwen2_tied", "llama3"])
def test_export_round_trip_through_transformers(checkpoints, tmp_path, name):
    folder, hf_model = checkpoints[name]
    model = load_pretrained(folder)
    out = tmp_path / "export"
    save_pretrained(model, out, tokenizer=checkpoints["qwen2_tied"][0])
    reloaded_hf = AutoModelForCausalLM.from_pretrained(out)
    ids, mask, positions = padded_batch(seed=1)
    np.testing.assert_allclose(
        hf_logits(reloaded_hf, ids, mask, positions),
        hf_logits(hf_model, ids, mask, positions),
        atol=1e-6,
        rtol=0,
    )
    assert load_pretrained(out).config == model.config
    assert load_tokenizer(out).eos_token == "<|im_end|>"


def test_sharded_export_and_bfloat16_export(checkpoints, tmp_path):
    folder, _ = checkpoints["qwen2_untied"]
    model = load_pretrained(folder)
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids, mask, _ = padded_batch(seed=2)
    np.testing.assert_array_equal(
        forward(load_pretrained(tmp_path / "sharded"), ids, mask), forward(model, ids, mask)
    )
    save_pretrained(load_pretrained(folder, dtype="bfloat16"), tmp_path / "bf16")
    hf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert hf16.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("spec", ["fsdp=2,tensor=4", "data=2,tensor=4"])
def test_mesh_load_matches_single_device(checkpoints, spec):
    folder, _ = checkpoints["qwen2_untied"]
    ids, mask, _ = padded_batch()
    single = forward(load_pretrained(folder), ids, mask)
    mesh = sharding.make_mesh(spec)
    assert dict(mesh.shape) == {
        "data": 2 if "data" in spec else 1,
        "fsdp": 2 - ("data" in spec),
        "tensor": 4,
    }
    model = load_pretrained(folder, mesh=mesh)
    up = model.model.layers[0].mlp.up_proj.kernel[...]
    assert up.sharding.spec == sharding.spec_for("mlp/up_proj/kernel", up.shape, mesh)
    assert len(up.addressable_shards) == 8 and up.addressable_shards[0].data.shape[1] == 128 // 4
    np.testing.assert_allclose(forward(model, ids, mask), single, atol=logits_bound(single), rtol=0)


def test_make_mesh_specs_and_errors():
    assert dict(sharding.make_mesh(None).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.make_mesh("auto").shape)["data"] == 8
    assert dict(sharding.make_mesh("tensor=2,fsdp=-1").shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    for bad in ["data=3", "model=8", "data=two", "data=-1,fsdp=-1", "data"]:
        with pytest.raises(ValueError, match="mesh spec"):
            sharding.make_mesh(bad)


def test_spec_for_drops_axes_that_do_not_divide():
    mesh = sharding.make_mesh("fsdp=2,tensor=4")
    assert sharding.spec_for("model/embed_tokens/embedding", (320, 64), mesh) == sharding.P(
        "tensor", "fsdp"
    )
    assert sharding.spec_for("model/layers/0/self_attn/k_proj/kernel", (64, 6), mesh) == sharding.P(
        "fsdp"
    )
    assert sharding.spec_for("model/norm/weight", (64,), mesh) == sharding.P()


def test_config_reads_transformers_4_and_5_layouts(checkpoints):
    v5 = json.loads((checkpoints["llama3"][0] / "config.json").read_text())
    assert "rope_parameters" in v5
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    rope = dict(v5["rope_parameters"])
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    v4["torch_dtype"] = v4.pop("dtype")
    a, b = ModelConfig.from_hf_json(v5), ModelConfig.from_hf_json(v4)
    assert (a.rope_type, a.rope_theta, a.rope_factor) == ("llama3", 500000.0, 8.0)
    assert a.rope_original_max_position_embeddings == 64
    fields = lambda c: {k: v for k, v in c.__dict__.items() if k != "extra"}
    assert fields(a) == fields(b)
    assert ModelConfig.from_hf_json(a.to_hf_dict()) == a
    assert a.num_params == sum(p.numel() for p in checkpoints["llama3"][1].parameters())


def test_init_random_is_seeded_and_shardable():
    config = ModelConfig.from_hf_json(
        {
            "model_type": "qwen2",
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    ids = np.arange(10)[None] % 64
    a = forward(init_random(config, seed=0), ids)
    np.testing.assert_array_equal(forward(init_random(config, seed=0), ids), a)
    assert not np.allclose(forward(init_random(config, seed=1), ids), a)
    mesh = sharding.make_mesh("tensor=8")
    b = init_random(config, seed=0, mesh=mesh, dtype="bfloat16")
    kernel = b.model.layers[0].mlp.up_proj.kernel[...]
    assert kernel.dtype == jax.numpy.bfloat16 and kernel.sharding.spec == sharding.P(None, "tensor")
    np.testing.assert_allclose(forward(b, ids), a, atol=0.05)


# --- bad input ----------------------------------------------------------------


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(folder, edit):
    """Rewrite model.safetensors with edit(dict key -> array) applied."""
    tensors = SafetensorsFolder(folder)
    arrays = {k: np.array(tensors.get(k)) for k in tensors.entries}
    del tensors
    arrays = edit(arrays)
    specs = [(k, a.shape, a.dtype) for k, a in arrays.items()]
    write_safetensors(folder / "model.safetensors", specs, arrays.__getitem__)


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_missing_tensor_and_wrong_shape_name_the_key(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["qwen2_untied"][0], tmp_path / "missing")
    rewrite_tensors(folder, lambda a: {k: v for k, v in a.items() if k != "lm_head.weight"})
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight'.*missing"):
        load_pretrained(folder)

    folder = copy_checkpoint(checkpoints["qwen2_untied"][0], tmp_path / "shape")
    key = "model.layers.1.mlp.up_proj.weight"
    rewrite_tensors(folder, lambda a: {**a, key: a[key][:100]})
    with pytest.raises(CheckpointError, match=r"up_proj\.weight'.*\[100, 64\].*\[128, 64\]"):
        load_pretrained(folder)

    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no .*safetensors"):
        load_pretrained(folder)


def test_unused_tensors_are_an_error_unless_allowed(checkpoints, tmp_path, caplog):
    folder = copy_checkpoint(checkpoints["qwen2_untied"][0], tmp_path / "extra")
    rewrite_tensors(folder, lambda a: {**a, "model.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"1 checkpoint tensor\(s\) not used .*model.extra"):
        load_pretrained(folder)
    with caplog.at_level(logging.WARNING):
        load_pretrained(folder, allow_unused=True)
    assert "model.extra.weight" in caplog.text and "not used" in caplog.text


def test_a_truncated_config_is_refused_naming_the_dropped_layers(checkpoints, tmp_path):
    folder = copy_checkpoint(checkpoints["qwen2_untied"][0], tmp_path / "truncated")
    config = json.loads((folder / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config["num_hidden_layers"] = layers - 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"model\.layers\.{layers - 1}\."):
        load_pretrained(folder)
    assert len(load_pretrained(folder, allow_unused=True).model.layers) == layers - 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"architectures": ["Qwen2ForSequenceClassification"]}, "not a causal LM"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding-window"),
        (
            {
                "use_sliding_window": True,
                "sliding_window": 8,
                "max_window_layers": 1,
                "layer_types": None,
            },
            "sliding-window",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            "rope_type 'yarn'",
        ),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "needs field 'factor'"),
        ({"dtype": "int8"}, "dtype 'int8'"),
        ({"hidden_size": None}, None),
    ],
)
def test_unsupported_config_names_the_field(checkpoints, tmp_path, change, message):
    folder = copy_checkpoint(checkpoints["qwen2_tied"][0], tmp_path / "bad")
    raw = json.loads((folder / "config.json").read_text())
    raw.update(change)
    if change == {"hidden_size": None}:
        del raw["hidden_size"]
        message = "required field 'hidden_size' is missing"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=str(folder / "config.json")) as info:
        load_pretrained(folder)
    assert message in str(info.value)


def test_export_refuses_parameters_without_a_hf_name(checkpoints, tmp_path):
    model = load_pretrained(checkpoints["qwen2_untied"][0])
    model.model.layers[0].self_attn.q_proj.lora_a = nnx.Param(np.zeros((64, 2), np.float32))
    with pytest.raises(CheckpointError, match="lora_a.*merge LoRA"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()
