"""`w2s eval` end to end on a tiny checkpoint: outputs, grading, resume, comparison, errors."""

import functools
import json
from dataclasses import replace

import numpy as np
import pytest

from w2s_jax import cli, stats
from w2s_jax.compare import CompareSettings, compare
from w2s_jax.evaluate import (
    EvalSettings,
    extract_answer,
    is_equiv,
    load_eval_questions,
    run_eval,
)
from w2s_jax.files import DataError
from w2s_jax.prompts import EVAL_SYSTEM_PROMPT, prompt_example, prompt_ids, stop_ids

MAX_NEW = 16
QUESTIONS = [f"Tom has {i} apples and buys {i + 3} more. How many apples?" for i in range(4)]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _gsm8k_data(path, golds):
    records = [
        {"id": f"q{i}", "question": q, "answer": f"Add them.\n#### {g}"}
        for i, (q, g) in enumerate(zip(QUESTIONS, golds, strict=True))
    ]
    return _write_jsonl(path, records)


def _read_rows(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_qwen2_dir):
    """An uninterrupted evaluation of the tiny Qwen2 on four GSM8K-shaped questions."""
    root = tmp_path_factory.mktemp("eval")
    data = _gsm8k_data(root / "data.jsonl", ["1,000"] * len(QUESTIONS))
    settings = EvalSettings(model=str(tiny_qwen2_dir), data=str(data), max_new_tokens=MAX_NEW)
    summary = run_eval(replace(settings, out=str(root / "run"), batch_size=2, progress=False))
    return settings, root, summary


@functools.cache
def _torch_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return tokenizer, AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


def _torch_greedy(model_dir, question):
    """Reference: the chat prompt written out by hand, decoded greedily by HF PyTorch over
    the tokenizer's ids (the checkpoint's padded rows are no tokens)."""
    import torch

    tokenizer, model = _torch_model(model_dir)
    text = (
        f"<|im_start|>system\n{EVAL_SYSTEM_PROMPT}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    generated = []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            logits = model(torch.tensor([ids + generated])).logits[0, -1, : len(tokenizer)]
            generated.append(int(logits.argmax()))
            if generated[-1] in (0, 2):  # <|endoftext|>, <|im_end|>
                break
    return tokenizer.decode(generated, skip_special_tokens=True), len(generated)


def test_outputs_match_pytorch_greedy_and_are_graded(first_run, tiny_qwen2_dir):
    settings, root, summary = first_run
    rows = _read_rows(root / "run")
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3"]
    for row, question in zip(rows, QUESTIONS, strict=True):
        output, length = _torch_greedy(tiny_qwen2_dir, question)
        assert row["question"] == question
        assert (row["output"], row["num_tokens"]) == (output, length)
        assert row["answer"] == extract_answer(output)
        assert row["gold"] == "1000"
        assert row["correct"] == is_equiv(row["answer"], "1000")
    assert summary["total"] == 4
    assert summary["correct"] == sum(r["correct"] for r in rows)
    assert summary["no_answer"] == sum(r["answer"] is None for r in rows)
    assert summary["mean_output_tokens"] == pytest.approx(np.mean([r["num_tokens"] for r in rows]))
    on_disk = json.loads((root / "run" / "summary.json").read_text())
    assert on_disk["accuracy_text"] == summary["accuracy_text"]
    recorded = json.loads((root / "run" / "run.json").read_text())
    assert recorded["prompt_example"] == (
        f"<|im_start|>system\n{EVAL_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_accuracy_counts_the_rows_graded_correct(first_run, tmp_path):
    settings, root, _ = first_run
    rows = _read_rows(root / "run")
    answered = [i for i, r in enumerate(rows) if r["answer"] is not None]
    assert answered, "the tiny model should write at least one number in 16 tokens"
    # gold = the model's own answer for the first answered question, a wrong one elsewhere
    golds = [rows[i]["answer"] if i == answered[0] else "-123456" for i in range(len(rows))]
    data = _gsm8k_data(tmp_path / "data.jsonl", golds)
    settings = EvalSettings(model=settings.model, data=str(data), max_new_tokens=MAX_NEW)
    summary = run_eval(replace(settings, out=str(tmp_path / "run"), batch_size=2, progress=False))
    new_rows = _read_rows(tmp_path / "run")
    assert [r["output"] for r in new_rows] == [r["output"] for r in rows]
    assert [r["correct"] for r in new_rows] == [i == answered[0] for i in range(len(rows))]
    assert (summary["correct"], summary["accuracy"]) == (1, 0.25)
    assert summary["accuracy_text"] == "25.0% (1/4)"


def test_resume_after_kill_gives_the_same_file(first_run, tmp_path, monkeypatch):
    import w2s_jax.generate

    settings, root, _ = first_run
    real_generate, calls = w2s_jax.generate.generate, []

    def killed_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(w2s_jax.generate, "generate", killed_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_eval(replace(settings, out=str(tmp_path / "run"), batch_size=2, progress=False))
    assert [p.name for p in (tmp_path / "run" / "shards").iterdir()] == ["part-000000.jsonl"]
    assert not (tmp_path / "run" / "predictions.jsonl").exists()

    monkeypatch.setattr(w2s_jax.generate, "generate", real_generate)
    run_eval(replace(settings, out=str(tmp_path / "run"), batch_size=2, progress=False))
    resumed = (tmp_path / "run" / "predictions.jsonl").read_bytes()
    assert resumed == (root / "run" / "predictions.jsonl").read_bytes()
    shard_ids = [
        json.loads(line)["id"]
        for shard in sorted((tmp_path / "run" / "shards").iterdir())
        for line in shard.read_text().splitlines()
    ]
    assert sorted(shard_ids) == ["q0", "q1", "q2", "q3"]
    # a finished run re-run is a no-op that rewrites the same outputs
    run_eval(replace(settings, out=str(tmp_path / "run"), batch_size=2, progress=False))
    assert (tmp_path / "run" / "predictions.jsonl").read_bytes() == resumed
    # a run.json written before prompts were recorded still resumes
    run_json = tmp_path / "run" / "run.json"
    run_json.write_text(json.dumps(json.loads(run_json.read_text()) | {"prompt_example": None}))
    run_eval(replace(settings, out=str(tmp_path / "run"), batch_size=2, progress=False))
    assert (tmp_path / "run" / "predictions.jsonl").read_bytes() == resumed


def test_resume_refuses_other_settings(first_run):
    settings, root, _ = first_run
    other = EvalSettings(model=settings.model, data=settings.data, max_new_tokens=MAX_NEW + 1)
    with pytest.raises(ValueError, match="max_new_tokens: 16 -> 17"):
        run_eval(replace(other, out=str(root / "run"), batch_size=2, progress=False))


def test_prompts_and_stop_ids(tiny_qwen2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    chat = prompt_ids(tokenizer, "2+2?", style="chat", system_prompt="Be brief.")
    assert tokenizer.decode(chat) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = prompt_ids(tokenizer, "2+2?", style="plain", system_prompt="ignored")
    assert tokenizer.decode(plain) == "Question: 2+2?\nAnswer: "
    example = prompt_example(tokenizer, style="plain", system_prompt="ignored")
    assert example == "Question: {question}\nAnswer: "
    assert stop_ids(tokenizer, tiny_qwen2_dir) == [0, 2]  # <|endoftext|>, <|im_end|>
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="prompt-style plain"):
        prompt_ids(tokenizer, "2+2?", style="chat", system_prompt="")


def test_presets_read_each_dataset_shape(tmp_path):
    svamp = _write_jsonl(
        tmp_path / "svamp.jsonl",
        [{"ID": "chal-1", "Body": "Jack had 8 pens", "Question": "How many now?", "Answer": 5.0}],
    )
    (q,) = load_eval_questions(str(svamp), preset="svamp")
    assert (q.id, q.question, q.answer) == ("chal-1", "Jack had 8 pens. How many now?", "5.0")
    asdiv = _write_jsonl(
        tmp_path / "asdiv.jsonl",
        [{"body": "Seven red apples.", "question": "How many?", "answer": "7 (apples)"}],
    )
    (q,) = load_eval_questions(str(asdiv), preset="asdiv")
    assert (q.id, q.question, q.answer) == ("line-1", "Seven red apples. How many?", "7")
    math = _write_jsonl(
        tmp_path / "math.jsonl",
        [{"unique_id": "a/1", "problem": "Half?", "solution": "It is $\\boxed{\\frac12}$."}],
    )
    (q,) = load_eval_questions(str(math), preset="math")
    assert (q.id, q.answer) == ("a/1", "\\frac12")
    (q,) = load_eval_questions(
        str(math), preset="plain", question_fields=("problem",), answer_field="solution"
    )
    assert q.answer == "It is $\\boxed{\\frac12}$."
    with pytest.raises(DataError, match=r"math.jsonl:1: preset 'gsm8k' cannot read .*####"):
        load_eval_questions(
            str(math), preset="gsm8k", question_fields=("problem",), answer_field="solution"
        )


def _fake_run(folder, correct, golds=None):
    """A finished run folder with the given per-question correctness."""
    rows = [
        {
            "id": f"q{i}",
            "question": "?",
            "output": "",
            "answer": "1",
            "gold": (golds or {}).get(i, "1"),
            "correct": bool(c),
            "graded_by": "numeric",
            "num_tokens": 3,
            "hit_max_new_tokens": False,
        }
        for i, c in enumerate(correct)
    ]
    folder.mkdir()
    _write_jsonl(folder / "predictions.jsonl", rows)
    (folder / "summary.json").write_text("{}")
    return folder


def test_compare_hand_computed(tmp_path):
    # 12 questions: both right on 4, only the base on 1, only the trained model on 5.
    base = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    trained = [1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0]
    runs = [_fake_run(tmp_path / "base", base), _fake_run(tmp_path / "lightreasoner", trained)]
    report = compare(
        CompareSettings(
            runs=tuple(map(str, runs)), out=str(tmp_path / "cmp"), bootstrap_resamples=4000
        )
    )
    first, second = report["runs"]
    assert (first["accuracy_text"], second["accuracy_text"]) == ("41.7% (5/12)", "75.0% (9/12)")
    vs = second["vs_first"]
    assert vs["diff"] == pytest.approx(4 / 12)
    assert (vs["only_first_correct"], vs["only_this_correct"]) == (1, 5)
    assert vs["mcnemar_p_exact"] == pytest.approx(2 * 7 / 64)  # 2 * P(Bin(6, 1/2) <= 1)
    boot = stats.paired_bootstrap_diff(base, trained, n_resamples=4000)
    assert vs["diff_ci95"] == [boot.low, boot.high]
    assert "| lightreasoner | 75.0% (9/12) |" in (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["questions"] == 12


def test_compare_refuses_runs_on_other_questions(tmp_path):
    a = _fake_run(tmp_path / "a", [1, 0, 1])
    b = _fake_run(tmp_path / "b", [1, 0])
    c = _fake_run(tmp_path / "c", [1, 0, 1], golds={2: "7"})
    with pytest.raises(SystemExit, match="different questions"):
        cli.main(["eval", "--compare", str(a), str(b), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="different gold answers, e.g. id 'q2'"):
        cli.main(["eval", "--compare", str(a), str(c), "--out", str(tmp_path / "x")])
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(SystemExit, match="not a finished eval run"):
        cli.main(["eval", "--compare", str(a), str(tmp_path / "unfinished"), "--out", "x"])


def test_cli_eval_and_compare_two_models(first_run, tiny_qwen2_amateur_dir, tmp_path, capsys):
    settings, root, summary = first_run
    code = cli.main(
        [
            "eval",
            "--model",
            str(tiny_qwen2_amateur_dir),
            "--data",
            settings.data,
            "--out",
            str(tmp_path / "amateur"),
            "--prompt-style",
            "plain",
            "--max-new-tokens",
            str(MAX_NEW),
            "--batch-size",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    amateur = json.loads((tmp_path / "amateur" / "summary.json").read_text())
    assert amateur["settings"]["prompt_style"] == "plain"
    assert "accuracy" in capsys.readouterr().out
    code = cli.main(
        [
            "eval",
            "--compare",
            str(root / "run"),
            str(tmp_path / "amateur"),
            "--labels",
            "expert",
            "amateur",
            "--out",
            str(tmp_path / "cmp"),
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["expert", "amateur"]
    assert report["runs"][0]["accuracy"] == summary["accuracy"]
    assert report["runs"][1]["accuracy"] == amateur["accuracy"]
    assert "| expert |" in capsys.readouterr().out


def test_bad_input_gives_clear_errors(tmp_path, tiny_qwen2_dir):
    data = _write_jsonl(
        tmp_path / "data.jsonl",
        [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "solution": "4"}],
    )
    base = ["eval", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"data.jsonl:2: answer field 'answer' is missing"):
        cli.main(base + ["--model", str(tiny_qwen2_dir), "--data", str(data)])
    good = _write_jsonl(tmp_path / "good.jsonl", [{"question": "1+1?", "answer": "#### 2"}])
    with pytest.raises(SystemExit, match=r"no_such_model is not a model folder"):
        cli.main(base + ["--model", str(tmp_path / "no_such_model"), "--data", str(good)])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_text((tiny_qwen2_dir / name).read_text())
    with pytest.raises(SystemExit, match=r"broken/config.json: not valid JSON"):
        cli.main(base + ["--model", str(broken), "--data", str(good)])
    with pytest.raises(SystemExit, match="needs --model and --data"):
        cli.main(base + ["--data", str(good)])
    with pytest.raises(SystemExit, match="does not exist|no such file"):
        cli.main(base + ["--model", str(tiny_qwen2_dir), "--data", str(tmp_path / "nope.jsonl")])


def test_lora_checkpoint_is_applied(first_run, tmp_path, tiny_qwen2_dir):
    """--lora: outputs equal PyTorch greedy decoding with W + (alpha/r) (A B)^T by hand."""
    import torch
    from flax import nnx

    from w2s_jax.checkpointing import TrainCheckpoints
    from w2s_jax.lora import LoRAConfig, apply_lora
    from w2s_jax.models import load_pretrained

    settings, root, _ = first_run
    config = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), dropout=0.0)
    model = load_pretrained(tiny_qwen2_dir)
    apply_lora(model, config)
    adapters = nnx.state(model, nnx.LoRAParam)
    rng = np.random.default_rng(0)
    values = {}
    for path, variable in nnx.to_flat_state(adapters):
        values[path] = rng.normal(0.0, 0.5, variable.get_value().shape).astype(np.float32)
        variable.set_value(values[path])
    checkpoints = TrainCheckpoints(tmp_path / "train", save_every=1, keep=1)
    checkpoints.save(1, adapters, {"count": np.zeros((), np.int32)}, {"lora": config.to_dict()})
    checkpoints.close()

    lora_settings = EvalSettings(
        model=settings.model,
        data=settings.data,
        lora=str(tmp_path / "train"),
        max_new_tokens=MAX_NEW,
    )
    run_eval(replace(lora_settings, out=str(tmp_path / "run"), batch_size=2, progress=False))
    rows = _read_rows(tmp_path / "run")
    assert rows != _read_rows(root / "run")

    from transformers import AutoModelForCausalLM

    merged_dir = tmp_path / "merged"
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir))
    with torch.no_grad():
        for layer in range(2):
            for proj in config.targets:
                a = values[("model", "layers", layer, "self_attn", proj, "lora_a")]
                b = values[("model", "layers", layer, "self_attn", proj, "lora_b")]
                weight = getattr(hf.model.layers[layer].self_attn, proj).weight
                weight += torch.from_numpy(2.0 * (a @ b).T)  # alpha / rank = 2
    hf.save_pretrained(str(merged_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (merged_dir / name).write_text((tiny_qwen2_dir / name).read_text())
    for row, question in zip(rows, QUESTIONS, strict=True):
        assert (row["output"], row["num_tokens"]) == _torch_greedy(merged_dir, question)
