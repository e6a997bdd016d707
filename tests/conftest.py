"""Test-wide set-up: 8 simulated CPU devices, set before JAX is imported."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("W2S_JAX_CACHE_DIR", tempfile.mkdtemp(prefix="w2s_jax_test_cache_"))


# --- Shared tiny checkpoints (built once per test worker, offline) ---------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A trained byte-level BPE tokenizer folder with a chat template."""
    from tiny_checkpoints import make_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tiny_tokenizer_dir):
    """Tiny random Qwen2 (tied embeddings, q/k/v biases, padded vocab) with tokenizer."""
    from tiny_checkpoints import make_tiny_model

    folder = tmp_path_factory.mktemp("tiny_qwen2")
    make_tiny_model(folder, tokenizer_folder=tiny_tokenizer_dir, initializer_range=0.2, seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen2_amateur_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A smaller, differently seeded Qwen2 sharing the expert's tokenizer."""
    from tiny_checkpoints import make_tiny_model

    folder = tmp_path_factory.mktemp("tiny_qwen2_amateur")
    make_tiny_model(
        folder,
        tokenizer_folder=tiny_tokenizer_dir,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        initializer_range=0.2,
        seed=1,
    )
    return folder
