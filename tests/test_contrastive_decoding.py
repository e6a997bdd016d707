"""Contrastive decoding: the scores, and generate's lockstep decoding against numpy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerances import reordered_sum_bound

from w2s_jax.decoding import Contrastive
from w2s_jax.divergence import contrastive_scores, plausibility_mask
from w2s_jax.generate import generate
from w2s_jax.models import load_pretrained

# a shared prefix (run once, copied to every row), then own parts of different lengths
PREFIX = [1, 40, 41, 42, 43]
PROMPTS = [PREFIX + own for own in ([5, 17, 230, 9], [44], [3, 8, 120, 77, 301 % 300, 12], [7])]
MAX_NEW = 10
TOKENS = 300  # the tiny tokenizer's size (the checkpoints have 320 rows)


@pytest.fixture(scope="module")
def models(tiny_qwen2_dir, tiny_qwen2_amateur_dir):
    expert, amateur = load_pretrained(tiny_qwen2_dir), load_pretrained(tiny_qwen2_amateur_dir)
    for model in (expert, amateur):
        model.restrict_vocab(TOKENS)  # the tokenizer's size: padded rows are no tokens
    return expert, amateur


@pytest.fixture(scope="module")
def torch_models(tiny_qwen2_dir, tiny_qwen2_amateur_dir):
    from transformers import AutoModelForCausalLM

    return [
        AutoModelForCausalLM.from_pretrained(str(d)).eval()
        for d in (tiny_qwen2_dir, tiny_qwen2_amateur_dir)
    ]


def _last_logits(torch_models, ids):
    """Each HF PyTorch model's logits after `ids` over the tokenizer's ids, float64."""
    import torch

    with torch.no_grad():
        return [
            m(torch.tensor([ids])).logits[0, -1, :TOKENS].double().numpy() for m in torch_models
        ]


def _log_softmax64(logits):
    z = np.asarray(logits, np.float64)
    top = z.max(-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


def _reference_scores(expert_logits, amateur_logits, alpha, beta, form="weighted", tau=1.0):
    s_e = _log_softmax64(expert_logits)
    s_a = _log_softmax64(np.asarray(amateur_logits, np.float64) / tau)
    with np.errstate(invalid="ignore"):
        score = s_e - s_a if form == "difference" else (1 + beta) * s_e - beta * s_a
    plausible = s_e >= np.log(alpha) + s_e.max(-1, keepdims=True)
    return np.where(plausible, score, -np.inf)


def _reference_decode(torch_models, prompt, alpha, beta, form="weighted", tau=1.0):
    """Step by step: a full HF PyTorch forward pass of each model over prompt + the tokens
    so far, the scores in float64 numpy, their argmax; stops after <|im_end|> (id 2)."""
    generated = []
    for _ in range(MAX_NEW):
        last = _last_logits(torch_models, prompt + generated)
        generated.append(int(np.argmax(_reference_scores(*last, alpha, beta, form, tau))))
        if generated[-1] == 2:
            break
    return generated


@pytest.mark.parametrize(
    "alpha, beta, form, tau",
    [(0.1, 0.5, "weighted", 1.0), (0.02, 2.0, "weighted", 1.0), (0.05, 0.0, "difference", 0.5)],
)
def test_greedy_contrastive_decoding_matches_a_numpy_reference(
    models, torch_models, alpha, beta, form, tau
):
    expert, amateur = models
    mode = Contrastive(alpha=alpha, beta=beta, form=form, amateur_temperature=tau)
    result = generate(
        expert, PROMPTS, max_new_tokens=MAX_NEW, eos_ids=[2], mode=mode, amateur=amateur
    )
    greedy = generate(expert, PROMPTS, max_new_tokens=MAX_NEW, eos_ids=[2]).tokens
    assert (result.tokens != greedy).any(), "the amateur should change some tokens"
    for row, prompt in enumerate(PROMPTS):
        n = int(result.lengths[row])
        expected = _reference_decode(torch_models, prompt, alpha, beta, form, tau)
        assert result.tokens[row, :n].tolist() == expected


def test_beta_zero_or_the_expert_as_its_own_amateur_gives_the_expert_greedy_tokens(models):
    expert, amateur = models
    greedy = generate(expert, PROMPTS, max_new_tokens=MAX_NEW, eos_ids=[2]).tokens
    kwargs = dict(max_new_tokens=MAX_NEW, eos_ids=[2])
    beta0 = generate(expert, PROMPTS, mode=Contrastive(beta=0.0), amateur=amateur, **kwargs)
    itself = generate(expert, PROMPTS, mode=Contrastive(beta=3.0), amateur=expert, **kwargs)
    np.testing.assert_array_equal(beta0.tokens, greedy)
    np.testing.assert_array_equal(itself.tokens, greedy)


def test_sampled_contrastive_tokens_stay_in_the_plausible_set_and_follow_row_keys(
    models, torch_models
):
    """Draws at temperature > 0 are plausible tokens (checked step by step against the
    reference scores); with row keys a row's tokens do not depend on its batch."""
    expert, amateur = models
    keys = jax.random.split(jax.random.key(3), len(PROMPTS))
    mode = Contrastive(alpha=0.05, temperature=1.0, top_p=0.95, row_keys=keys)
    kwargs = dict(max_new_tokens=MAX_NEW, eos_ids=[2], amateur=amateur, rng=jax.random.key(0))
    result = generate(expert, PROMPTS, mode=mode, **kwargs)
    for row, prompt in enumerate(PROMPTS):
        tokens = result.tokens[row, : int(result.lengths[row])].tolist()
        for t, token in enumerate(tokens):
            last = _last_logits(torch_models, prompt + tokens[:t])
            assert np.isfinite(_reference_scores(*last, 0.05, 0.5)[token])
    alone = Contrastive(alpha=0.05, temperature=1.0, top_p=0.95, row_keys=keys[2:3])
    single = generate(expert, PROMPTS[2:3], mode=alone, **kwargs)
    np.testing.assert_array_equal(single.tokens[0], result.tokens[2])
    other = Contrastive(alpha=0.05, temperature=1.0, top_p=0.95, row_keys=keys[::-1])
    assert (generate(expert, PROMPTS, mode=other, **kwargs).tokens != result.tokens).any()


def test_scores_mask_edge_cases():
    expert = jnp.log(jnp.array([[0.5, 0.25, 0.05, 0.2], [0.4, 0.4, 0.1, 0.1]]))
    amateur = jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]]))
    # alpha = 1 keeps the argmax (and ties of it) only, whatever the amateur says
    ones = np.asarray(contrastive_scores(expert, amateur, 1.0, 10.0))
    np.testing.assert_array_equal(np.isfinite(ones), [[1, 0, 0, 0], [1, 1, 0, 0]])
    # a token at exactly alpha * max is plausible (0.25 = 0.5 * 0.5): the same set as the mask
    half = np.asarray(contrastive_scores(expert, amateur, 0.5, 0.5))
    np.testing.assert_array_equal(np.isfinite(half), plausibility_mask(expert, 0.5))
    reference = _reference_scores(expert, amateur, 0.4, 0.5)  # float64 rounds the boundary
    # float32 vs float64: two log-normalisers over V = 4, at the log-probabilities' scale
    scale = np.abs(np.asarray(expert)).max() + np.abs(np.asarray(amateur)).max()
    bound = reordered_sum_bound(scale, terms=4, reductions=2)
    finite = np.isfinite(half)
    np.testing.assert_allclose(half[finite], reference[finite], rtol=0, atol=bound)
    # a plausible token the amateur rules out scores +inf; beta = 0 leaves the expert's
    amateur = jnp.array([[0.0, -1.0, -9.0, -jnp.inf]])
    expert = amateur[:, ::-1]  # plausible at alpha 0.1: ids 3 (the argmax) and 2
    scores = np.asarray(contrastive_scores(expert, amateur, 0.1, 0.5))
    assert scores[0, 3] == np.inf and np.isfinite(scores[0, 2]) and np.isneginf(scores[0, :2]).all()
    beta0 = np.asarray(contrastive_scores(expert, amateur, 0.1, 0.0))
    np.testing.assert_allclose(beta0[0, 2:], np.asarray(jax.nn.log_softmax(expert[0]))[2:])
    # the sampling path gives such a token all the mass
    mode = Contrastive(alpha=0.1, temperature=1.0)
    drawn = mode.next_tokens(expert.repeat(64, 0), jax.random.key(0), amateur.repeat(64, 0))
    assert (np.asarray(drawn) == 3).all()


def test_bad_contrastive_settings_are_refused(models):
    expert, amateur = models
    cases = [
        (Contrastive(alpha=0.0), "alpha must lie in"),
        (Contrastive(alpha=1.5), "alpha must lie in"),
        (Contrastive(beta=-1.0), "beta must be"),
        (Contrastive(form="ratio"), "form must be one of"),
        (Contrastive(amateur_temperature=0.0), "amateur temperature"),
        (Contrastive(top_p=0.0), "top_p"),
    ]
    for mode, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(expert, PROMPTS, max_new_tokens=2, eos_ids=[2], mode=mode, amateur=amateur)
    with pytest.raises(ValueError, match="needs amateur"):
        generate(expert, PROMPTS, max_new_tokens=2, eos_ids=[2], mode=Contrastive())
    with pytest.raises(ValueError, match="needs an explicit rng"):
        generate(
            expert,
            PROMPTS,
            max_new_tokens=2,
            eos_ids=[2],
            mode=Contrastive(temperature=0.7),
            amateur=amateur,
        )
