"""Answer extraction and grading: a table of cases in the shapes models really write."""

import time

import pytest

from w2s_jax.evaluate import extract_answer, gold_from_gsm8k, is_equiv
from w2s_jax.grading import gold_from_asdiv, gold_from_math, grade, normalize_answer

# (model output, extracted answer)
EXTRACTION = [
    ("So the total is \\boxed{18}.", "18"),
    ("Thus $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("nested \\boxed{\\{1, 2\\}} set", "\\{1, 2\\}"),
    ("\\boxed{a_{n}^{2}+{b}}", "a_{n}^{2}+{b}"),
    ("first \\boxed{3} then corrected: \\boxed{4}", "4"),
    ("Please put it within \\boxed{}. I get \\boxed{7}.", "7"),
    ("Answer within \\boxed{}. So it is 12 in total", "12"),
    ("\\boxed 5$ is it", "5"),
    ("\\fbox{-2}", "-2"),
    ("a complete \\boxed{9} and a cut \\boxed{1", "9"),
    ("The answer is $1,000.", "1,000"),
    ("the answer is: 42 apples.", "42 apples"),
    ("The final answer is \\(x^2 + 1\\)", "x^2 + 1"),
    ("Wait. The answer is 3.\nNo, the answer is 5.\nDone", "5"),
    ("The answer is 3.5.", "3.5"),
    ("She has 5 apples and buys 7 more, 12 total.", "12"),
    ("Profit is 1,234,567 dollars", "1234567"),
    ("It drops to -4 degrees", "-4"),
    ("a share of .5 of it", ".5"),
    ("I am not sure about this one.", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# (prediction, gold, equivalent)
GRADING = [
    ("18", "18", True),
    ("18", "19", False),
    ("1,000", "1000", True),
    ("1{,}000", "1000", True),
    ("1\\,000", "1000", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{1}{2}", "0.5", True),
    ("\\tfrac12", "\\frac{1}{2}", True),
    ("1/2", "0.5", True),
    ("\\frac{1}{3}", "0.33333", True),
    ("\\frac{1}{3}", "0.33", False),
    ("-\\frac{3}{4}", "-0.75", True),
    ("\\frac{-3}{4}", "-0.75", True),
    ("-5", "5", False),
    ("\u22125", "-5", True),
    ("- 5", "-5", True),
    ("10\\%", "10", True),
    ("10%", "0.1", True),
    ("0.1", "10", True),
    ("0.2", "10", False),
    ("5 \\text{ cm}", "5", True),
    ("\\text{5}", "5", True),
    ("18 dollars", "18", True),
    ("\\$18.00", "18", True),
    ("18.", "18", True),
    ("30^\\circ", "30", True),
    ("30^{\\circ}", "30", True),
    ("x = 3", "3", True),
    ("{7}", "7", True),
    ("3.0001", "3", True),
    ("3.01", "3", False),
    ("\\frac{\\sqrt{3}}{2}", "\\dfrac{\\sqrt3}{2}", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("\\pi r^2", "r^2\\pi", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\sqrt{2}", "1.41421356", True),
    ("x+1", "x+2", False),
    ("2x", "2", False),
    ("\\{1, 2\\}", "\\{2, 1\\}", True),
    ("[1, 2)", "[1,2)", True),
    ("Yes", "yes", True),
    (None, "3", False),
    ("", "3", False),
]


@pytest.mark.parametrize(("prediction", "gold", "expected"), GRADING)
def test_is_equiv(prediction, gold, expected):
    assert is_equiv(prediction, gold) is expected


# Whole model outputs graded against GSM8K-style gold answers: extraction + grading.
END_TO_END = [
    ("Each costs $2, so 3 cost $6. The answer is $6.", "#### 6", True),
    ("3 boxes of 4 is 12.\nThe answer is 12", "She has 12.\n#### 12", True),
    ("Total: \\boxed{1,250}", "#### 1,250", True),
    ("Total: \\boxed{1250.0}", "#### 1250", True),
    ("So 7 - 10 = -3. \\boxed{-3}", "#### -3", True),
    ("We get 40% off, that is \\boxed{40\\%}", "#### 40", True),
    ("I think 5, but then 6", "#### 5", False),
    ("No idea.", "#### 5", False),
]


@pytest.mark.parametrize(("output", "gold_text", "expected"), END_TO_END)
def test_output_against_gsm8k_gold(output, gold_text, expected):
    assert is_equiv(extract_answer(output), gold_from_gsm8k(gold_text)) is expected


def test_grade_says_which_stage_decided():
    assert grade("1,000", "1000").how == "string"
    assert grade("\\frac{1}{2}", "0.5").how == "numeric"
    assert grade("(x+1)^2", "x^2+2x+1").how == "symbolic"
    assert grade(None, "1") == (False, "no_answer")


def test_pathological_answer_times_out_and_the_worker_recovers():
    start = time.monotonic()
    verdict = grade("9^{9^{9}}", "1", timeout=1.0)
    assert verdict == (False, "timeout")
    assert time.monotonic() - start < 30
    assert grade("(x+1)^2", "x^2+2x+1") == (True, "symbolic")


def test_normalize_answer_forms():
    assert normalize_answer("\\left( 1, 2 \\right)") == "(1,2)"
    assert normalize_answer("$\\$1,234.50$.") == "1234.50"
    assert normalize_answer("\\pi r^2") == "\\pi r^2"
    assert normalize_answer(".5") == "0.5"


def test_gold_extractors():
    assert gold_from_gsm8k("Natalia sold 48/2 = 24 clips.\n#### 1,072") == "1072"
    assert gold_from_math("so $x=\\boxed{\\frac{3}{4}}$ and done") == "\\frac{3}{4}"
    assert gold_from_asdiv("9 (apples)") == "9"
    with pytest.raises(ValueError, match="####"):
        gold_from_gsm8k("no final line")
    with pytest.raises(ValueError, match="boxed"):
        gold_from_math("the answer is 4")
