"""One Flax NNX decoder for Qwen2/Qwen2.5, Llama 3 and Qwen3 (q/k norms).

Attribute names mirror Hugging Face (`model.embed_tokens`, `model.layers[i].self_attn.q_proj`,
`.mlp.gate_proj`, `model.norm`, `lm_head`), projections are `nnx.Linear` with kernels
[in, out], so LoRA and the weight table can address them by name.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from w2s_jax.models.attention import Attention, LayerCache
from w2s_jax.models.config import ModelConfig
from w2s_jax.models.primitives import RMSNorm
from w2s_jax.models.primitives import linear as _linear
from w2s_jax.models.rope import rope_cos_sin
from w2s_jax.models.stacking import resolve_layer_stack, run_loop, run_scan, stacked_module
from w2s_jax.sharding import constrain

# Logical axes of the residual stream (`sharding.ACTIVATION_RULES`).
RESIDUAL = ("batch", "length", "embed")


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.gate_proj = _linear(c, rngs, c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.up_proj = _linear(c, rngs, c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.down_proj = _linear(c, rngs, c.intermediate_size, c.hidden_size, c.mlp_bias)

    def __call__(self, x):
        hidden = constrain(
            jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), ("batch", "length", "mlp")
        )
        return self.down_proj(hidden)


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        norm = partial(RMSNorm, config.hidden_size, eps=config.rms_norm_eps)
        self.input_layernorm = norm(dtype=jnp.dtype(config.weights_dtype))
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = norm(dtype=jnp.dtype(config.weights_dtype))
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x_btd, cos_btd, sin_btd, mask_bts, cache=None, cache_index=None):
        attn_btd, cache = self.self_attn(
            self.input_layernorm(x_btd), cos_btd, sin_btd, mask_bts, cache, cache_index
        )
        x_btd = x_btd + attn_btd
        x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd))
        return constrain(x_btd, RESIDUAL), cache


class DecoderModel(nnx.Module):
    """The HF `model` sub-module: embeddings, layers, final norm.

    `layers` is an `nnx.List` of `DecoderLayer`s (`stacked` False), or one `DecoderLayer`
    whose parameters have a leading layer axis [L, ...] (`stacked` True, run by a scan).
    """

    def __init__(self, config: ModelConfig, *, stacked: bool, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.weights_dtype)
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            dtype=jnp.dtype(config.dtype),
            param_dtype=dtype,
            embedding_init=nnx.initializers.normal(config.initializer_range),
            rngs=rngs,
        )
        layer = partial(DecoderLayer, config)
        if stacked:
            self.layers = stacked_module(lambda r: layer(rngs=r), config.num_hidden_layers, rngs)
        else:
            self.layers = nnx.List([layer(rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)


def default_positions(attention_mask_bt: jax.Array) -> jax.Array:
    """RoPE positions cumsum(mask) - 1 (0 on padding), right for left-padded rows."""
    mask = attention_mask_bt.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


class CausalLM(nnx.Module):
    """Decoder-only causal LM. Call it for logits; see `hidden_states` and `lm_head_matrix`.

    `token_count` is the number of real token ids (default: every output row).
    Checkpoints often pad their vocabulary beyond the tokenizer (Qwen: 151,936 rows for
    151,665 tokens); after `restrict_vocab(len(tokenizer))` the logits of the padded
    ids are -inf, so they are never generated, never a target and add nothing to a KL.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.token_count = config.vocab_size
        # config.layer_stack ("auto" resolved for the backend), config.remat: see stacking.py
        self.stacked = resolve_layer_stack(config.layer_stack) == "scan"
        self.model = DecoderModel(config, stacked=self.stacked, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _linear(config, rngs, config.hidden_size, config.vocab_size, False)
        )

    def __call__(self, input_ids_bt, attention_mask_bt=None, *, positions_bt=None):
        """Float32 logits [B, T, V] (bf16 models: bf16 matmul, float32 accumulation)."""
        hidden_btd = self.hidden_states(input_ids_bt, attention_mask_bt, positions_bt=positions_bt)
        return self.logits(hidden_btd)

    def hidden_states(self, input_ids_bt, attention_mask_bt=None, *, positions_bt=None):
        """Final-norm hidden states [B, T, D] in the compute dtype.

        attention_mask_bt: 1 = real token, 0 = padding (default all ones); attention is
        causal over real tokens. positions_bt default to `default_positions(mask)`.
        """
        input_ids_bt = jnp.asarray(input_ids_bt)
        if attention_mask_bt is None:
            attention_mask_bt = jnp.ones(input_ids_bt.shape, jnp.int32)
        attention_mask_bt = jnp.asarray(attention_mask_bt)
        if positions_bt is None:
            positions_bt = default_positions(attention_mask_bt)
        t = input_ids_bt.shape[1]
        causal_ts = jnp.tril(jnp.ones((t, t), bool))
        mask_bts = causal_ts[None] & (attention_mask_bt[:, None, :] != 0)
        hidden_btd, _ = self.forward(input_ids_bt, positions_bt, mask_bts)
        return hidden_btd

    def forward(self, input_ids_bt, positions_bt, mask_bts, cache=None, cache_index=None):
        """Low-level pass: explicit positions and [B, T, S] mask, optional KV cache.

        cache: from `init_cache` (see there); this step's keys and values are written at
        slots cache_index .. cache_index + T - 1 before attending.
        Returns (final-norm hidden [B, T, D], updated cache or None).
        """
        dtype = jnp.dtype(self.config.dtype)
        x_btd = constrain(self.model.embed_tokens(input_ids_bt), RESIDUAL)
        cos_btd, sin_btd = rope_cos_sin(positions_bt, self.config, dtype)
        run = run_scan if self.stacked else run_loop
        x_btd, cache = run(
            self.model.layers,
            self.config.remat,
            x_btd,
            cache,
            cos_btd,
            sin_btd,
            mask_bts,
            cache_index,
        )
        return self.model.norm(x_btd), cache

    def lm_head_kernel(self):
        """The output projection [D, V] (the transposed embedding when tied)."""
        return self.lm_head_matrix()[0].T if self.lm_head is None else self.lm_head_matrix()[0]

    def lm_head_matrix(self):
        """(matrix, layout): the output projection as stored, for the fused kernels.

        `(embedding [V, D], "vd")` when tied, `(kernel [D, V], "dv")` otherwise. Pass the
        layout on (`divergence.fused_*(..., head_layout=layout)`): inside a chunk loop, a
        transposed view such as `lm_head_kernel()` of a tied model is copied whole.
        (Not named `lm_head`: that attribute is the untied `nnx.Linear`, as in HF.)
        """
        dtype = self.config.dtype  # parameters stored in another dtype compute in this one
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...].astype(dtype), "vd"
        return self.lm_head.kernel[...].astype(dtype), "dv"

    def restrict_vocab(self, token_count: int) -> None:
        """Treat ids >= `token_count` (padded rows of the checkpoint) as no token at all."""
        if not 1 <= token_count <= self.config.vocab_size:
            raise ValueError(
                f"token count {token_count} must be in [1, {self.config.vocab_size}] "
                "(the model's output rows); is the tokenizer larger than the model?"
            )
        self.token_count = int(token_count)

    def logits(self, hidden_btd):
        """Float32 logits from final-norm hidden states [..., D]; -inf at padded ids."""
        logits = jnp.einsum(
            "...d,dv->...v", hidden_btd, self.lm_head_kernel(), preferred_element_type=jnp.float32
        )
        if self.token_count == self.config.vocab_size:
            return logits
        real_v = jnp.arange(self.config.vocab_size) < self.token_count
        return jnp.where(real_v, logits, -jnp.inf)

    def init_cache(self, batch_size: int, max_length: int) -> list[LayerCache]:
        """Zero KV cache for `max_length` slots, in the compute dtype.

        A list of (keys [..., B, K, D, S], values [..., B, K, S, D]) pairs: one per layer,
        or for a stacked model one pair with a leading layer axis [L, ...]. Use the
        methods below to reshape it whatever the layout.
        """
        c = self.config
        keys = (batch_size, c.num_key_value_heads, c.head_dim, max_length)
        values = (batch_size, c.num_key_value_heads, max_length, c.head_dim)
        if self.stacked:
            layers = (c.num_hidden_layers,)
            return [(jnp.zeros(layers + keys, c.dtype), jnp.zeros(layers + values, c.dtype))]
        return [
            (jnp.zeros(keys, c.dtype), jnp.zeros(values, c.dtype))
            for _ in range(c.num_hidden_layers)
        ]

    @staticmethod
    def extend_cache(
        cache: list[LayerCache], max_length: int, *, at: int | None = None
    ) -> list[LayerCache]:
        """`cache` widened to `max_length` slots by zero slots inserted before slot `at`
        (default: appended after the last slot)."""
        widen = partial(_insert_zero_slots, length=max_length, at=at)
        return [(widen(keys, axis=-1), widen(values, axis=-2)) for keys, values in cache]

    @staticmethod
    def broadcast_cache(cache: list[LayerCache], batch_size: int) -> list[LayerCache]:
        """A batch-1 cache repeated for `batch_size` rows."""
        return jax.tree.map(
            lambda x: jnp.broadcast_to(x, (*x.shape[:_BATCH], batch_size, *x.shape[_BATCH + 1 :])),
            cache,
        )

    @staticmethod
    def concat_caches(caches: list[list[LayerCache]]) -> list[LayerCache]:
        """One cache holding the rows of `caches` (same slots), one after the other."""
        return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=_BATCH), *caches)

    @staticmethod
    def take_cache_rows(cache: list[LayerCache], rows_b: jax.Array) -> list[LayerCache]:
        """The cache's rows `rows_b` (int [B']), in that order."""
        return jax.tree.map(lambda x: jnp.take(x, rows_b, axis=_BATCH), cache)


# The batch axis of cached keys [..., B, K, D, S] and values [..., B, K, S, D], both layouts.
_BATCH = -4


def _insert_zero_slots(x, *, axis: int, length: int, at: int | None):
    """x widened to `length` along `axis` by zeros inserted before index `at` (None: the end)."""
    head, tail = jnp.split(x, [x.shape[axis] if at is None else at], axis=axis)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.concatenate([jnp.pad(head, widths), tail], axis=axis)
