"""KV-cache generation vs Hugging Face generate, stop ids, sampling distributions, mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_checkpoints import make_tiny_model
from tolerances import decoder_bound
from transformers import AutoModelForCausalLM

from w2s_jax import sharding
from w2s_jax.generate import (
    generate,
    left_pad,
    length_groups,
    sample_logits,
    shared_prefix_length,
)
from w2s_jax.models import load_pretrained

PROMPT_LENGTHS = (5, 17, 1, 11)


def hidden_bound(hidden, positions):
    """Float32 reordering bound for last hidden states of the tiny 2-layer decoders."""
    return decoder_bound(hidden, layers=2, hidden=64, intermediate=128, positions=positions)


@pytest.fixture(scope="module")
def qwen2(tiny_qwen2_dir):
    return load_pretrained(tiny_qwen2_dir), AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen_llama")
    hf = make_tiny_model(folder, family="llama", tie_word_embeddings=False, initializer_range=0.2)
    return load_pretrained(folder), hf


def prompts(seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, 320, n).tolist() for n in PROMPT_LENGTHS]


def hf_greedy(hf_model, prompt_ids, max_new_tokens, eos_ids, pad_id=0, **generate_kwargs):
    """HF greedy decoding of left-padded prompts, padded to `max_new_tokens` like ours."""
    ids, mask = left_pad(prompt_ids, pad_id)
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            **generate_kwargs,
        )
    out = out[:, ids.shape[1] :].numpy()
    # HF stops early once every row is done: pad to the full width like ours.
    return np.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])), constant_values=pad_id)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_greedy_equals_hf_generate_token_for_token(request, family):
    model, hf_model = request.getfixturevalue(family)
    batch = prompts()
    result = generate(model, batch, max_new_tokens=32, eos_ids=[2])
    expected = hf_greedy(hf_model, batch, 32, [2])
    assert result.tokens.shape == (4, 32) and result.tokens.dtype == np.int32
    np.testing.assert_array_equal(result.tokens, expected)
    assert len(set(map(tuple, result.tokens.tolist()))) == 4  # rows differ: not degenerate
    assert result.nonfinite_step.tolist() == [-1] * 4
    result.check_finite(["a", "b", "c", "d"])  # finite: nothing raised


def test_stop_ids_padding_and_lengths_match_hf(qwen2):
    model, hf_model = qwen2
    batch = prompts()
    free = generate(model, batch, max_new_tokens=32, eos_ids=[2]).tokens
    # stop ids taken from the free-running output, so rows stop at different steps
    eos = [int(free[0, 6]), int(free[1, 3])]
    result = generate(model, batch, max_new_tokens=32, eos_ids=eos, pad_id=7)
    np.testing.assert_array_equal(result.tokens, hf_greedy(hf_model, batch, 32, eos, pad_id=7))
    for row, length in zip(result.tokens, result.lengths, strict=True):
        stops = np.flatnonzero(np.isin(row, eos))
        expected_length = stops[0] + 1 if stops.size else 32
        assert length == expected_length
        assert (row[length:] == 7).all()
    assert result.lengths[1] <= 4 and result.lengths[0] <= 7


def test_all_rows_stopping_ends_early_and_single_eos_int(qwen2):
    model, _ = qwen2
    batch = prompts()
    first = generate(model, batch, max_new_tokens=32, eos_ids=[2]).tokens[:, 0].tolist()
    result = generate(model, batch, max_new_tokens=32, eos_ids=first)
    assert result.lengths.tolist() == [1, 1, 1, 1]
    assert result.tokens[:, 0].tolist() == first and (result.tokens[:, 1:] == 0).all()
    single = generate(model, batch[:1], max_new_tokens=32, eos_ids=first[0])
    assert single.lengths.tolist() == [1]


def test_nonfinite_logits_are_reported_per_row(qwen2):
    from w2s_jax.files import NonFiniteError

    model, _ = qwen2
    hot = nnx.clone(model)
    hot.model.norm.weight[...] = hot.model.norm.weight[...] * 3e38  # finite, overflowing logits
    result = generate(hot, prompts()[:2], max_new_tokens=4, eos_ids=[2])
    assert result.nonfinite_step.tolist() == [0, 0]
    with pytest.raises(NonFiniteError, match="^row a: the model's logits are not finite .* 0"):
        result.check_finite(["row a", "row b"])


def test_hidden_states_equal_hf_teacher_forced_pass(qwen2):
    """The hidden state behind token t equals HF's final hidden state over prompt + tokens[:t]."""
    model, hf_model = qwen2
    batch = prompts()
    result = generate(model, batch, max_new_tokens=12, eos_ids=[2], return_hidden_states=True)
    hidden = np.asarray(result.hidden_states)
    assert hidden.shape == (4, 12, model.config.hidden_size)
    np.testing.assert_array_equal(np.asarray(model.logits(hidden)).argmax(-1), result.tokens)
    for row, prompt in enumerate(batch):
        ids = torch.tensor([prompt + result.tokens[row, :11].tolist()])
        with torch.no_grad():
            expected = hf_model(ids, output_hidden_states=True).hidden_states[-1][0].numpy()
        bound = hidden_bound(expected, positions=len(prompt) + 11)
        np.testing.assert_allclose(hidden[row], expected[len(prompt) - 1 :], atol=bound, rtol=0)
    plain = generate(model, batch, max_new_tokens=12, eos_ids=[2])
    assert plain.hidden_states is None
    np.testing.assert_array_equal(plain.tokens, result.tokens)


def test_prompt_bucketing_does_not_change_output(llama):
    model, _ = llama
    batch = prompts(seed=1)
    a = generate(model, batch, max_new_tokens=32, eos_ids=[2], pad_to_multiple=1)
    b = generate(model, batch, max_new_tokens=32, eos_ids=[2])
    np.testing.assert_array_equal(a.tokens, b.tokens)


def prompts_with_shared_prefix():
    """Random prompts behind one 9-token prefix; the last prompt is the prefix alone."""
    prefix = np.random.RandomState(5).randint(3, 320, 9).tolist()
    return [prefix + rest for rest in prompts()[:3]] + [prefix]


def test_shared_prefix_length_and_layout():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2, 3, 5]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # each prompt keeps a token
    assert shared_prefix_length([[5], [5]]) == 0
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0
    assert shared_prefix_length(prompts_with_shared_prefix()) == 8
    ids, mask = left_pad([[1, 2, 3, 4], [1, 2, 9]], 0, multiple=5, prefix_len=2)
    np.testing.assert_array_equal(ids, [[1, 2, 0, 3, 4], [1, 2, 0, 0, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 0, 1, 1], [1, 1, 0, 0, 1]])


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_shared_prefix_runs_once_and_changes_nothing(request, family):
    """Prompts behind a common prefix: HF's tokens, and the hidden states of a run that
    does not share the prefix."""
    model, hf_model = request.getfixturevalue(family)
    batch = prompts_with_shared_prefix()
    shared = generate(model, batch, max_new_tokens=24, eos_ids=[2], return_hidden_states=True)
    alone = generate(
        model, batch, max_new_tokens=24, eos_ids=[2], return_hidden_states=True, share_prefix=False
    )
    np.testing.assert_array_equal(shared.tokens, hf_greedy(hf_model, batch, 24, [2]))
    np.testing.assert_array_equal(shared.tokens, alone.tokens)
    expected = np.asarray(alone.hidden_states)  # the prefix's sums split in another order
    bound = hidden_bound(expected, positions=9 + max(PROMPT_LENGTHS) + 24)
    np.testing.assert_allclose(np.asarray(shared.hidden_states), expected, atol=bound, rtol=0)
    assert len(set(map(tuple, shared.tokens.tolist()))) == 4


def prompts_of_mixed_lengths():
    """8 prompts behind a 20-token prefix; their own parts (1-30 tokens) need 32 of the
    44 columns left after it, and 6 of them only 16: prefill groups skip padding."""
    rs = np.random.RandomState(7)
    prefix = rs.randint(3, 320, 20).tolist()
    return [prefix + rs.randint(3, 320, n).tolist() for n in (13, 3, 30, 1, 25, 6, 2, 9)]


def test_prefill_groups_and_shared_prefix_change_nothing(tiny_qwen2_dir, qwen2):
    """Rows sorted by length and prefilled in groups, each over its own width, with or
    without the shared prefix, on one device or a mesh: the plain prefill's results."""
    model, hf_model = qwen2
    batch = prompts_of_mixed_lengths()
    run = lambda m, **kw: generate(  # noqa: E731
        m, batch, max_new_tokens=12, eos_ids=[2], return_hidden_states=True, **kw
    )
    plain = run(model, share_prefix=False, prefill_groups=1)
    np.testing.assert_array_equal(plain.tokens, hf_greedy(hf_model, batch, 12, [2]))
    mesh_model = load_pretrained(tiny_qwen2_dir, mesh=sharding.make_mesh("data=4,tensor=2"))
    variants = {
        "prefix, one group": run(model, prefill_groups=1),
        "prefix, 3 groups": run(model, prefill_groups=3),
        "no prefix, 4 groups": run(model, share_prefix=False),
        "prefix, a group per row": run(model, prefill_groups=8),
        "prefix, mesh": run(mesh_model),
    }
    expected = np.asarray(plain.hidden_states)
    bound = hidden_bound(expected, positions=20 + 30 + 12)  # prefix, longest prompt, tokens
    for name, result in variants.items():
        np.testing.assert_array_equal(result.tokens, plain.tokens, err_msg=name)
        np.testing.assert_allclose(
            np.asarray(result.hidden_states), expected, atol=bound, rtol=0, err_msg=name
        )


def test_length_groups():
    prompts_ = [[0] * n for n in (9, 4, 30, 6)]
    groups = length_groups(prompts_, count=2, prefix_len=2, width=32, multiple=8)
    assert [(rows.tolist(), width) for rows, width in groups] == [([1, 3], 8), ([0, 2], 30)]
    one = length_groups(prompts_, count=1, prefix_len=0, width=32, multiple=16)
    assert [(rows.tolist(), width) for rows, width in one] == [([0, 1, 2, 3], 32)]
    # groups would skip under 10% of the padded tokens: one group, in row order
    close = length_groups(
        [[0] * n for n in (30, 29, 31, 20)], count=2, prefix_len=0, width=32, multiple=8
    )
    assert [(rows.tolist(), width) for rows, width in close] == [([0, 1, 2, 3], 32)]


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_mesh_generation_equals_single_device(tiny_qwen2_dir, qwen2, shared_prefix):
    model, _ = qwen2
    batch = (prompts_with_shared_prefix() if shared_prefix else prompts()) * 2
    # batch 8 splits over data=2 x fsdp=2
    single = generate(model, batch, max_new_tokens=16, eos_ids=[2])
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    sharded = generate(
        load_pretrained(tiny_qwen2_dir, mesh=mesh), batch, max_new_tokens=16, eos_ids=[2]
    )
    np.testing.assert_array_equal(sharded.tokens, single.tokens)


def test_sampling_is_reproducible_and_key_dependent(qwen2):
    model, _ = qwen2
    batch = prompts()
    run = lambda seed, **kw: (
        generate(
            model,
            batch,
            max_new_tokens=16,
            eos_ids=[2],
            temperature=1.0,
            rng=jax.random.key(seed),
            **kw,
        ).tokens
    )
    np.testing.assert_array_equal(run(0), run(0))
    assert (run(0) != run(1)).mean() > 0.5
    greedy = generate(model, batch, max_new_tokens=16, eos_ids=[2]).tokens
    np.testing.assert_array_equal(run(3, top_k=2, top_p=1e-6), greedy)


# --- the sampler against numpy formulas --------------------------------------

LOGITS_V = np.array([2.0, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -3.0], np.float32)
N_DRAWS = 20000


@jax.jit(static_argnames=("temperature", "top_k", "top_p"))
def _draws(logits_nv, key, temperature, top_k, top_p):
    return sample_logits(logits_nv, key, temperature=temperature, top_k=top_k, top_p=top_p)


def empirical(temperature, top_k=None, top_p=None):
    logits_nv = np.broadcast_to(LOGITS_V, (N_DRAWS, LOGITS_V.size))
    draws = _draws(logits_nv, jax.random.key(0), temperature, top_k, top_p)
    return np.bincount(np.asarray(draws), minlength=LOGITS_V.size) / N_DRAWS


def reference(temperature, top_k=None, top_p=None):
    """softmax(logits / T), then top-k, renormalise, then the smallest top-p prefix."""
    probs = np.exp(LOGITS_V.astype(np.float64) / temperature)
    order = np.argsort(-probs)
    if top_k is not None:
        probs[order[top_k:]] = 0.0
    probs /= probs.sum()
    if top_p is not None:
        mass_before = np.cumsum(probs[order]) - probs[order]
        probs[order[mass_before >= top_p]] = 0.0
    return probs / probs.sum()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (0.5, None, None), (1.0, 3, None), (1.0, None, 0.7), (2.0, 5, 0.8)],
)
def test_sampler_frequencies_match_numpy_reference(temperature, top_k, top_p):
    freq, ref = empirical(temperature, top_k, top_p), reference(temperature, top_k, top_p)
    assert np.abs(freq - ref).max() < 0.015  # ~4 standard errors at 20k draws
    assert (freq[ref == 0] == 0).all()


def test_greedy_sampler_is_argmax():
    logits = np.random.RandomState(0).randn(5, 50).astype(np.float32)
    logits[1, [7, 30]] = logits[1].max() + 1.0  # a tie: the first wins, as in numpy
    logits[2, [9, 40]] = np.nan  # NaN counts as the maximum, as in np.argmax
    logits[3, [11, 20]] = np.inf
    ids = jax.jit(lambda z: sample_logits(z, None, temperature=1.0, greedy=True))(logits)
    assert ids.dtype == jnp.int32
    np.testing.assert_array_equal(ids, np.argmax(logits, axis=-1))
    assert ids.tolist()[1:4] == [7, 9, 11]


def test_bad_arguments_raise_clear_errors(qwen2):
    model, _ = qwen2
    ok = prompts()
    cases = [
        (dict(prompt_ids=[[1, 2], []]), "at least one token"),
        (dict(prompt_ids=[]), "at least one token"),
        (dict(prompt_ids=[[1, 320]]), "token id 320 is outside"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(eos_ids=[]), "eos_ids is empty"),
        (dict(temperature=0.7), "explicit rng"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=1.0, rng=jax.random.key(0), top_k=0), "top_k"),
        (dict(temperature=1.0, rng=jax.random.key(0), top_p=1.5), "top_p"),
    ]
    for change, message in cases:
        kwargs = dict(prompt_ids=ok, max_new_tokens=4, eos_ids=[2]) | change
        with pytest.raises(ValueError, match=message):
            generate(model, kwargs.pop("prompt_ids"), **kwargs)
