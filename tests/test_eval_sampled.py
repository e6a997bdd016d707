"""Sampled and contrastive `w2s eval`: pass@k, maj@N, clustered intervals, resume, compare."""

import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from w2s_jax import cli, stats
from w2s_jax.compare import CompareSettings, compare
from w2s_jax.eval_sampled import majority_vote, summarize_samples
from w2s_jax.evaluate import EvalSettings, run_eval

QUESTIONS = [f"Tom has {i} apples and buys {i + 3} more. How many apples?" for i in range(3)]


def _data(path):
    rows = [{"id": f"q{i}", "question": q, "answer": f"#### {i}"} for i, q in enumerate(QUESTIONS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


# --- statistics -------------------------------------------------------------------------


def _brute_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_the_combinatorial_definition():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert stats.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k))
    assert stats.pass_at_k(200, 3, 1) == pytest.approx(3 / 200)
    assert stats.pass_at_k(200, 3, 100) == pytest.approx(
        1 - math.comb(197, 100) / math.comb(200, 100)
    )
    for bad in [(4, 1, 5), (4, 5, 1), (4, 1, 0)]:
        with pytest.raises(ValueError, match="pass@k needs"):
            stats.pass_at_k(*bad)


def test_clustered_interval_is_wider_when_samples_of_a_question_agree():
    # 10 questions x 4 samples, 20 correct: all-or-nothing per question vs spread evenly
    clumped = stats.clustered_mean_interval([4] * 5 + [0] * 5, [4] * 10)
    spread = stats.clustered_mean_interval([2] * 10, [4] * 10)
    assert clumped[0] == spread[0] == 0.5
    assert spread[1:] == (0.5, 0.5)  # no variation between questions
    # hand-computed: se = sqrt(10/9 * 10 * 2^2) / 40
    half = 1.959964 * math.sqrt(10 / 9 * 40) / 40
    assert clumped[1:] == pytest.approx((0.5 - half, 0.5 + half), abs=1e-6)
    assert stats.clustered_mean_interval([1], [3]) == (1 / 3, 0.0, 1.0)
    with pytest.raises(ValueError):
        stats.clustered_mean_interval([5], [4])


def test_majority_vote_groups_equivalent_answers_and_breaks_ties_by_first_seen():
    assert majority_vote(["3", "4", "4", "3"]) == 0  # 2-2 tie: the group seen first
    assert majority_vote(["4", "3", "3", "4"]) == 0
    assert majority_vote(["5", None, "4", "4.0"]) == 2  # graded-equivalent: 4 == 4.0
    assert majority_vote(["\\frac{1}{2}", "7", "0.5"]) == 0
    assert majority_vote(["10", "1000", "1000"]) == 1  # no percent match between answers
    assert majority_vote([None, None]) is None
    rows = [
        [{"id": "a", "answer": a, "correct": a == "4"} for a in ("4", "5", "5")],
        [{"id": "b", "answer": a, "correct": a == "4"} for a in (None, "4", "3")],
    ]
    summary = summarize_samples(rows)
    assert summary["pass_at_k"] == pytest.approx({"1": 1 / 3, "2": 2 / 3, "3": 1.0})
    assert summary["maj_at_n_text"] == "50.0% (1/2)"  # a: 5 wins; b: tie 4-3, 4 first
    assert summary["mean_accuracy"] == pytest.approx(1 / 3)


# --- runs -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory, tiny_qwen2_dir):
    root = tmp_path_factory.mktemp("sampled")
    settings = EvalSettings(
        model=str(tiny_qwen2_dir),
        data=_data(root / "data.jsonl"),
        max_new_tokens=12,
        samples=3,
        temperature=1.0,
        top_p=0.95,
        seed=5,
        progress=False,
    )
    summary = run_eval(replace(settings, out=str(root / "run"), batch_size=4))
    return settings, root, summary


def test_a_sampled_run_reports_pass_at_k_maj_and_resumes_per_sample(sampled_run, tmp_path):
    settings, root, summary = sampled_run
    rows = _rows(root / "run")
    assert [(r["id"], r["sample"]) for r in rows] == [
        (f"q{i}", j) for i in range(3) for j in range(3)
    ]
    assert len({r["output"] for r in rows}) > 3, "samples should differ"
    correct = [sum(r["correct"] for r in rows[3 * i : 3 * i + 3]) for i in range(3)]
    assert summary["pass_at_k"]["1"] == pytest.approx(sum(correct) / 9)
    assert summary["pass_at_k"]["3"] == pytest.approx(sum(c > 0 for c in correct) / 3)
    assert summary["accuracy"] == pytest.approx(sum(correct) / 9)
    recorded = json.loads((root / "run" / "run.json").read_text())
    assert (recorded["decoding"], recorded["samples"], recorded["seed"]) == ("sampling", 3, 5)
    # other batches, and a run killed after its first shard and resumed: the same answers
    out = tmp_path / "resumed"
    run_eval(replace(settings, out=str(out), batch_size=2))
    for shard in sorted((out / "shards").glob("part-*.jsonl"))[1:]:
        shard.unlink()
    (out / "predictions.jsonl").unlink()
    run_eval(replace(settings, out=str(out), batch_size=5))
    assert [r["output"] for r in _rows(out)] == [r["output"] for r in rows]
    other_seed = tmp_path / "seed6"
    run_eval(replace(settings, out=str(other_seed), seed=6, batch_size=9))
    assert [r["output"] for r in _rows(other_seed)] != [r["output"] for r in rows]


def test_compare_pairs_a_sampled_run_with_a_greedy_one(sampled_run, tmp_path):
    settings, root, summary = sampled_run
    greedy = tmp_path / "greedy"
    run_eval(replace(settings, out=str(greedy), samples=1, temperature=None, top_p=None))
    report = compare(
        CompareSettings(runs=(str(greedy), str(root / "run")), out=str(tmp_path / "cmp"))
    )
    base, sampled = report["runs"]
    assert (base["samples"], sampled["samples"]) == (1, 3)
    share = [
        np.mean([r["correct"] for r in _rows(root / "run") if r["id"] == f"q{i}"]) for i in range(3)
    ]
    greedy_correct = [r["correct"] for r in _rows(greedy)]
    assert sampled["vs_first"]["diff"] == pytest.approx(np.mean(share) - np.mean(greedy_correct))
    assert sampled["vs_first"]["mcnemar_p_exact"] is None
    assert sampled["accuracy_ci95"] == summary["accuracy_ci95"]
    assert "maj@N" in report["table"] and "(N=3)" in report["table"]


def test_contrastive_eval_records_its_settings(tmp_path, tiny_qwen2_dir, tiny_qwen2_amateur_dir):
    data = _data(tmp_path / "data.jsonl")
    common = dict(model=str(tiny_qwen2_dir), data=data, max_new_tokens=8, progress=False)
    greedy = run_eval(EvalSettings(out=str(tmp_path / "greedy"), **common))
    # a folder recorded before these settings existed resumes as the greedy run it was
    run_json = tmp_path / "greedy" / "run.json"
    recorded = json.loads(run_json.read_text())
    for key in ("decoding", "amateur", "samples", "temperature", "top_p", "seed", "cd_alpha"):
        recorded.pop(key)
    run_json.write_text(json.dumps(recorded))
    resumed = run_eval(EvalSettings(out=str(tmp_path / "greedy"), **common))
    assert resumed["accuracy_text"] == greedy["accuracy_text"]
    # the expert as its own amateur decodes its greedy tokens
    itself = EvalSettings(
        out=str(tmp_path / "itself"), decoding="contrastive", amateur=str(tiny_qwen2_dir), **common
    )
    run_eval(itself)
    assert _rows(tmp_path / "itself") == _rows(tmp_path / "greedy")
    code = cli.main(
        ["eval", "--model", str(tiny_qwen2_dir), "--data", data, "--out", str(tmp_path / "cd")]
        + ["--max-new-tokens", "8", "--no-progress", "--decoding", "contrastive"]
        + ["--amateur", str(tiny_qwen2_amateur_dir), "--cd-alpha", "0.05", "--cd-beta", "1"]
    )
    assert code == 0
    recorded = json.loads((tmp_path / "cd" / "run.json").read_text())
    assert {k: recorded[k] for k in ("decoding", "cd_alpha", "cd_beta", "cd_form")} == {
        "decoding": "contrastive",
        "cd_alpha": 0.05,
        "cd_beta": 1.0,
        "cd_form": "weighted",
    }
    assert recorded["amateur"] == str(tiny_qwen2_amateur_dir) and recorded["amateur_weights"]
    assert greedy["total"] == 3


def test_an_amateur_with_another_tokenizer_is_refused(tmp_path, tiny_qwen2_dir):
    from tiny_checkpoints import make_tiny_model, make_tiny_tokenizer

    make_tiny_tokenizer(tmp_path / "tok", vocab_size=280)
    make_tiny_model(tmp_path / "other", tokenizer_folder=tmp_path / "tok", hidden_size=32)
    settings = EvalSettings(
        model=str(tiny_qwen2_dir),
        data=_data(tmp_path / "data.jsonl"),
        out=str(tmp_path / "out"),
        decoding="contrastive",
        amateur=str(tmp_path / "other"),
    )
    with pytest.raises(ValueError, match="different tokenizers"):
        run_eval(settings)
    assert not (tmp_path / "out" / "run.json").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--decoding", "contrastive", "--amateur", "A", "--cd-alpha", "0"], "--cd-alpha must lie"),
        (["--decoding", "contrastive", "--amateur", "A", "--cd-alpha", "1.5"], "--cd-alpha must"),
        (["--decoding", "contrastive"], "needs --amateur"),
        (["--cd-beta", "1"], "--cd-beta applies to --decoding contrastive"),
        (["--samples", "4"], "--samples 4 needs sampled decoding"),
        (["--decoding", "greedy", "--temperature", "0.5"], "--temperature and --top-p apply"),
        (["--decoding", "sampling", "--temperature", "0"], "needs --temperature > 0"),
        (["--temperature", "0.7", "--top-p", "0"], "--top-p must lie"),
    ],
)
def test_bad_decoding_flags_give_clear_errors(tmp_path, flags, message):
    argv = ["eval", "--model", "M", "--data", "D", "--out", str(tmp_path / "o")] + flags
    with pytest.raises(SystemExit, match=message):
        cli.main(argv)


def test_the_qwen25_math_protocol_sets_and_records_its_settings(tmp_path):
    from w2s_jax.prompts import EVAL_SYSTEM_PROMPT
    from w2s_jax.settings import record

    settings = EvalSettings(model="M", data="D", protocol="qwen25-math")
    recorded = record(settings)  # what run.json keeps (besides the free fields)
    assert {k: recorded[k] for k in ("protocol", "max_new_tokens", "decoding")} == {
        "protocol": "qwen25-math",
        "max_new_tokens": 2048,
        "decoding": "greedy",
    }
    assert (settings.system_prompt, settings.prompt_style) == (EVAL_SYSTEM_PROMPT, "chat")
    assert EvalSettings(model="M", data="D", protocol="qwen25-math", max_new_tokens=2048)
    base = ["eval", "--model", "M", "--data", "D", "--out", str(tmp_path), "--protocol"]
    for flags, message in [
        (["--max-new-tokens", "256"], "sets --max-new-tokens 2048; got 256"),
        (["--decoding", "sampling"], "sets --decoding 'greedy'; got 'sampling'"),
        (["--prompt-style", "plain"], "sets --prompt-style 'chat'"),
    ]:
        with pytest.raises(SystemExit, match=message):
            cli.main(base + ["qwen25-math"] + flags)
