"""Sampling with an amateur of another tokenizer, against HF transformers (PyTorch, float64).

The reference scores the amateur on its OWN tokens (its chat prompt + the completion's
text in its tokens) and moves its distribution onto expert ids by hand, then applies
docs/METHOD.md §1 in numpy; positions are matched by the alignment (tested by hand in
tests/test_token_alignment.py).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from tolerances import reordered_sum_bound

from w2s_jax.prompts import SAMPLE_SYSTEM_PROMPT, prompt_ids

QUESTIONS = [
    "how many apples does Tom have if he has 3 boxes of 4 apples",
    "what is the total cost of 3 books and 4 pens",
    "sum of 1234 and 4321",
]
ALPHA, TOP_K = 0.2, 4


@pytest.fixture(scope="module")
def amateur_dir(tmp_path_factory):
    """A tiny Qwen2 amateur whose tokenizer differs: trained with digit splitting, 280
    tokens, four special tokens (<|pad|> first), so even the special ids differ."""
    from tiny_checkpoints import _training_corpus, make_tiny_model

    from w2s_jax.data.toy_tokenizer import save_tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("cross_amateur")
    save_tokenizer(train_tokenizer(_training_corpus(), vocab_size=280), folder)
    make_tiny_model(
        folder,
        tokenizer_folder=folder,
        vocab_size=288,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        initializer_range=0.2,
        seed=1,
    )
    return folder


COMPLETIONS = [  # teacher-forced "rollouts": real text, so most positions can align
    "There are 3 boxes of 4 apples, so Tom has 12 apples. The answer is \\boxed{12}.",
    "3 books cost 21 coins and 4 pens cost 8, so the total is 29. Café: \\boxed{29}.",
    "1234 plus 4321 is 5555; the sum is \\boxed{5555}",
]


@pytest.fixture(scope="module")
def scored(tiny_qwen2_dir, amateur_dir):
    """Expert completions (text + end of turn) scored by `CrossScorer` in both
    unmapped-mass modes; the expert's hidden states from a teacher-forced pass."""
    import jax

    from w2s_jax.cross_scoring import CrossScorer, TokenizerPair
    from w2s_jax.generate import left_pad, prefill
    from w2s_jax.models import load_pretrained, load_tokenizer
    from w2s_jax.sampling import teacher_forced_inputs

    expert_tok, amateur_tok = load_tokenizer(tiny_qwen2_dir), load_tokenizer(amateur_dir)
    pair = TokenizerPair.build(expert_tok, amateur_tok)
    fmt = dict(style="chat", system_prompt=SAMPLE_SYSTEM_PROMPT)
    prompts = [prompt_ids(expert_tok, q, **fmt) for q in QUESTIONS]
    amateur_prompts = [prompt_ids(amateur_tok, q, **fmt) for q in QUESTIONS]
    rows = [expert_tok(c, add_special_tokens=False)["input_ids"] for c in COMPLETIONS]
    rows[0].append(expert_tok.eos_token_id)  # an end of turn, mapped by role
    lengths = np.array([len(r) for r in rows], np.int32)
    completion = np.full((len(rows), 64), expert_tok.pad_token_id, np.int32)
    for b, r in enumerate(rows):
        completion[b, : len(r)] = r
    expert = load_pretrained(tiny_qwen2_dir, dtype="float32")
    amateur = load_pretrained(amateur_dir, dtype="float32")
    expert.restrict_vocab(len(expert_tok))
    amateur.restrict_vocab(len(amateur_tok))
    prompt_bp, prompt_mask = left_pad(prompts, expert_tok.pad_token_id)
    ids, mask, _ = teacher_forced_inputs(prompt_bp, prompt_mask, completion, lengths)
    hidden = jax.jit(lambda m, i, k: prefill(m, i, k)[0])(expert, ids, mask)
    expert_btd = hidden[:, prompt_bp.shape[1] - 1 :]
    scores = {}
    for mode, select in (("renormalize", True), ("residual", True), ("renormalize", False)):
        config = types.SimpleNamespace(
            alpha=ALPHA, beta=0.0, top_k=TOP_K, chunk_size=16, select=select, unmapped_mass=mode
        )
        scorer = CrossScorer(expert, amateur, pair, config=config)
        scores[mode, select] = scorer(amateur_prompts, completion, lengths, expert_btd)
    return {
        "pair": pair,
        "prompts": prompts,
        "amateur_prompts": amateur_prompts,
        "completion": completion,
        "lengths": lengths,
        "scores": scores,
        "tokenizers": (expert_tok, amateur_tok),
    }


def _reference_rows(expert_lp, amateur_lp, a2e, mode):
    """KL, targets, mapped mass, has-target by docs/METHOD.md §1 over expert ids, float64;
    the amateur's distribution moved onto expert ids by a loop over its ids."""
    pa = np.exp(amateur_lp)
    moved = np.zeros(expert_lp.shape[-1])
    residual = 0.0
    for a, e in enumerate(a2e):
        if e >= 0:
            moved[e] += pa[a]
        else:
            residual += pa[a]
    mapped = np.zeros(expert_lp.shape[-1], bool)
    mapped[a2e[a2e >= 0]] = True
    pe = np.exp(expert_lp)
    if mode == "renormalize":
        p, q = np.where(mapped, pe, 0.0), moved
        p, q = p / p.sum(), q / q.sum()
    else:
        p = np.append(np.where(mapped, pe, 0.0), pe[~mapped].sum())
        q = np.append(moved, max(residual, np.finfo(np.float32).tiny))
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 log 0 terms, dropped by where
        kl = float(np.sum(np.where(p > 0, p * np.log(p / q), 0.0)))
    plausible = pe >= ALPHA * pe.max()
    log_q = np.log(np.where(moved > 0, moved, 1e-300))
    if mode == "renormalize":
        candidates = plausible & mapped
    else:
        candidates = plausible
        log_q = np.where(mapped, log_q, np.log(max(residual, np.finfo(np.float32).tiny)))
    score = np.where(candidates, expert_lp - log_q, -np.inf)
    if not candidates.any():
        return kl, None, None, 1 - residual, False
    order = np.argsort(-score, kind="stable")[: min(TOP_K, candidates.sum())]
    weights = np.exp(score[order] - score[order].max())
    return kl, order, weights / weights.sum(), 1 - residual, True


@pytest.fixture(scope="module")
def reference(scored, tiny_qwen2_dir, amateur_dir):
    """Per (row, position): float64 log-probs of expert and amateur from HF PyTorch."""
    import torch
    from transformers import AutoModelForCausalLM

    expert_tok, amateur_tok = scored["tokenizers"]
    expert = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir)).eval().double()
    amateur = AutoModelForCausalLM.from_pretrained(str(amateur_dir)).eval().double()
    rows = []
    with torch.no_grad():
        for b, n in enumerate(scored["lengths"]):
            completion = scored["completion"][b, :n].tolist()
            alignment = scored["pair"].align(completion)
            prompt, a_prompt = scored["prompts"][b], scored["amateur_prompts"][b]
            e = expert(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 :]
            a_ids = a_prompt + alignment.amateur_ids
            a = amateur(torch.tensor([a_ids])).logits[0, len(a_prompt) - 1 :]
            e = torch.log_softmax(e[:, : len(expert_tok)], -1).numpy()
            a = torch.log_softmax(a[:, : len(amateur_tok)], -1).numpy()
            rows.append((alignment, e, a))
    return rows


@pytest.mark.parametrize("mode", ["renormalize", "residual"])
def test_kl_and_targets_equal_hf_on_the_amateurs_own_tokens(scored, reference, mode):
    scores = scored["scores"][mode, True]
    a2e = scored["pair"].vocab_map.amateur_to_expert
    checked = 0
    for b, (alignment, expert_lp, amateur_lp) in enumerate(reference):
        n = int(scored["lengths"][b])
        np.testing.assert_array_equal(scores["aligned"][b, :n], alignment.columns >= 0)
        for t in np.flatnonzero(alignment.columns >= 0):
            j = alignment.columns[t]
            kl, ids, weights, mass, has = _reference_rows(expert_lp[t], amateur_lp[j], a2e, mode)
            np.testing.assert_allclose(scores["kl"][b, t], kl, rtol=2e-4, atol=2e-5)
            np.testing.assert_allclose(scores["mapped_mass"][b, t], mass, rtol=1e-5, atol=1e-6)
            assert bool(scores["valid"][b, t]) == has
            if has:
                m = len(ids)
                got = scores["target_weights"][b, t, :m]
                np.testing.assert_allclose(got, weights, rtol=2e-4, atol=2e-5)
                big = weights > 1e-3  # ties among negligible weights may order either way
                np.testing.assert_array_equal(scores["target_ids"][b, t, :m][big], ids[big])
            checked += 1
    assert checked >= 40


def test_amateur_tokens_are_the_completion_text_encoded_once(scored):
    expert_tok, amateur_tok = scored["tokenizers"]
    for b, n in enumerate(scored["lengths"]):
        completion = scored["completion"][b, :n].tolist()
        text_ids = [i for i in completion if i not in expert_tok.all_special_ids]
        if len(text_ids) < len(completion) - 1:
            continue  # a special token inside the rollout: several segments
        text = expert_tok.decode(text_ids)
        expected = amateur_tok(text, add_special_tokens=False)["input_ids"]
        got = scored["pair"].align(completion).amateur_ids
        assert got[: len(expected)] == expected


def test_unaligned_positions_are_never_selected(scored):
    lengths = scored["lengths"]
    inside = np.arange(scored["completion"].shape[1])[None, :] < lengths[:, None]
    for (_mode, select), scores in scored["scores"].items():
        unaligned = inside & ~scores["aligned"]
        assert unaligned.any() and (inside & scores["aligned"]).any()  # both kinds occur
        assert not (scores["selected"] & ~scores["aligned"]).any()
        assert not (scores["selected"] & ~scores["valid"]).any()
        assert np.isnan(scores["kl"][unaligned]).all()
        if not select:  # --no-select keeps every valid position, and only those
            np.testing.assert_array_equal(scores["selected"], scores["valid"])


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory):
    from w2s_jax.files import atomic_write_jsonl

    path = tmp_path_factory.mktemp("cross_questions") / "q.jsonl"
    atomic_write_jsonl(path, [{"id": f"q{i}", "question": q} for i, q in enumerate(QUESTIONS)])
    return path


def _argv(expert, amateur, data, out, *extra):
    argv = ["sample", "--expert", expert, "--amateur", amateur, "--data", data, "--out", out]
    argv += ["--batch-size", "4", "--max-new-tokens", "12", "--beta", "0.0", "--top-k", "4"]
    return [str(a) for a in [*argv, *extra]]


def test_w2s_sample_end_to_end_reports_alignment_and_coverage(
    tmp_path, tiny_qwen2_dir, amateur_dir, questions_file, capsys
):
    import json

    from w2s_jax import sample_store
    from w2s_jax.cli import main
    from w2s_jax.models import load_tokenizer
    from w2s_jax.vocab_map import build_vocab_map

    out = tmp_path / "out"
    assert main(_argv(tiny_qwen2_dir, amateur_dir, questions_file, out)) == 0
    records = list(sample_store.read_samples(out))
    assert len(records) == len(QUESTIONS)
    nulls = sum(v is None for r in records for v in r["kl"])
    numbers = sum(v is not None for r in records for v in r["kl"])
    assert nulls and numbers  # random rollouts: some bytes align, invalid UTF-8 does not
    for r in records:
        assert all(r["kl"][t] is not None for t in r["positions"])
    summary = json.loads((out / "summary.json").read_text())
    cross = summary["cross_tokenizer"]
    assert cross["aligned_positions"] == numbers
    assert cross["aligned_share"] == pytest.approx(numbers / (numbers + nulls))
    assert cross["unmapped_mass"] == "residual"
    assert 0 < cross["mapped_mass"]["p10"] <= cross["mapped_mass"]["p50"] <= 1
    # The coverage, recomputed independently of the run.
    expert_tok, amateur_tok = load_tokenizer(tiny_qwen2_dir), load_tokenizer(amateur_dir)
    vm = build_vocab_map(expert_tok, amateur_tok)
    encoded = [expert_tok(q, add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    assert cross["coverage"] == vm.coverage(encoded)
    assert f"{cross['aligned_share']:.1%} of positions aligned" in capsys.readouterr().out
    manifest = sample_store.read_manifest(out)
    assert manifest["settings"]["unmapped_mass"] == "residual"
    assert "amateur_tokenizer_fingerprint" in manifest["settings"]

    # A resume with another amateur tokenizer (same weights) is refused before any compute.
    import shutil

    from tiny_checkpoints import _training_corpus

    from w2s_jax.data.toy_tokenizer import save_tokenizer, train_tokenizer

    other = tmp_path / "other_amateur"
    shutil.copytree(amateur_dir, other)
    save_tokenizer(train_tokenizer(_training_corpus(), vocab_size=270), other)
    with pytest.raises(SystemExit, match="amateur_tokenizer_fingerprint"):
        main(_argv(tiny_qwen2_dir, other, questions_file, out))


def test_low_coverage_is_refused_before_any_output(
    tmp_path, tiny_qwen2_dir, amateur_dir, questions_file
):
    from w2s_jax.cli import main

    out = tmp_path / "out"
    argv = _argv(tiny_qwen2_dir, amateur_dir, questions_file, out, "--min-vocab-coverage", "1")
    with pytest.raises(SystemExit, match=r"covers \d+\.\d% of the expert .* below --min-vocab"):
        main(argv)
    assert not out.exists()


def test_same_tokenizer_pair_keeps_the_old_path(
    tmp_path, tiny_qwen2_dir, tiny_qwen2_amateur_dir, questions_file
):
    from w2s_jax.stages.sample import plan
    from w2s_jax.stages.sample_settings import SampleSettings

    settings = SampleSettings(
        expert=str(tiny_qwen2_dir),
        amateur=str(tiny_qwen2_amateur_dir),
        data=str(questions_file),
        out=str(tmp_path / "out"),
    )
    the_plan = plan(settings)
    assert the_plan.cross is None  # sampling.Scorer, the fused same-vocabulary kernel
    assert "cross_tokenizer" not in the_plan.manifest
    assert not {"unmapped_mass", "min_vocab_coverage"} & set(the_plan.manifest["settings"])


def test_records_accept_null_kl_only_off_the_selected_positions():
    from w2s_jax.files import DataError
    from w2s_jax.records import SampleRecord

    good = {
        "id": "q",
        "prompt_ids": [1],
        "completion_ids": [5, 6, 7],
        "kl": [0.5, None, 1.0],
        "positions": [0, 2],
        "target_ids": [[5], [7]],
        "target_weights": [[1.0], [1.0]],
    }
    assert SampleRecord.from_json(good, where="s:1").kl == [0.5, None, 1.0]
    with pytest.raises(DataError, match="s:1: selected position 1 has a null kl"):
        SampleRecord.from_json(good | {"positions": [0, 1]}, where="s:1")


@pytest.mark.parametrize("mode", ["renormalize", "residual"])
def test_cross_vocab_math_on_random_logits(mode):
    """cross_kl_and_target against the float64 reference on peaky random logits and a
    random map with holes on both sides (unmapped plausible tokens occur); with the
    identity map it is token_kl and contrastive_target exactly."""
    from w2s_jax import divergence

    rng = np.random.default_rng(0)
    ve, va = 40, 30
    ze = (rng.normal(size=(64, ve)) * 3).astype(np.float32)
    za = (rng.normal(size=(64, va)) * 3).astype(np.float32)
    a2e = rng.integers(-1, ve, size=va).astype(np.int32)
    mapped = np.zeros(ve, bool)
    mapped[a2e[a2e >= 0]] = True
    kl, ids, weights, stats = divergence.cross_kl_and_target(
        ze, za, a2e, mapped, ALPHA, TOP_K, mode=mode
    )
    unmapped_plausible = 0
    for p in range(len(ze)):
        lpe = ze[p] - np.logaddexp.reduce(ze[p].astype(np.float64))
        lpa = za[p] - np.logaddexp.reduce(za[p].astype(np.float64))
        ref_kl, ref_ids, ref_w, mass, has = _reference_rows(lpe, lpa, a2e, mode)
        np.testing.assert_allclose(kl[p], ref_kl, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats["mapped_mass"][p], mass, rtol=1e-5, atol=1e-6)
        assert bool(stats["has_target"][p]) == has
        if has:
            np.testing.assert_allclose(weights[p, : len(ref_w)], ref_w, rtol=1e-4, atol=1e-5)
            np.testing.assert_array_equal(
                ids[p, : len(ref_ids)][ref_w > 1e-3], ref_ids[ref_w > 1e-3]
            )
        unmapped_plausible += bool(((np.exp(lpe) >= ALPHA * np.exp(lpe).max()) & ~mapped).any())
    assert unmapped_plausible >= 5
    same = (rng.normal(size=(64, ve)) * 3).astype(np.float32)
    identity = np.arange(ve, dtype=np.int32)
    kl, ids, weights, _ = divergence.cross_kl_and_target(
        ze, same, identity, identity >= 0, ALPHA, TOP_K, mode=mode
    )
    ref_ids, ref_weights = divergence.contrastive_target(ze, same, ALPHA, TOP_K)
    # other kernels, other orders: the two log-normalisers and the KL's (or the target's)
    # sum over ve = 40, at the scale of the KL plus that of probabilities (1)
    ref_kl = divergence.token_kl(ze, same)
    kl_bound = reordered_sum_bound(1 + np.abs(ref_kl).max(), terms=ve, reductions=3)
    np.testing.assert_allclose(kl, ref_kl, rtol=0, atol=kl_bound)
    np.testing.assert_array_equal(ids, ref_ids)
    weights_bound = reordered_sum_bound(1.0, terms=ve, reductions=3)
    np.testing.assert_allclose(weights, ref_weights, rtol=0, atol=weights_bound)
