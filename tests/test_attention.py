"""Every attention implementation equals the reference path: module, whole model, generate."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_checkpoints import make_tiny_model, make_tiny_qwen3
from tolerances import decoder_bound

from w2s_jax.generate import generate
from w2s_jax.models import CausalLM, ConfigError, ModelConfig, load_pretrained
from w2s_jax.models import attention_kernels as kernels
from w2s_jax.models.attention import Attention
from w2s_jax.models.rope import rope_cos_sin

BACKEND = jax.default_backend()
SPLASH = pytest.mark.skipif(BACKEND == "gpu", reason="a TPU kernel (interpret mode on CPU)")
CUDNN = pytest.mark.skipif(BACKEND != "gpu", reason="cuDNN needs a GPU")
# Implementations compared with "reference" here: splash runs in Pallas interpret mode on CPU.
FUSED = ["xla", pytest.param("splash", marks=SPLASH), pytest.param("cudnn", marks=CUDNN)]
# (implementation, dtype) of the whole-model tests: cuDNN takes bf16/fp16 only.
MODEL_CASES = [
    ("xla", "float32"),
    ("xla", "bfloat16"),
    pytest.param("splash", "float32", marks=SPLASH),
    pytest.param("cudnn", "bfloat16", marks=CUDNN),
]
WIDTH = 128  # splash takes lengths that are multiples of 128
# float32: above the reordering bound of one attention layer, reordered_sum_bound(0.1,
# terms=128, reductions=3) = 5e-6 (scores over head_dim, softmax and values over <= 128
# keys, outputs below 0.1).
TOLERANCE = {"float32": dict(atol=2e-5, rtol=1e-5), "bfloat16": dict(atol=3e-2, rtol=3e-2)}


@pytest.fixture
def used(monkeypatch):
    """The fused implementations that ran (traced), in order."""
    calls = []
    real = kernels.fused_attention

    def spy(impl, *args):
        calls.append(impl)
        return real(impl, *args)

    monkeypatch.setattr(kernels, "fused_attention", spy)
    return calls


def runs(impl, dtype, t=WIDTH):
    """What `impl` runs as (cuDNN takes bf16/fp16 only: float32 falls back to xla)."""
    return kernels.choose(impl, backend=BACKEND, dtype=dtype, t=t, s=t, head_dim=16)


def tiny_config(heads, kv_heads, dtype="float32", attention="reference"):
    return ModelConfig(
        model_type="qwen2",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=16,
        qkv_bias=True,
        dtype=dtype,
        attention=attention,
    )


def attention_pair(impl, heads, kv_heads, dtype):
    """(reference module, `impl` module) with the same random parameters."""
    reference = Attention(tiny_config(heads, kv_heads, dtype), rngs=nnx.Rngs(0))
    other = Attention(tiny_config(heads, kv_heads, dtype, impl), rngs=nnx.Rngs(1))
    nnx.update(other, nnx.state(reference))
    return reference, other


def padding_mask(kind, b=3, t=WIDTH):
    """[B, T] int32: row 0 full, the others `kind`-padded (row 2 by most of the width)."""
    mask = np.ones((b, t), np.int32)
    for row, pad in ((1, 5), (2, t - 9)):
        if kind == "left":
            mask[row, :pad] = 0
        else:
            mask[row, t - pad :] = 0
    return mask


def causal_mask(mask_bt):
    t = mask_bt.shape[1]
    return jnp.tril(jnp.ones((t, t), bool))[None] & (jnp.asarray(mask_bt)[:, None, :] != 0)


def inputs(config, mask_bt, seed=0):
    """(x [B, T, D], cos, sin) with RoPE positions that skip the padding."""
    b, t = mask_bt.shape
    x_btd = jax.random.normal(jax.random.key(seed), (b, t, config.hidden_size), config.dtype)
    positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=-1) - 1, 0)
    return (x_btd, *rope_cos_sin(positions_bt, config, jnp.dtype(config.dtype)))


def assert_rows_equal(actual, expected, rows_bt, dtype):
    """Equal on the rows that attend to some key (the others are undefined padding)."""
    rows = np.asarray(rows_bt)
    np.testing.assert_allclose(
        np.asarray(actual, np.float32)[rows],
        np.asarray(expected, np.float32)[rows],
        **TOLERANCE[dtype],
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1)])
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("impl", FUSED)
def test_module_equals_reference_with_padding(impl, padding, heads, kv_heads, dtype, used):
    reference, other = attention_pair(impl, heads, kv_heads, dtype)
    mask_bt = padding_mask(padding)
    mask_bts = causal_mask(mask_bt)
    args = inputs(tiny_config(heads, kv_heads, dtype), mask_bt)
    expected, _ = reference(*args, mask_bts)
    actual, _ = other(*args, mask_bts)
    assert used == [runs(impl, dtype)] and actual.dtype == expected.dtype
    assert_rows_equal(actual, expected, mask_bts.any(-1), dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", FUSED)
def test_module_equals_reference_over_a_shared_prefix_cache(impl, dtype, used):
    """As `generate.prefill`: a prefix's keys/values in every row's cache, then each row's
    own left-padded tokens written after it and attending to it."""
    config = tiny_config(4, 2, dtype)
    reference, other = attention_pair(impl, 4, 2, dtype)
    n, own = WIDTH, WIDTH
    mask_bp = np.concatenate([np.ones((3, n), np.int32), padding_mask("left", t=own)], axis=1)
    x_bpd, cos_bpd, sin_bpd = inputs(config, mask_bp)
    mask_bps = causal_mask(mask_bp)
    outputs = []
    for module in (reference, other):
        empty = (jnp.zeros((3, 2, 16, n), config.dtype), jnp.zeros((3, 2, n, 16), config.dtype))
        prefix = (x_bpd[:, :n], cos_bpd[:, :n], sin_bpd[:, :n], mask_bps[:, :n, :n])
        _, cache = module(*prefix, empty, 0)
        (cache,) = CausalLM.extend_cache([cache], n + own)
        rows = (x_bpd[:, n:], cos_bpd[:, n:], sin_bpd[:, n:], mask_bps[:, n:])
        outputs.append(module(*rows, cache, n))
    (expected, expected_cache), (actual, actual_cache) = outputs
    assert used == [runs(impl, dtype)] * 2
    assert_rows_equal(actual, expected, mask_bps[:, n:].any(-1), dtype)
    for got, want in zip(actual_cache, expected_cache, strict=True):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_gradients_equal_reference(impl):
    """Training runs through the fused path too: equal input gradients."""
    config = tiny_config(4, 2)
    reference, other = attention_pair(impl, 4, 2, "float32")
    mask_bt = padding_mask("right")
    x_btd, cos_btd, sin_btd = inputs(config, mask_bt)
    mask_bts = causal_mask(mask_bt)
    weight_btd = jnp.asarray(mask_bt)[..., None] * jnp.linspace(-1, 1, config.hidden_size)

    def loss(module, x):
        return (module(x, cos_btd, sin_btd, mask_bts)[0] * weight_btd).sum()

    expected = jax.grad(loss, argnums=1)(reference, x_btd)
    actual = jax.grad(loss, argnums=1)(other, x_btd)
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-4)


def test_splash_takes_causal_padding_and_prefix_masks_and_refuses_others():
    """The run-time check that routes a mask to the splash kernel or to the fallback."""

    def matches(mask_bts):
        q_seg_bt, kv_seg_bs = mask_bts.any(axis=2), mask_bts.any(axis=1)
        return bool(kernels._splash_mask_matches(mask_bts, q_seg_bt, kv_seg_bs))

    for kind in ("left", "right"):
        assert matches(causal_mask(padding_mask(kind)))
    prefix_bp = np.concatenate([np.ones((3, 8), np.int32), padding_mask("left", t=8)], axis=1)
    assert matches(causal_mask(prefix_bp)[:, 8:])
    full_bts = jnp.ones((3, 16, 16), bool)  # bidirectional: not causal
    assert not matches(full_bts)
    top_left_bts = causal_mask(np.ones((3, 16), np.int32))[:, :8]  # causal from the wrong corner
    assert not matches(top_left_bts)
    holes_bts = causal_mask(padding_mask("left", t=16)).at[0, 10, 3].set(False)
    assert not matches(holes_bts)


def test_splash_falls_back_on_other_masks_without_changing_results():
    reference, other = attention_pair("splash", 4, 2, "float32")
    config = tiny_config(4, 2)
    mask_bt = padding_mask("left")
    keep_bts = jax.random.bernoulli(jax.random.key(3), 0.7, (3, WIDTH, WIDTH))
    mask_bts = causal_mask(mask_bt) & (keep_bts | jnp.eye(WIDTH, dtype=bool))
    args = inputs(config, mask_bt)
    expected, _ = reference(*args, mask_bts)
    actual, _ = other(*args, mask_bts)
    assert_rows_equal(actual, expected, mask_bts.any(-1), "float32")


def test_choose_auto_rule_and_fallbacks(caplog):
    shape = dict(t=256, s=256, head_dim=128)
    assert kernels.choose("auto", backend="cpu", dtype=jnp.float32, **shape) == "reference"
    assert kernels.choose("auto", backend="gpu", dtype=jnp.bfloat16, **shape) == "cudnn"
    assert kernels.choose("auto", backend="gpu", dtype=jnp.float32, **shape) == "xla"
    gpu_odd = dict(shape, t=255)
    assert kernels.choose("auto", backend="gpu", dtype=jnp.bfloat16, **gpu_odd) == "xla"
    decode = dict(shape, t=1)
    for backend in ("cpu", "gpu", "tpu"):
        assert kernels.choose("auto", backend=backend, dtype=jnp.bfloat16, **decode) == "reference"
    assert kernels.choose("xla", backend="cpu", dtype=jnp.float32, **decode) == "reference"
    assert kernels.choose("xla", backend="cpu", dtype=jnp.float32, **shape) == "xla"
    assert kernels.choose("splash", backend="cpu", dtype=jnp.float32, **shape) == "splash"
    with caplog.at_level(logging.WARNING):
        short = dict(shape, t=100)
        assert kernels.choose("splash", backend="cpu", dtype=jnp.float32, **short) == "xla"
    assert "multiples of 128" in caplog.text
    with pytest.raises(ConfigError, match="'cudnn' does not run on the cpu backend"):
        kernels.choose("cudnn", backend="cpu", dtype=jnp.bfloat16, **shape)


def test_bad_value_is_a_config_error_naming_it(tiny_qwen2_dir):
    with pytest.raises(ConfigError, match="'flash'"):
        load_pretrained(tiny_qwen2_dir, attention="flash")
    with pytest.raises(ConfigError, match="'Splash'"):
        tiny_config(4, 2, attention="Splash")


# --- Whole tiny models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_qwen2_dir):
    root = tmp_path_factory.mktemp("attention_models")
    make_tiny_model(root / "llama", family="llama", initializer_range=0.2, seed=3)
    make_tiny_qwen3(root / "qwen3")
    return {"qwen2": tiny_qwen2_dir, "llama": root / "llama", "qwen3": root / "qwen3"}


def padded_ids(b=3, t=WIDTH, seed=0):
    """(ids, mask): row 1 left-padded, row 2 right-padded."""
    ids = np.random.default_rng(seed).integers(3, 300, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, :40] = 0
    mask[2, t - 50 :] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("impl,dtype", MODEL_CASES)
def test_model_logits_equal_reference(folders, family, impl, dtype, used):
    ids, mask = padded_ids()
    expected = load_pretrained(folders[family], dtype=dtype, attention="reference")(ids, mask)
    assert not used
    actual = load_pretrained(folders[family], dtype=dtype, attention=impl)(ids, mask)
    assert used == [impl, impl]  # both layers
    assert_logits_close(actual, expected, mask, dtype)


@pytest.mark.parametrize("impl", FUSED[:2])
def test_fused_attention_in_the_scanned_layer_stack(folders, impl, used):
    ids, mask = padded_ids()
    expected = load_pretrained(folders["qwen3"], attention="reference")(ids, mask)
    actual = load_pretrained(folders["qwen3"], attention=impl, layer_stack="scan")(ids, mask)
    assert used == [impl]  # traced once for all layers
    assert_logits_close(actual, expected, mask, "float32")


def assert_logits_close(actual, expected, mask, dtype):
    """float32: equal to float rounding (the 2-layer models' reordering bound); bf16: max
    error < 0.25, mean < 0.02 on real tokens (logits span about +-7)."""
    error = np.abs(np.asarray(actual) - np.asarray(expected))[mask == 1]
    if dtype == "float32":
        real = np.asarray(expected)[mask == 1]
        width = mask.shape[-1]
        assert error.max() < decoder_bound(
            real, layers=2, hidden=64, intermediate=128, positions=width
        )
    else:
        assert error.max() < 0.25 and error.mean() < 0.02


def prompts(prefix_len, own_lengths, seed=0):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(3, 300, prefix_len).tolist()
    return [prefix + rng.integers(3, 300, n).tolist() for n in own_lengths]


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_xla_generate_equals_reference(folders, family, share_prefix):
    batch = prompts(7, [3, 11, 30])
    run = dict(max_new_tokens=12, eos_ids=[2], share_prefix=share_prefix)
    expected = generate(load_pretrained(folders[family], attention="reference"), batch, **run)
    actual = generate(load_pretrained(folders[family], attention="xla"), batch, **run)
    np.testing.assert_array_equal(actual.tokens, expected.tokens)
    np.testing.assert_array_equal(actual.lengths, expected.lengths)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_splash_generate_equals_reference(folders, family, caplog, monkeypatch):
    """A 128-token shared prefix and rows of 128 columns: both prefills fit the kernel."""
    monkeypatch.setattr(kernels, "_warned", set())
    batch = prompts(WIDTH, [4, 60, 100])
    run = dict(max_new_tokens=8, eos_ids=[2], pad_to_multiple=WIDTH)
    expected = generate(load_pretrained(folders[family], attention="reference"), batch, **run)
    with caplog.at_level(logging.WARNING):
        actual = generate(load_pretrained(folders[family], attention="splash"), batch, **run)
    assert "splash" not in caplog.text  # no fallback
    np.testing.assert_array_equal(actual.tokens, expected.tokens)
