"""Each benchmark preset on a small hand-written file in that benchmark's JSONL shape."""

import json

import pytest

from w2s_jax.data.benchmarks import load_eval_questions
from w2s_jax.files import DataError
from w2s_jax.grading import choice_letter, grade_choice

# (preset, records as the Qwen2.5-Math toolkit's data files hold them, expected (id, gold))
CASES = [
    (
        "gsm8k",
        [{"question": "Half of 10?", "answer": "10 / 2 = <<10/2=5>>5\n#### 5"}],
        [("line-1", "5")],
    ),
    (
        "math",
        [
            {
                "problem": "Compute $\\frac{3}{6}$.",
                "solution": "Reduce: $\\boxed{\\frac{1}{2}}$.",
                "answer": "\\frac{1}{2}",
                "subject": "Prealgebra",
                "level": 1,
                "unique_id": "test/prealgebra/1.json",
            },
            {"problem": "1+1?", "solution": "So $\\boxed{2}$.", "level": "Level 1", "type": "x"},
        ],
        [("test/prealgebra/1.json", "\\frac{1}{2}"), ("line-2", "2")],
    ),
    (
        "svamp",
        [
            {
                "ID": "chal-777",
                "Body": "There are 3 baskets with 4 eggs each",
                "Question": "How many eggs are there?",
                "Equation": "( 3.0 * 4.0 )",
                "Answer": 12.0,
                "Type": "Multiplication",
            }
        ],
        [("chal-777", "12.0")],
    ),
    (
        "asdiv",
        [
            {
                "body": "Seven red apples and two green apples are in the basket.",
                "question": "How many apples are in the basket?",
                "solution_type": "Addition",
                "answer": "9 (apples)",
                "formula": "7+2=9",
            }
        ],
        [("line-1", "9")],
    ),
    (
        "minerva_math",
        [
            {
                "problem": "Find the mass in kg.",
                "solution": "Thus $m = \\boxed{4.5e3}$ kg.",
                "type": "Physics (8.01)",
                "idx": 7,
            }
        ],
        [("7", "4.5e3")],
    ),
    (
        "olympiadbench",
        [
            {
                "id": 1606,
                "subfield": "Combinatorics",
                "context": None,
                "question": "How many subsets?",
                "solution": ["There are $2^3$."],
                "final_answer": ["$8$"],
                "is_multiple_answer": False,
                "unit": None,
                "answer_type": "Numerical",
                "error": None,
            }
        ],
        [("1606", "8")],
    ),
    (
        "mmlu_stem",
        [
            {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "math"},
            {"question": "Gas?", "choices": ["He", "Fe"], "answer": "A", "subject": "chem"},
        ],
        [("line-1", "B"), ("line-2", "A")],
    ),
]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("preset, records, expected", CASES, ids=[c[0] for c in CASES])
def test_each_preset_reads_its_benchmark_shape(tmp_path, preset, records, expected):
    questions = load_eval_questions(_write(tmp_path / f"{preset}.jsonl", records), preset=preset)
    assert [(q.id, q.answer) for q in questions] == expected


def test_question_texts_and_choices(tmp_path):
    (svamp,) = load_eval_questions(_write(tmp_path / "s.jsonl", CASES[2][1]), preset="svamp")
    assert svamp.question == "There are 3 baskets with 4 eggs each. How many eggs are there?"
    mmlu = load_eval_questions(_write(tmp_path / "m.jsonl", CASES[6][1]), preset="mmlu_stem")
    assert mmlu[0].question == "2+2?\nAnswer Choices: (A) 3 (B) 4 (C) 5 (D) 6"


def test_a_multiple_choice_gold_outside_the_choices_is_refused(tmp_path):
    for answer in (4, "E", -1, True):
        path = _write(
            tmp_path / "m.jsonl", [{"question": "?", "choices": list("wxyz"), "answer": answer}]
        )
        with pytest.raises(DataError, match=r"m.jsonl:1: .*outside the 4 choices \(A-D\)"):
            load_eval_questions(path, preset="mmlu_stem")
    path = _write(tmp_path / "c.jsonl", [{"question": "?", "choices": "ABCD", "answer": 0}])
    with pytest.raises(DataError, match="'choices' must be a list"):
        load_eval_questions(path, preset="mmlu_stem")


def test_field_mapping_overrides_the_preset(tmp_path):
    path = _write(tmp_path / "x.jsonl", [{"prompt": "Q?", "final": "$7$", "key": "k1"}])
    (q,) = load_eval_questions(
        path, preset="plain", question_fields=("prompt",), answer_field="final", id_field="key"
    )
    assert (q.id, q.question, q.answer) == ("k1", "Q?", "$7$")
    with pytest.raises(DataError, match="answer field 'answer' or 'solution' is missing"):
        load_eval_questions(_write(tmp_path / "y.jsonl", [{"problem": "Q?"}]), preset="math")


def test_choice_answers_are_graded_by_letter():
    assert [choice_letter(a) for a in ("(C)", "C. 42", "\\text{(B)}", "b", "The answer", None)] == [
        "C",
        "C",
        "B",
        "B",
        None,
        None,
    ]
    assert grade_choice("(B)", "B") == (True, "choice")
    assert grade_choice("42", "B") == (False, "no_answer")
    assert grade_choice("A", "B") == (False, "choice")


def test_a_multiple_choice_eval_grades_letters(tmp_path, tiny_qwen2_dir):
    from w2s_jax.evaluate import EvalSettings, run_eval

    data = _write(tmp_path / "m.jsonl", CASES[6][1])
    run_eval(
        EvalSettings(
            model=str(tiny_qwen2_dir),
            data=data,
            out=str(tmp_path / "run"),
            preset="mmlu_stem",
            max_new_tokens=8,
            progress=False,
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").open()]
    for row in rows:
        assert row["answer"] is None or row["answer"] in "ABCD"
        assert row["graded_by"] in ("choice", "no_answer")
        assert row["correct"] == (row["answer"] == row["gold"])
