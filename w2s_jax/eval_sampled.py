"""What a sampled evaluation reports: pass@k, maj@N and the mean accuracy over samples.

Rows are `w2s eval` prediction rows with a `sample` index, N per question.

- pass@k for every k ≤ N: the unbiased estimator of Chen et al. (2021), averaged over
  questions (`w2s_jax.stats.pass_at_k`).
- maj@N: the answers of a question are grouped by `w2s_jax.grading.same_answer` (each
  answer joins the first group, in sample order, whose first answer it equals; no
  answer votes for nothing); the largest group wins, ties going to the group whose
  first answer came earliest (the lowest sample index). The question counts as right
  when that first answer was graded correct; with no answer at all, wrong.
- mean accuracy over all samples with a 95% interval clustered by question
  (`w2s_jax.stats.clustered_mean_interval`): samples of one question are not independent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from w2s_jax import stats
from w2s_jax.grading import SYMBOLIC_TIMEOUT_S, same_answer


def majority_vote(
    answers: Sequence[str | None], *, same: Callable[[str, str], bool] | None = None
) -> int | None:
    """Index of the first answer of the largest group of equal answers (ties: the group
    seen first), or None when no answer was given. `same` defaults to `same_answer`."""
    same = same or (lambda a, b: same_answer(a, b, timeout=SYMBOLIC_TIMEOUT_S))
    groups: list[list[int]] = []  # indices; groups[g][0] is the group's first answer
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        group = next((g for g in groups if same(answer, answers[g[0]])), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    if not groups:
        return None
    return max(groups, key=lambda g: (len(g), -g[0]))[0]


def summarize_samples(
    rows_by_question: Sequence[Sequence[dict]], *, timeout: float = SYMBOLIC_TIMEOUT_S
) -> dict:
    """pass@k (k = 1..N), maj@N and the clustered mean accuracy of N samples per question
    (rows in sample order)."""
    n = len(rows_by_question[0])
    if any(len(rows) != n for rows in rows_by_question):
        raise ValueError("every question needs the same number of samples")
    correct = [sum(bool(r["correct"]) for r in rows) for rows in rows_by_question]
    same = lambda a, b: same_answer(a, b, timeout=timeout)  # noqa: E731
    winners = [majority_vote([r["answer"] for r in rows], same=same) for rows in rows_by_question]
    maj = [
        w is not None and bool(rows[w]["correct"])
        for w, rows in zip(winners, rows_by_question, strict=True)
    ]
    q = len(rows_by_question)
    mean, low, high = stats.clustered_mean_interval(correct, [n] * q)
    maj_low, maj_high = stats.wilson_interval(sum(maj), q)
    pass_at = {str(k): sum(stats.pass_at_k(n, c, k) for c in correct) / q for k in range(1, n + 1)}
    return {
        "samples": n,
        "questions": q,
        "pass_at_k": pass_at,
        "maj_at_n": sum(maj) / q,
        "maj_at_n_text": f"{100 * sum(maj) / q:.1f}% ({sum(maj)}/{q})",
        "maj_at_n_ci95": [maj_low, maj_high],
        "mean_accuracy": mean,
        "mean_accuracy_ci95_clustered": [low, high],
    }
