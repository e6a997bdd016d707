"""One rule for padded vocabulary rows: never generated, never a target, never in a KL.

The tiny Qwen2 checkpoint has 320 output rows for a 300-token tokenizer, as Qwen2.5
has 151,936 rows for 151,665 tokens. Its padded rows are scaled up here so that an
unrestricted model would pick them: each test first shows that it does.
"""

import json
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_generate import hf_greedy
from transformers import AutoModelForCausalLM

from w2s_jax import divergence as dv
from w2s_jax.evaluate import EvalSettings, run_eval
from w2s_jax.generate import generate
from w2s_jax.models import load_pretrained, load_tokenizer

TOKENS, ROWS = 300, 320


@pytest.fixture(scope="module")
def loud_padding_dir(tmp_path_factory, tiny_qwen2_dir):
    """The tiny Qwen2 with its padded embedding rows (tied LM head) scaled by 4."""
    folder = tmp_path_factory.mktemp("loud_padding")
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    with torch.no_grad():
        hf.model.embed_tokens.weight[TOKENS:] *= 4.0
    hf.save_pretrained(folder)
    load_tokenizer(tiny_qwen2_dir).save_pretrained(str(folder))
    return folder


def _prompts():
    rs = np.random.RandomState(0)
    return [rs.randint(3, TOKENS, n).tolist() for n in (5, 9, 3, 12)]


def test_generation_never_emits_a_padded_id(loud_padding_dir):
    model = load_pretrained(loud_padding_dir)
    batch = _prompts()
    free = generate(model, batch, max_new_tokens=12, eos_ids=[ROWS + 1]).tokens
    assert (free >= TOKENS).any()  # unrestricted, the padded rows win somewhere
    model.restrict_vocab(TOKENS)
    tokens = generate(model, batch, max_new_tokens=12, eos_ids=[ROWS + 1]).tokens
    assert (tokens < TOKENS).all()
    # Reference: HF greedy with the padded ids suppressed (logit -inf).
    hf = AutoModelForCausalLM.from_pretrained(loud_padding_dir)
    expected = hf_greedy(hf, batch, 12, [ROWS + 1], suppress_tokens=list(range(TOKENS, ROWS)))
    np.testing.assert_array_equal(tokens, expected)
    logits = model.logits(jnp.ones((2, model.config.hidden_size)))
    assert logits.shape == (2, ROWS) and np.isneginf(np.asarray(logits[:, TOKENS:])).all()


def test_eval_never_emits_a_padded_id(loud_padding_dir, tmp_path):
    questions = [f"Sam has {i} pens and buys {i + 2} more. How many pens?" for i in range(3)]
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "answer": "#### 5"}) + "\n" for q in questions)
    )
    settings = EvalSettings(model=str(loud_padding_dir), data=str(data), max_new_tokens=10)
    run_eval(replace(settings, out=str(tmp_path / "run"), batch_size=3, progress=False))
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").open()]
    tokenizer = load_tokenizer(loud_padding_dir)
    hf = AutoModelForCausalLM.from_pretrained(loud_padding_dir)
    saw_padded = False
    for row in rows:
        text = tokenizer.apply_chat_template(
            [
                {"role": "system", "content": settings.system_prompt},
                {"role": "user", "content": row["question"]},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        generated = []
        with torch.no_grad():
            for _ in range(settings.max_new_tokens):
                logits = hf(torch.tensor([ids + generated])).logits[0, -1]
                saw_padded |= int(logits.argmax()) >= TOKENS
                generated.append(int(logits[:TOKENS].argmax()))
                if generated[-1] in (0, 2):
                    break
        assert row["num_tokens"] == len(generated)
        assert row["output"] == tokenizer.decode(generated, skip_special_tokens=True)
    assert saw_padded  # the unrestricted reference would have emitted padded ids


def test_fused_loss_ignores_padded_rows_like_a_float64_softmax_over_real_ids():
    rng = np.random.default_rng(0)
    hidden_pd = rng.normal(size=(6, 8))
    head_dv = rng.normal(size=(8, 20))
    head_dv[:, 15:] *= 6.0  # loud padded rows 15..19
    ids_pk = rng.integers(0, 15, size=(6, 3))
    weights_pk = rng.dirichlet(np.ones(3), size=6)
    mask_p = np.array([1, 1, 0, 1, 1, 1], bool)
    z = hidden_pd @ head_dv
    z = z[:, :15] - z[:, :15].max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    per_position = -(weights_pk * np.take_along_axis(log_p, ids_pk, -1)).sum(-1)
    expected = per_position[mask_p].mean()
    args = [jnp.asarray(a, jnp.float32) for a in (hidden_pd, head_dv)]
    loss = dv.fused_contrastive_loss(
        *args, ids_pk, jnp.asarray(weights_pk, jnp.float32), mask_p, chunk_size=4, vocab_size=15
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    unmasked = dv.fused_contrastive_loss(
        *args, ids_pk, jnp.asarray(weights_pk, jnp.float32), mask_p, chunk_size=4
    )
    assert abs(float(unmasked) - expected) > 1e-2  # the padded rows would change the loss
    grads = jax.grad(
        lambda h: dv.fused_contrastive_loss(
            h, args[1], ids_pk, weights_pk, mask_p, chunk_size=4, vocab_size=15
        )
    )(args[0])
    assert np.isfinite(np.asarray(grads)).all()
    with pytest.raises(ValueError, match="vocab_size 21 exceeds"):
        dv.fused_contrastive_loss(*args, ids_pk, weights_pk, mask_p, chunk_size=4, vocab_size=21)


def test_restrict_vocab_checks_its_range(tiny_qwen2_dir):
    model = load_pretrained(tiny_qwen2_dir)
    with pytest.raises(ValueError, match="token count 321 must be in"):
        model.restrict_vocab(ROWS + 1)
