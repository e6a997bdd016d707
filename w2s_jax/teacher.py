"""The frozen teacher of a training objective that needs one (`--teacher`, SALT's small LM).

It must map token ids as the student does: the same check as `w2s sample` makes of
its expert and amateur (`sampling.tokenizer_difference`), before any weight is loaded.
"""

from __future__ import annotations

from pathlib import Path


def student_tokenizer_folder(config) -> str | None:
    """The run's tokenizer folder: --tokenizer, else --expert, else --teacher."""
    return config.tokenizer or config.expert or config.teacher


def check_teacher_tokenizer(teacher: str | Path, student: str | Path) -> None:
    """ValueError unless the teacher's and the student's tokenizers map ids the same way."""
    from w2s_jax import fingerprint
    from w2s_jax.models import load_tokenizer
    from w2s_jax.sampling import tokenizer_difference

    if fingerprint.same_tokenizer_files(teacher, student):
        return
    difference = tokenizer_difference(load_tokenizer(teacher), load_tokenizer(student))
    if difference is not None:
        raise ValueError(
            f"--teacher {teacher} and the student's tokenizer {student} differ (teacher vs "
            f"student: {difference}); knowledge distillation compares next-token "
            "distributions id by id, so both models must share one tokenizer"
        )


def load_teacher(config, mesh, token_count: int):
    """The teacher model of `config.teacher` on `mesh`, checked; ids >= token_count masked.

    ValueError when --teacher is missing or not wanted by the objective, when the
    tokenizers differ, or when the teacher has fewer output rows than the tokenizer.
    """
    from w2s_jax.models import load_pretrained
    from w2s_jax.objectives import get_objective
    from w2s_jax.settings import model_options

    needs = get_objective(config.objective).needs_teacher
    if needs != bool(config.teacher):
        if needs:
            raise ValueError(f"--objective {config.objective} needs --teacher DIR")
        raise ValueError(f"--objective {config.objective} takes no --teacher")
    if not needs:
        return None
    student = student_tokenizer_folder(config)
    if student != config.teacher:
        check_teacher_tokenizer(config.teacher, student)
    options = model_options(config) | {"param_dtype": None}  # frozen: stored as computed
    teacher = load_pretrained(
        config.teacher, mesh=mesh, allow_unused=config.allow_unused_weights, **options
    )
    try:
        teacher.restrict_vocab(token_count)
    except ValueError as exc:
        raise ValueError(f"--teacher {config.teacher}: {exc}") from None
    return teacher
