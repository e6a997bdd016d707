"""Flax NNX ports of Qwen2/Qwen2.5, Llama 3 and Qwen3 with Hugging Face checkpoint I/O."""

from w2s_jax.models.config import ConfigError, ModelConfig
from w2s_jax.models.decoder import CausalLM, default_positions
from w2s_jax.models.hf_io import init_random, load_pretrained, load_tokenizer, save_pretrained
from w2s_jax.models.safetensors_io import CheckpointError

__all__ = [
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "ModelConfig",
    "default_positions",
    "init_random",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
]
