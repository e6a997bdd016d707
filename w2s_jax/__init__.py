"""w2s_jax: weak-to-strong training of language models in JAX/Flax."""

__version__ = "0.1.0"
