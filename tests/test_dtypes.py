"""`--dtype auto` resolves per backend, and half precision on the CPU warns once."""

import logging

import pytest

from w2s_jax.models import ConfigError, dtypes, load_pretrained


@pytest.mark.parametrize(
    ("backend", "expected"), [("cpu", "float32"), ("gpu", "bfloat16"), ("tpu", "bfloat16")]
)
def test_auto_resolves_per_backend(backend, expected):
    assert dtypes.resolve_dtype("auto", backend) == expected


def test_explicit_names_are_kept_and_checked():
    assert dtypes.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert dtypes.resolve_dtype(None) is None  # the checkpoint's own dtype
    with pytest.raises(ConfigError, match="'fp8' is not supported.*auto, float32"):
        dtypes.resolve_dtype("fp8")


def test_dtype_objects_stand_for_their_names(tiny_qwen2_dir):
    import jax.numpy as jnp
    import numpy as np

    for given in (jnp.float32, np.float32, np.dtype("float32"), jnp.dtype("float32")):
        assert dtypes.resolve_dtype(given) == "float32"
    assert dtypes.resolve_dtype(jnp.bfloat16) == "bfloat16"
    assert dtypes.resolve_dtype(np.float16) == "float16"
    with pytest.raises(ConfigError, match="'int8' is not supported"):
        dtypes.resolve_dtype(jnp.int8)
    model = load_pretrained(tiny_qwen2_dir, dtype=jnp.float32)  # as JAX users write it
    assert model.config.dtype == "float32"
    assert model.model.embed_tokens.embedding[...].dtype == jnp.float32


def test_auto_loads_float32_on_this_cpu(tiny_qwen2_dir):
    model = load_pretrained(tiny_qwen2_dir, dtype="auto")
    assert model.config.dtype == "float32"
    assert model.model.embed_tokens.embedding[...].dtype == "float32"


def test_half_precision_on_cpu_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(dtypes, "_warned", False)
    with caplog.at_level(logging.WARNING, logger=dtypes.__name__):
        dtypes.warn_if_slow("float32", "cpu")
        dtypes.warn_if_slow("bfloat16", "gpu")
        assert not caplog.records
        dtypes.warn_if_slow("bfloat16", "cpu")
        dtypes.warn_if_slow("bfloat16", "cpu")
    assert len(caplog.records) == 1
    assert "float32 copy" in caplog.text and "--dtype auto" in caplog.text
