"""Answer extraction and grading for math reasoning, Qwen2.5-Math style.

Extraction (`extract_answer`): the last non-empty brace-matched `\\boxed{...}`
(or `\\fbox{...}`); else the text after the last "the answer is" / "final answer
is"; else the last number in the text, thousands separators removed.

Grading (`grade`, `is_equiv`), in order:
1. normalized string equality (`normalize_answer`: LaTeX spacing, \\dfrac, \\left,
   $, units, \\text{}, degrees, "x =", percent signs, thousands separators, ...);
2. if both sides are numbers (integers, decimals, simple fractions), numeric
   equality with relative tolerance 1e-4 against gold, gold/100 and gold*100 (so
   10% == 10 == 0.1, as the Qwen2.5-Math toolkit does) -- and nothing else;
3. otherwise symbolic equality with math-verify (LaTeX -> sympy), run in a worker
   process with a time limit per comparison: a pathological answer (9^{9^{9}})
   is killed with its worker and graded wrong, never hangs a run. `grade_all` grades
   a list of pairs, their symbolic checks on a pool of up to `GRADING_WORKERS` workers.

Gold answers per dataset shape: `gold_from_gsm8k` ("#### N"), `gold_from_math`
(last \\boxed in the solution), `gold_from_asdiv` ("9 (apples)").
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

SYMBOLIC_TIMEOUT_S = 5.0

# ---------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_IS = re.compile(r"\b(?:the|final)\s+answer\s+is\b", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[start] == "{" and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty \\boxed{...} / \\fbox{...} (braces matched).

    `\\boxed 5` (no braces) is read up to the next space or `$`. Empty boxes (an echo
    of the instruction "within \\boxed{}") and unclosed ones (a truncated output)
    are skipped in favour of an earlier box.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            group = _braced(text, end)
            content = group[0] if group else ""
        else:
            content = re.match(r"[^\s$]*", text[end:]).group(0)
        if content.strip():
            return content.strip()
    return None


def _after_answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].split("\n", 1)[0]
    rest = re.split(r"\.(?=\s|$)", rest, maxsplit=1)[0]
    rest = rest.strip().lstrip(":").strip()
    rest = re.sub(r"^(?:\$+|\\\()\s*|\s*(?:\$+|\\\))$", "", rest).strip()
    return rest or None


def extract_answer(text: str) -> str | None:
    """The model's final answer in `text`, or None when it gives none (see module doc)."""
    for rule in (last_boxed, _after_answer_is):
        answer = rule(text)
        if answer is not None:
            return answer
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


# ------------------------------------------------------------- normalization

_UNIT_WORDS = re.compile(r"^(-?(?:\d+(?:\.\d+)?|\.\d+))\s*(?:[a-zA-Z]{2,}\.?\s*)+$")
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _strip_outer_braces(s: str) -> str:
    while s.startswith("{") and (group := _braced(s, 0)) and group[1] == len(s):
        s = group[0]
    return s


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}, \\sqrt2 -> \\sqrt{2}."""
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*(?=\{)", r"\\frac{\1}", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", s)
    return re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)


def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer for string and numeric comparison."""
    s = str(answer).strip().replace("\u2212", "-").replace("\n", " ")
    s = re.sub(r"\\(?:!|,|;|:|quad|qquad|displaystyle)|~", " ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = s.replace("{,}", ",")
    s = re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\(", "").replace("\\)", "")
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    # a trailing \text{unit} after something else is a unit; other \text{x} -> x
    without_unit = re.sub(r"\s*\\(?:text|mbox|mathrm)\s*\{[^{}]*\}$", "", s).strip()
    if without_unit and re.search(r"\d", without_unit):
        s = without_unit
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", s).strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*(?=[^=]*$)", "", s)
    if unit := _UNIT_WORDS.match(s):
        s = unit.group(1)
    s = _fix_fracs(s)
    # drop spaces except between a command and a following letter ("\pi r")
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\x00", s)
    s = re.sub(r"\s+", "", s).replace("\x00", " ")
    s = _strip_outer_braces(s).rstrip(".")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return re.sub(r"^(-?)\.(\d)", r"\g<1>0.\2", s)


def to_number(normalized: str) -> float | None:
    """Value of a normalized answer that is a plain number or a simple fraction, else None."""
    s = normalized
    sign = 1.0
    if s.startswith("-") and (s.startswith("-\\frac") or "/" in s):
        sign, s = -1.0, s[1:]
    frac = re.fullmatch(r"\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s) or re.fullmatch(
        r"(-?[\d.]+)/(-?[\d.]+)", s
    )
    if frac:
        num, den = frac.groups()
        if not (_PLAIN_NUMBER.fullmatch(num) and _PLAIN_NUMBER.fullmatch(den)):
            return None
        return sign * float(num) / float(den) if float(den) != 0 else None
    return float(s) if _PLAIN_NUMBER.fullmatch(s) else None


def numbers_equal(prediction: float, gold: float, *, rel_tol: float = 1e-4) -> bool:
    """Numeric equality with relative tolerance against gold, gold/100 and gold*100."""
    return any(
        math.isclose(prediction, ref, rel_tol=rel_tol) for ref in (gold, gold / 100, gold * 100)
    )


# -------------------------------------------------------------- symbolic stage


def _serve() -> None:
    """Worker loop: read [prediction, gold] JSON lines, answer true/false lines."""
    import logging

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    config = [LatexExtractionConfig(), ExprExtractionConfig()]

    def parsed(s: str):
        return parse(f"${s}$", extraction_config=config, parsing_timeout=None)

    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        prediction, gold = json.loads(line)
        try:
            ok = bool(verify(parsed(gold), parsed(prediction), timeout_seconds=None))
        except Exception:  # math-verify failing to parse or compare means "not shown equal"
            ok = False
        sys.stdout.write(json.dumps(ok) + "\n")
        sys.stdout.flush()


class _SymbolicWorker:
    """A persistent `python -m w2s_jax.grading` process, killed and restarted on timeout."""

    STARTUP_TIMEOUT_S = 120.0

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        atexit.register(self.close)

    def _read_line(self, timeout: float) -> bytes | None:
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        while not buf.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("the symbolic grading worker exited unexpectedly")
            buf += chunk
        return buf

    def _start(self) -> None:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "w2s_jax.grading"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        if self._read_line(self.STARTUP_TIMEOUT_S) != b"ready\n":
            self.close()
            raise RuntimeError("the symbolic grading worker (math-verify) did not start")

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdin.close()
            self._proc.stdout.close()
            self._proc = None

    def equal(self, prediction: str, gold: str, timeout: float) -> bool | None:
        """math-verify's verdict, or None when it ran past `timeout` seconds."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self.close()
                self._start()
            request = memoryview((json.dumps([prediction, gold]) + "\n").encode())
            while request:
                request = request[self._proc.stdin.write(request) :]
            line = self._read_line(timeout)
            if line is None:
                self.close()
                return None
            return json.loads(line)


class _WorkerPool:
    """Up to `size` symbolic workers, started on demand; each serves one caller at a time."""

    def __init__(self, size: int) -> None:
        self._size, self._started = size, 0
        self._idle: list[_SymbolicWorker] = []
        self._free = threading.Condition()

    def equal(self, prediction: str, gold: str, timeout: float) -> bool | None:
        """`_SymbolicWorker.equal` on an idle worker (a new one while fewer than `size`)."""
        with self._free:
            while not self._idle and self._started >= self._size:
                self._free.wait()
            if self._idle:
                worker = self._idle.pop()
            else:
                worker, self._started = _SymbolicWorker(), self._started + 1
        try:
            return worker.equal(prediction, gold, timeout)
        finally:
            with self._free:
                self._idle.append(worker)
                self._free.notify()


GRADING_WORKERS = max(1, min(4, os.cpu_count() or 1))
_WORKERS = _WorkerPool(GRADING_WORKERS)


# ------------------------------------------------------------------- grading


class Verdict(NamedTuple):
    """Whether a prediction matches gold, and which stage decided it.

    `how` is one of: "no_answer", "string", "numeric", "symbolic", "timeout".
    """

    correct: bool
    how: str


def grade(prediction: str | None, gold: str, *, timeout: float = SYMBOLIC_TIMEOUT_S) -> Verdict:
    """Compare an extracted answer to the gold answer (string, numeric, then symbolic)."""
    return _compare(prediction, gold, timeout=timeout, percent=True)


def same_answer(first: str, second: str, *, timeout: float = SYMBOLIC_TIMEOUT_S) -> bool:
    """Whether two extracted answers are the same (as `grade`, but numbers must be equal:
    no gold/100 or gold*100 match), e.g. to group sampled answers for a majority vote."""
    return _compare(first, second, timeout=timeout, percent=False).correct


def _compare(prediction: str | None, gold: str, *, timeout: float, percent: bool) -> Verdict:
    if prediction is None or not str(prediction).strip():
        return Verdict(False, "no_answer")
    pred_norm, gold_norm = normalize_answer(prediction), normalize_answer(gold)
    if pred_norm == gold_norm or (
        "\\" not in pred_norm + gold_norm and pred_norm.casefold() == gold_norm.casefold()
    ):
        return Verdict(True, "string")
    pred_num, gold_num = to_number(pred_norm), to_number(gold_norm)
    if pred_num is not None and gold_num is not None:
        if percent:
            return Verdict(numbers_equal(pred_num, gold_num), "numeric")
        return Verdict(math.isclose(pred_num, gold_num, rel_tol=1e-4), "numeric")
    verdict = _WORKERS.equal(str(prediction), str(gold), timeout)
    return Verdict(False, "timeout") if verdict is None else Verdict(verdict, "symbolic")


# ---------------------------------------------------------------- multiple choice

CHOICE_LETTERS = "ABCDEFGHIJ"


def choice_letter(answer: str | None) -> str | None:
    """The choice letter an extracted answer names: the last standalone capital A-J in it
    ("(C)", "C. 42", "\\text{(B)}"), or a lone lower-case letter; None when there is none."""
    if answer is None:
        return None
    letters = re.findall(rf"(?<![A-Za-z\\])([{CHOICE_LETTERS}])(?![A-Za-z])", answer)
    if letters:
        return letters[-1]
    lone = answer.strip().strip("().").strip()
    return lone.upper() if len(lone) == 1 and lone.upper() in CHOICE_LETTERS else None


def grade_choice(answer: str | None, gold_letter: str) -> Verdict:
    """A multiple-choice answer graded by its letter (`choice_letter`) against the gold's."""
    letter = choice_letter(answer)
    if letter is None:
        return Verdict(False, "no_answer")
    return Verdict(letter == gold_letter, "choice")


def grade_all(
    pairs: list[tuple[str | None, str]], *, timeout: float = SYMBOLIC_TIMEOUT_S
) -> list[Verdict]:
    """`grade` of every (prediction, gold) pair, the symbolic checks of several pairs at
    once on up to `GRADING_WORKERS` worker processes (each check keeps its time limit)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(pairs) < 2:
        return [grade(p, g, timeout=timeout) for p, g in pairs]
    with ThreadPoolExecutor(max_workers=GRADING_WORKERS) as pool:
        return list(pool.map(lambda pair: grade(*pair, timeout=timeout), pairs))


def is_equiv(prediction: str | None, gold: str, *, timeout: float = SYMBOLIC_TIMEOUT_S) -> bool:
    """True when the extracted `prediction` is mathematically the same answer as `gold`."""
    return grade(prediction, gold, timeout=timeout).correct


# -------------------------------------------------------------- gold answers


def gold_from_gsm8k(answer_text: str) -> str:
    """The final answer of a GSM8K solution: the text after "####", commas removed."""
    if "####" not in answer_text:
        raise ValueError(f"no '#### <answer>' line in GSM8K answer {answer_text[-80:]!r}")
    gold = answer_text.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise ValueError(f"empty answer after '####' in {answer_text[-80:]!r}")
    return gold


def gold_from_math(solution: str) -> str:
    """The final answer of a MATH solution: its last \\boxed{...}."""
    gold = last_boxed(solution)
    if gold is None:
        raise ValueError(f"no \\boxed{{...}} answer in MATH solution {solution[-80:]!r}")
    return gold


def gold_from_asdiv(answer: str) -> str:
    """ASDiv answers carry units in parentheses ("9 (apples)"); drop them."""
    gold = re.sub(r"\([^()]*\)", "", answer).strip()
    if not gold:
        raise ValueError(f"empty ASDiv answer {answer!r}")
    return gold


if __name__ == "__main__":
    _serve()
