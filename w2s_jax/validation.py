"""Validation during training: `w2s train --eval-data FILE --eval-every N`.

Every N optimizer steps, and at the last one, the step's checkpoint is saved and the
expert with that step's adapters is scored on the held-out questions: greedy accuracy,
by the evaluation stage itself (`w2s_jax.evaluate.run_eval`, so prompts, stop tokens and
grading are `w2s eval`'s), into OUT/validation/step-N/. One line per validated step goes
to OUT/validation.jsonl. The best step so far (highest accuracy; the earliest on a tie)
is copied to OUT/best/<step>/ (and the earlier best removed): a checkpoints folder whose
latest step is the best, which `w2s export --lora OUT/best` and `w2s eval --lora OUT/best`
take, so keeping only the last few checkpoints never loses it.

Resume: a validated step is never scored again (its line is kept), and a step whose
scoring was interrupted resumes from its finished shards, so a resumed run writes the
same validation.jsonl and picks the same best step as an uninterrupted one. Under
multi-host JAX every process takes part in scoring and process 0 alone writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from w2s_jax.files import atomic_folder, atomic_write_jsonl
from w2s_jax.sharding import barrier

VALIDATION_FILE = "validation.jsonl"
VALIDATION_DIR = "validation"
BEST_DIR = "best"


class Validator:
    """Scores a run's checkpoints on `config.eval_data` every `config.eval_every` steps."""

    def __init__(self, config, out: Path, *, is_leader: bool, log=print):
        self.config, self.out, self.is_leader, self.log = config, Path(out), is_leader, log
        path = self.out / VALIDATION_FILE
        lines = path.read_text().splitlines() if path.is_file() else []
        self.records = [json.loads(line) for line in lines if line.strip()]

    def due(self, step: int) -> bool:
        every = self.config.eval_every
        return bool(every) and (step % every == 0 or step == self.config.steps)

    def best(self) -> dict | None:
        """The validated step with the highest accuracy (the earliest on a tie)."""
        return max(self.records, key=lambda r: (r["accuracy"], -r["step"]), default=None)

    def validate(self, step: int, checkpoints) -> dict:
        """Score step `step` (its checkpoint saved and finished) unless it was; its record."""
        done = {r["step"]: r for r in self.records}
        if step in done:
            return done[step]
        checkpoints.wait()
        summary = _score(self.config, checkpoints.directory / str(step), self.out, step)
        record = {
            "step": step,
            "accuracy": summary["accuracy"],
            "correct": summary["correct"],
            "total": summary["total"],
        }
        best_before = self.best()
        self.records.append(record)
        if self.is_leader:
            atomic_write_jsonl(self.out / VALIDATION_FILE, self.records)
            if self.best() is not best_before:
                _keep_best(checkpoints.directory / str(step), self.out / BEST_DIR)
        barrier("validation")
        shown = f"{100 * record['accuracy']:.1f}% ({record['correct']}/{record['total']})"
        self.log(f"step {step}: validation {shown}; best: step {self.best()['step']}")
        return record


def _score(config, checkpoint: Path, out: Path, step: int) -> dict:
    """`w2s eval` of the expert with `checkpoint`'s adapters on the validation questions."""
    from w2s_jax.eval_settings import EvalSettings
    from w2s_jax.evaluate import run_eval

    options = {
        "model": config.expert,
        "lora": str(checkpoint),
        "data": config.eval_data,
        "out": str(out / VALIDATION_DIR / f"step-{step:06d}"),
        "max_new_tokens": config.eval_max_new_tokens,
        "batch_size": config.eval_batch_size,
        "prompt_style": config.eval_prompt_style,
        "dtype": config.dtype,
        "progress": False,
    }
    if config.eval_system_prompt is not None:
        options["system_prompt"] = config.eval_system_prompt
    return run_eval(EvalSettings(**options))


def _keep_best(checkpoint: Path, best: Path) -> None:
    """A copy of `checkpoint` (a step folder) into OUT/best, then the earlier ones removed
    (a crash between the two leaves both; the latest, the best, is the one used)."""
    target = best / checkpoint.name
    if not target.is_dir():
        with atomic_folder(target) as tmp:
            shutil.copytree(checkpoint, tmp, dirs_exist_ok=True)
    for earlier in best.iterdir():
        if earlier.name.isdigit() and int(earlier.name) < int(checkpoint.name):
            shutil.rmtree(earlier)
