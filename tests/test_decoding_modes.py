"""Decoding modes as plug-ins: a mode of one's own, and a mode with a lockstep amateur."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2s_jax.decoding import DecodingMode, Sampling, decoding_mode, first_argmax
from w2s_jax.generate import generate
from w2s_jax.models import load_pretrained

PROMPTS = [[5, 17, 230, 9], [44], [3, 8, 120, 77, 301, 12, 6], [200, 201]]


@decoding_mode
class SecondBest(DecodingMode):
    """Always the second most likely token."""

    def next_tokens(self, logits_bv, key, amateur_logits_bv=None):
        return jnp.argsort(-logits_bv, axis=-1)[:, 1].astype(jnp.int32)


@decoding_mode
class AmateurGreedy(DecodingMode):
    """The amateur's greedy token (the expert's logits are ignored)."""

    needs_amateur = True

    def next_tokens(self, logits_bv, key, amateur_logits_bv=None):
        return first_argmax(amateur_logits_bv)


@pytest.fixture(scope="module")
def expert(tiny_qwen2_dir):
    return load_pretrained(tiny_qwen2_dir)


def test_a_custom_mode_picks_every_token(expert):
    """Each generated token is the second best of the model's logits over prompt + the
    tokens before it (numpy on a plain forward pass), not the greedy one."""
    result = generate(expert, PROMPTS, max_new_tokens=8, eos_ids=[2], mode=SecondBest())
    greedy = generate(expert, PROMPTS, max_new_tokens=8, eos_ids=[2]).tokens
    assert (result.tokens != greedy).any()
    for row, prompt in enumerate(PROMPTS):
        n = int(result.lengths[row])
        ids = np.asarray([prompt + result.tokens[row, : n - 1].tolist()], np.int32)
        logits_tv = np.asarray(expert(ids, np.ones_like(ids)))[0, len(prompt) - 1 :]
        np.testing.assert_array_equal(result.tokens[row, :n], np.argsort(-logits_tv, -1)[:, 1])


def test_an_explicit_sampling_mode_equals_the_sampling_arguments(expert):
    kwargs = dict(max_new_tokens=8, eos_ids=[2], rng=jax.random.key(7))
    by_mode = generate(expert, PROMPTS, mode=Sampling(0.8, top_k=5, top_p=0.9), **kwargs)
    by_args = generate(expert, PROMPTS, temperature=0.8, top_k=5, top_p=0.9, **kwargs)
    np.testing.assert_array_equal(by_mode.tokens, by_args.tokens)


def test_a_lockstep_amateur_decodes_beside_the_expert(expert, tiny_qwen2_amateur_dir):
    """The amateur gets its own prefill and KV cache and sees every chosen token: a mode
    that follows the amateur's argmax reproduces the amateur's own greedy decoding, while
    the hidden states returned are still the expert's."""
    amateur = load_pretrained(tiny_qwen2_amateur_dir)
    result = generate(
        expert,
        PROMPTS,
        max_new_tokens=10,
        eos_ids=[2],
        mode=AmateurGreedy(),
        amateur=amateur,
        return_hidden_states=True,
    )
    alone = generate(amateur, PROMPTS, max_new_tokens=10, eos_ids=[2])
    np.testing.assert_array_equal(result.tokens, alone.tokens)
    assert (result.tokens != generate(expert, PROMPTS, max_new_tokens=10, eos_ids=[2]).tokens).any()
    assert result.hidden_states.shape[-1] == expert.config.hidden_size


def test_mode_arguments_are_checked(expert, tiny_qwen2_amateur_dir):
    amateur = load_pretrained(tiny_qwen2_amateur_dir)
    cases = [
        (dict(mode=AmateurGreedy()), "AmateurGreedy needs amateur model"),
        (dict(mode=SecondBest(), amateur=amateur), "SecondBest takes no amateur model"),
        (dict(mode=SecondBest(), temperature=0.5), "either mode= or temperature"),
        (dict(mode=Sampling(1.0)), "Sampling needs an explicit rng key"),
        (dict(mode=Sampling(0.0), rng=jax.random.key(0)), "temperature must be > 0"),
        (dict(mode=Sampling(1.0, top_k=0), rng=jax.random.key(0)), "top_k"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(expert, PROMPTS, max_new_tokens=4, eos_ids=[2], **kwargs)
