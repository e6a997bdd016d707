"""Batched decoding with a preallocated KV cache: jitted prefills, one jitted while_loop.

Prompts of different lengths are left-padded; RoPE positions count real tokens only,
so every row decodes exactly as it would alone. The prefix every prompt shares (a
system prompt, a chat template) is prefilled once and its keys/values copied to every
row; the rest is prefilled in groups of rows sorted by length, each padded only to its
own longest prompt. Several stop ids. The next token is the decoding mode's choice
(`w2s_jax.decoding`: greedy, sampling with temperature/top-k/top-p and an explicit PRNG
key, or a mode of your own); a mode may have an amateur model decode in lockstep, with
its own KV cache, in the same jitted loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from w2s_jax import sharding
from w2s_jax.decoding import (  # noqa: F401 (first_argmax, sample_logits: re-exported)
    DecodingMode,
    Greedy,
    Sampling,
    check_top,
    first_argmax,
    sample_logits,
)
from w2s_jax.models.decoder import default_positions
from w2s_jax.shape_buckets import bucket_width


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """tokens: i32[B, max_new_tokens], pad_id after a row stopped. lengths: i32[B], the
    number of generated tokens per row including its stop token. nonfinite_step: i32[B],
    the first generated token whose logits (any model's) held a NaN or +inf, -1 if
    none (`check_finite` raises on it). hidden_states (only
    with `return_hidden_states=True`): a jax.Array [B, max_new_tokens, D] in the model's
    compute dtype, on the model's devices: the final-norm hidden state from which
    tokens[:, t] was chosen (its logits are `model.logits(hidden_states)`); rows are
    meaningless from a row's length on."""

    tokens: np.ndarray
    lengths: np.ndarray
    hidden_states: jax.Array | None = None
    nonfinite_step: np.ndarray | None = None

    def check_finite(self, names: Sequence[str], what: str = "the model") -> None:
        """NonFiniteError naming the first row (by `names`) whose logits held a NaN or
        +inf at some decoding step, and that step; nothing when every row stayed finite."""
        from w2s_jax.files import NonFiniteError

        if self.nonfinite_step is None:
            return
        for name, step in zip(names, self.nonfinite_step, strict=True):
            if step >= 0:
                raise NonFiniteError(
                    f"{name}: {what}'s logits are not finite (NaN or +inf) at generated "
                    f"token {int(step)}; its weights or dtype overflow (try --dtype float32)"
                )


def shared_prefix_cache(model, prefix_ids_n):
    """Keys/values of one prompt prefix [n] at positions 0..n-1: a batch-1 cache (under jit)."""
    _, cache = prefill(model, prefix_ids_n[None], jnp.ones((1, prefix_ids_n.shape[0]), jnp.int32))
    return cache


def prefill(model, ids_bp, mask_bp, *, prefix_len: int = 0, prefix_cache=None):
    """One causal pass over prompts laid out by `left_pad` (under jit).

    Returns (final-norm hidden states [B, P - prefix_len, D] of the columns from
    `prefix_len` on, KV cache over the P columns). The shared prefix (the first
    `prefix_len` columns, identical in every row) runs once at batch 1, or comes as
    `prefix_cache` (`shared_prefix_cache`); its keys/values are copied to every row and
    the rows' own tokens attend to them.
    """
    b, p = ids_bp.shape
    mask_bps = jnp.tril(jnp.ones((p, p), bool))[None] & (mask_bp[:, None, :] != 0)
    positions_bp = default_positions(mask_bp)
    n = prefix_len
    if n == 0:
        return model.forward(ids_bp, positions_bp, mask_bps, model.init_cache(b, p), 0)
    if prefix_cache is None:
        prefix_cache = shared_prefix_cache(model, ids_bp[0, :n])
    cache = model.extend_cache(model.broadcast_cache(prefix_cache, b), p)
    return model.forward(ids_bp[:, n:], positions_bp[:, n:], mask_bps[:, n:], cache, n)


@partial(jax.jit, static_argnames=("graphdef",))
def _prefix_cache(graphdef, state, prefix_ids_n):
    return shared_prefix_cache(nnx.merge(graphdef, state), prefix_ids_n)


@partial(jax.jit, static_argnames=("graphdef", "prefix_len"))
def _prefill_rows(graphdef, state, ids_rw, mask_rw, prefix_cache, *, prefix_len):
    model = nnx.merge(graphdef, state)
    hidden_rwd, cache = prefill(
        model, ids_rw, mask_rw, prefix_len=prefix_len, prefix_cache=prefix_cache
    )
    return hidden_rwd[:, -1], cache


@partial(jax.jit, static_argnames=("graphdefs", "width", "prefix_len", "cache_len"))
def _start_decoding(
    graphdefs, states, lasts, caches, row_order, mode, key, *, width, prefix_len, cache_len
):
    """Per model (the expert, then a lockstep mode's amateur): the groups' prefills as one
    batch: caches widened to `width` columns (zeros after the prefix), rows back in order
    (`row_order`: the rows of the groups, concatenated; None for a single group in row
    order), room for `cache_len` slots. And the first new token, the mode's choice."""
    out_caches, last_hidden, logits = [], [], []
    for graphdef, state, model_lasts, model_caches in zip(
        graphdefs, states, lasts, caches, strict=True
    ):
        model = nnx.merge(graphdef, state)
        model_caches = [model.extend_cache(cache, width, at=prefix_len) for cache in model_caches]
        cache = model.concat_caches(model_caches)
        last_bd = jnp.concatenate(model_lasts)
        if row_order is not None:
            order_b = jnp.argsort(row_order)
            last_bd = last_bd[order_b]
            cache = model.take_cache_rows(cache, order_b)
        out_caches.append(model.extend_cache(cache, cache_len))
        last_hidden.append(last_bd)
        logits.append(model.logits(last_bd))
    key, sub = jax.random.split(key)
    first_b = mode.next_tokens(logits[0], sub, *logits[1:])
    bad_b = jnp.where(_nonfinite_rows(logits), 0, -1).astype(jnp.int32)
    return tuple(out_caches), first_b, bad_b, last_hidden[0], key


def _nonfinite_rows(logits) -> jax.Array:
    """bool[B]: rows where any model's logits hold a NaN or +inf (-inf marks padded
    vocabulary rows and is fine)."""
    return jnp.stack([jnp.any(jnp.isnan(x) | (x == jnp.inf), axis=-1) for x in logits]).any(0)


@partial(
    jax.jit,
    static_argnames=("graphdefs", "max_new_tokens", "keep_hidden"),
    donate_argnames=("caches",),
)
def _decode(
    graphdefs,
    states,
    caches,
    first_b,
    bad_b,
    first_hidden_bd,
    mask_bp,
    eos_e,
    pad_id,
    mode,
    key,
    *,
    max_new_tokens,
    keep_hidden,
):
    """The decoding loop: every model (the expert, then a lockstep mode's amateur) takes
    the last token into its own cache; the mode picks the next from their logits. bad_b:
    per row, the first step whose logits held a NaN or +inf (-1: none yet)."""
    models = [nnx.merge(graphdef, state) for graphdef, state in zip(graphdefs, states, strict=True)]
    b, p = mask_bp.shape
    cache_len = p + max_new_tokens  # as allocated by _start_decoding
    kv_valid_bs = jnp.pad(mask_bp, ((0, 0), (0, cache_len - p)), constant_values=1) != 0
    prompt_len_b = mask_bp.sum(axis=-1).astype(jnp.int32)
    tokens_bn = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_b)
    done_b = jnp.isin(first_b, eos_e)
    lengths_b = jnp.ones((b,), jnp.int32)
    # Without keep_hidden a [B, 1, D] placeholder rides along, so the loop stays the same.
    hidden_shape = (b, max_new_tokens if keep_hidden else 1, first_hidden_bd.shape[-1])
    hidden_bnd = jnp.zeros(hidden_shape, first_hidden_bd.dtype).at[:, 0].set(first_hidden_bd)

    def cond(carry):
        i, _, _, _, done_b, _, _, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done_b)

    def body(carry):
        i, caches, tokens_bn, last_b, done_b, lengths_b, bad_b, hidden_bnd, key = carry
        slot = p + i - 1  # the cache slot of `last_b`
        mask_b1s = (kv_valid_bs & (jnp.arange(cache_len) <= slot)[None])[:, None, :]
        positions_b1 = (prompt_len_b + i - 1)[:, None]
        hiddens, new_caches = [], []
        for model, cache in zip(models, caches, strict=True):
            hidden_b1d, cache = model.forward(last_b[:, None], positions_b1, mask_b1s, cache, slot)
            hiddens.append(hidden_b1d)
            new_caches.append(cache)
        key, sub = jax.random.split(key)
        logits = [model.logits(h[:, 0]) for model, h in zip(models, hiddens, strict=True)]
        next_b = mode.next_tokens(logits[0], sub, *logits[1:])
        bad_b = jnp.where((bad_b < 0) & ~done_b & _nonfinite_rows(logits), i, bad_b)
        if keep_hidden:
            hidden_bnd = jax.lax.dynamic_update_slice(hidden_bnd, hiddens[0], (0, i, 0))
        next_b = jnp.where(done_b, pad_id, next_b)
        lengths_b = jnp.where(done_b, lengths_b, i + 1)
        tokens_bn = tokens_bn.at[:, i].set(next_b)
        done_b = done_b | jnp.isin(next_b, eos_e)
        return (
            i + 1,
            tuple(new_caches),
            tokens_bn,
            next_b,
            done_b,
            lengths_b,
            bad_b,
            hidden_bnd,
            key,
        )

    carry = (jnp.int32(1), caches, tokens_bn, first_b, done_b, lengths_b, bad_b, hidden_bnd, key)
    carry = jax.lax.while_loop(cond, body, carry)
    _, caches, tokens_bn, _, _, lengths_b, bad_b, hidden_bnd, _ = carry
    # returning the caches lets them alias the donated buffers
    return tokens_bn, lengths_b, bad_b, hidden_bnd if keep_hidden else None, caches


def left_pad(
    prompt_ids: Sequence[Sequence[int]], pad_id: int, multiple: int = 1, *, prefix_len: int = 0
):
    """(ids [B, P], mask [B, P]) int32, left-padded; P: the longest prompt's length rounded
    up to its bucket (`shape_buckets.bucket_width`: a multiple of `multiple`, few widths).

    prefix_len > 0 keeps every row's first `prefix_len` tokens (the same in all rows, see
    `shared_prefix_length`) at the left edge and right-aligns the rest, so the shared
    prefix sits in the same columns in every row; the mask's gap is the padding.
    """
    width = bucket_width(max(len(p) for p in prompt_ids), multiple)
    ids = np.full((len(prompt_ids), width), pad_id, np.int32)
    mask = np.zeros((len(prompt_ids), width), np.int32)
    for row, prompt in enumerate(prompt_ids):
        if len(prompt):
            ids[row, width - len(prompt) + prefix_len :] = prompt[prefix_len:]
            mask[row, width - len(prompt) + prefix_len :] = 1
            ids[row, :prefix_len] = prompt[:prefix_len]
            mask[row, :prefix_len] = 1
    return ids, mask


def shared_prefix_length(prompt_ids: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all prompts share, leaving every prompt at least one of its
    own; 0 for a single prompt (nothing to share)."""
    if len(prompt_ids) < 2:
        return 0
    first = prompt_ids[0]
    shared = min(len(p) for p in prompt_ids) - 1
    for prompt in prompt_ids[1:]:
        shared = next((i for i in range(shared) if prompt[i] != first[i]), shared)
    return max(shared, 0)


def length_groups(
    prompt_ids: Sequence[Sequence[int]], *, count: int, prefix_len: int, width: int, multiple: int
) -> list[tuple[np.ndarray, int]]:
    """Rows sorted by length in `count` groups of (nearly) equal size, each with its width:
    its longest own part (after the shared prefix) rounded up to a power of two times
    `multiple`, at most `width - prefix_len`: coarse, as the groups' widths combine into
    the shapes of one program. One group of all rows in order when groups would skip less
    than a tenth of the padded tokens (already length-sorted batches): fewer shapes."""
    own = np.array([len(p) - prefix_len for p in prompt_ids])
    coarse = partial(bucket_width, multiple=multiple, steps=1)
    rounded = lambda n: min(coarse(int(n)), width - prefix_len)  # noqa: E731
    groups = np.array_split(np.argsort(own, kind="stable"), min(count, len(own)))
    widths = [rounded(own[g].max()) for g in groups]
    one_width = width - prefix_len  # the bucket of the longest prompt
    if sum(len(g) * w for g, w in zip(groups, widths, strict=True)) > 0.9 * len(own) * one_width:
        return [(np.arange(len(own)), one_width)]
    return list(zip(groups, widths, strict=True))


def generate(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int] | int,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array | None = None,
    mode: DecodingMode | None = None,
    amateur=None,
    pad_to_multiple: int = 16,
    return_hidden_states: bool = False,
    share_prefix: bool = True,
    prefill_groups: int = 4,
) -> GenerationResult:
    """Continue each prompt (a list of token ids; ragged) by up to `max_new_tokens` tokens.

    The decoding mode (`w2s_jax.decoding`) picks every next token: `mode`, or the one the
    sampling arguments describe (temperature 0 is greedy; temperature > 0 samples,
    optionally top_k / top_p). Modes that draw need `rng` (a JAX PRNG key). `amateur`: the
    lockstep model of a mode with `needs_amateur` (same tokenizer). A row stops after
    emitting any id in `eos_ids`.
    Prompt length is padded up to a bucket (`w2s_jax.shape_buckets`: multiples of
    `pad_to_multiple`, at most 4 widths per doubling) so that nearby lengths share one
    compiled program. On a model sharded over a mesh, the batch is split over ("data",
    "fsdp") when it divides. return_hidden_states: also the hidden state behind every
    generated token (`GenerationResult`), to score the rollout without a second pass.
    share_prefix: the prefix all prompts share runs once (rows equal up to rounding).
    prefill_groups: prompts sorted by length are prefilled in this many groups, each
    padded to its own longest (single-device models; 1 turns it off).
    """
    models = (model,) if amateur is None else (model, amateur)
    vocab = min(m.config.vocab_size for m in models)
    eos = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    _check_arguments(prompt_ids, vocab, max_new_tokens, eos)
    mode = _decoding_mode(mode, temperature, top_k, top_p, rng, vocab, amateur is not None)

    prefix_len = shared_prefix_length(prompt_ids) if share_prefix else 0
    ids_bp, mask_bp = left_pad(prompt_ids, pad_id, pad_to_multiple, prefix_len=prefix_len)
    graphdefs, states = zip(*(nnx.split(m) for m in models), strict=True)
    mesh = _mesh_of(states[0])
    place = (lambda x: x) if mesh is None else partial(sharding.place_batch, mesh=mesh)
    caches, first_b, bad_b, first_hidden_bd, key = _prefill_and_start(
        graphdefs,
        states,
        prompt_ids,
        ids_bp,
        mask_bp,
        mode,
        jax.random.key(0) if rng is None else rng,
        prefix_len=prefix_len,
        multiple=pad_to_multiple,
        groups=prefill_groups if mesh is None else 1,
        cache_len=ids_bp.shape[1] + max_new_tokens,
        place=place,
    )
    tokens_bn, lengths_b, bad_b, hidden_bnd, _ = _decode(
        graphdefs,
        states,
        caches,
        first_b,
        bad_b,
        first_hidden_bd,
        place(mask_bp),
        jnp.asarray(eos + eos[:1] * (-len(eos) % 8), jnp.int32),  # fixed size: fewer compiles
        jnp.int32(pad_id),
        mode,
        key,
        max_new_tokens=max_new_tokens,
        keep_hidden=return_hidden_states,
    )
    return GenerationResult(
        tokens=sharding.to_host(tokens_bn),
        lengths=sharding.to_host(lengths_b),
        hidden_states=hidden_bnd,
        nonfinite_step=sharding.to_host(bad_b),
    )


def _prefill_and_start(
    graphdefs,
    states,
    prompt_ids,
    ids_bp,
    mask_bp,
    mode,
    key,
    *,
    prefix_len,
    multiple,
    groups,
    cache_len,
    place,
):
    """Every model's prompts prefilled in `groups` length groups (`_prefill_groups`), then
    `_start_decoding`: (caches, first tokens, their non-finite flags (-1 or 0), the
    expert's last hidden states, key)."""
    width = ids_bp.shape[1]
    groups = length_groups(
        prompt_ids, count=groups, prefix_len=prefix_len, width=width, multiple=multiple
    )
    lasts, caches = zip(
        *(
            _prefill_groups(graphdef, state, ids_bp, mask_bp, groups, prefix_len, place)
            for graphdef, state in zip(graphdefs, states, strict=True)
        ),
        strict=True,
    )
    row_order = np.concatenate([rows for rows, _ in groups])
    row_order = None if np.array_equal(row_order, np.arange(len(row_order))) else row_order
    return _start_decoding(
        graphdefs,
        states,
        lasts,
        caches,
        row_order,
        mode,
        key,
        width=width,
        prefix_len=prefix_len,
        cache_len=cache_len,
    )


def _check_arguments(prompt_ids, vocab: int, max_new_tokens: int, eos: list[int]) -> None:
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate: every prompt needs at least one token")
    bad = [t for p in prompt_ids for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(
            f"generate: prompt token id {bad[0]} is outside the vocabulary [0, {vocab})"
        )
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not eos:
        raise ValueError("generate: eos_ids is empty")


def _decoding_mode(mode, temperature, top_k, top_p, rng, vocab: int, amateur: bool):
    """`mode` checked, or the mode the sampling arguments describe (greedy at temperature
    0, else `Sampling`); ValueError for bad settings, a missing rng key or amateur."""
    try:
        if mode is not None and (temperature, top_k, top_p) != (0.0, None, None):
            raise ValueError("give either mode= or temperature/top_k/top_p, not both")
        if mode is None:
            if temperature < 0:
                raise ValueError(f"temperature must be >= 0, got {temperature}")
            if temperature > 0 and rng is None:
                raise ValueError("sampling (temperature > 0) needs an explicit rng key")
            check_top(vocab, top_k, top_p)  # also when greedy ignores them
            top_p = None if top_p is None else float(top_p)
            mode = Sampling(float(temperature), top_k, top_p) if temperature else Greedy()
        mode.check(vocab)
        name = type(mode).__name__
        if mode.needs_rng and rng is None:
            raise ValueError(f"decoding mode {name} needs an explicit rng key")
        if mode.needs_amateur != amateur:
            need = "needs" if mode.needs_amateur else "takes no"
            raise ValueError(f"decoding mode {name} {need} amateur model")
    except ValueError as exc:
        raise ValueError(f"generate: {exc}") from None
    return mode


def _prefill_groups(graphdef, state, ids_bp, mask_bp, groups, prefix_len, place):
    """Prefill each group of rows (`length_groups`) over the shared prefix's columns and
    the group's own last columns; the prefix runs once. Returns the groups' (last
    hidden states, caches)."""
    width = ids_bp.shape[1]
    prefix = _prefix_cache(graphdef, state, ids_bp[0, :prefix_len]) if prefix_len else None
    lasts, caches = [], []
    for rows, own_width in groups:
        columns = np.r_[0:prefix_len, width - own_width : width]
        ids_rw, mask_rw = place(ids_bp[rows][:, columns]), place(mask_bp[rows][:, columns])
        last, cache = _prefill_rows(graphdef, state, ids_rw, mask_rw, prefix, prefix_len=prefix_len)
        lasts.append(last)
        caches.append(cache)
    return lasts, caches


def _mesh_of(state):
    """The mesh the model's parameters live on, or None for single-device models."""
    for leaf in jax.tree.leaves(state):
        spec = getattr(leaf, "sharding", None)
        if isinstance(spec, jax.sharding.NamedSharding) and spec.mesh.size > 1:
            return spec.mesh
    return None
