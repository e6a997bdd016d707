"""The rounds workflow (`w2s lightreasoner --rounds N`): LightReasoner repeated on its own output.

Round r samples with expert E_r against amateur A_r, trains a fresh LoRA on E_r, merges
it into E_{r+1} and scores E_{r+1}. E_1 is `--expert`. A_r follows `--amateur-rule`:

- fixed: `--amateur` in every round;
- base: `--amateur` in round 1, then E_1 (the original expert);
- previous: `--amateur` in round 1, then E_{r-1} (the expert of the round before).

Round 1 always uses `--amateur`: under base or previous it would be E_1 against itself
(KL 0 everywhere, nothing selected). Folders: OUT/run.json (settings, checked on resume),
OUT/eval-base (E_1 scored once), OUT/round-R/{round.json, samples, train, model, eval},
OUT/times.json, and the report: rounds.json, summary.md, rounds.png
(`w2s_jax.rounds_report`). A round is done when its eval summary exists; every stage
resumes on its own folder, so re-running the same command continues where it stopped.
A round whose sampling selects no position trains nothing: E_{r+1} = E_r. Under
`previous` a round samples E_r as round r-1's train run over its base E_{r-1}, which is
A_r (`sampling_sources`): one base in memory plus one adapter set.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from w2s_jax.files import atomic_write_json
from w2s_jax.run_folder import claim
from w2s_jax.stages.rounds_settings import RoundsSettings


@dataclasses.dataclass(frozen=True)
class RoundModels:
    """The expert and the amateur of one round (absolute folders)."""

    expert: Path
    amateur: Path


def round_models(settings: RoundsSettings, round_: int, experts: list[Path]) -> RoundModels:
    """E_r and A_r of round `round_` (1-based); `experts[i]` is E_{i+1}, known up to E_r."""
    expert = experts[round_ - 1]
    if round_ == 1 or settings.amateur_rule == "fixed":
        amateur = Path(settings.amateur).absolute()
    elif settings.amateur_rule == "base":
        amateur = experts[0]
    else:  # previous
        amateur = experts[round_ - 2]
    return RoundModels(expert, amateur)


def shown(path: Path, out: Path) -> str:
    """`path` relative to the run folder when inside it (so two runs' reports compare)."""
    try:
        return str(path.absolute().relative_to(out.absolute()))
    except ValueError:
        return str(path.absolute())


# ---------------------------------------------------------------- stage settings


def sampling_sources(
    settings: RoundsSettings, round_: int, experts: list[Path]
) -> tuple[str, str] | None:
    """Under `previous`, from round 2 on, E_r is E_{r-1} plus round r-1's LoRA and A_r is
    E_{r-1}: sampled as the model sources (round r-1's train run, `base`), so the shared
    base is loaded once (`w2s_jax.model_source`). None when the round samples the folders:
    other rules, round 1, a round r-1 that trained nothing, or a train run whose recorded
    base is not this run's E_{r-1} (a run folder copied or moved elsewhere)."""
    from w2s_jax.model_source import parse_source

    if settings.amateur_rule != "previous" or round_ == 1:
        return None
    run = Path(settings.out).absolute() / f"round-{round_ - 1}" / "train"
    if not (run / "checkpoints").is_dir():
        return None
    try:
        base = parse_source("expert", str(run)).folder
    except (OSError, ValueError):
        return None
    return (str(run), "base") if base.resolve() == experts[round_ - 2].resolve() else None


def sample_settings(
    settings: RoundsSettings, models: RoundModels, out: Path, sources: tuple | None = None
):
    """The sampling stage of a round (`w2s sample` with the run's settings); `sources`
    (expert, amateur) replace the round's model folders (`sampling_sources`)."""
    from w2s_jax.stages.sample_settings import SampleSettings

    expert, amateur = sources or (str(models.expert), str(models.amateur))
    return SampleSettings(
        expert=expert,
        amateur=amateur,
        data=settings.data,
        out=str(out),
        alpha=settings.alpha,
        beta=settings.beta,
        top_k=settings.top_k,
        max_new_tokens=settings.max_new_tokens,
        max_questions=settings.max_questions,
        batch_size=settings.batch_size,
        system_prompt=settings.system_prompt,
        prompt_style=settings.prompt_style,
        dtype=settings.dtype,
        param_dtype=settings.param_dtype,
    )


def train_settings(settings: RoundsSettings, round_: int, expert: Path, samples: Path, out: Path):
    """The training stage of a round: a fresh LoRA on E_r, seed + r - 1."""
    from w2s_jax.train_config import TrainSettings

    return TrainSettings(
        samples=str(samples),
        out=str(out),
        expert=str(expert),
        objective="contrastive",
        lora_rank=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_targets=settings.lora_targets,
        learning_rate=settings.learning_rate,
        steps=settings.steps,
        batch_positions=settings.batch_positions,
        grad_accum=settings.grad_accum,
        length_bucket=settings.length_bucket,
        dtype=settings.dtype,
        param_dtype=settings.param_dtype,
        seed=settings.seed + round_ - 1,
        save_every=min(settings.save_every, settings.steps),
        log_every=max(1, settings.steps // 10),
        progress=settings.progress,
    )


def eval_options(settings: RoundsSettings) -> dict:
    """The `w2s eval` settings every round (and the base) is scored with."""
    return dict(
        data=settings.eval_data,
        system_prompt=settings.system_prompt,
        prompt_style=settings.prompt_style,
        max_new_tokens=settings.eval_max_new_tokens,
        max_questions=settings.eval_max_questions,
        batch_size=settings.eval_batch_size,
        dtype=settings.dtype,
        param_dtype=settings.param_dtype,
        progress=settings.progress,
    )


def validate(settings: RoundsSettings) -> None:
    """Every input of the run checked, nothing written: paths, round 1's sampling plan
    (tokenizers, questions), the eval questions, and the stages' own settings."""
    from w2s_jax.data.benchmarks import load_eval_questions
    from w2s_jax.eval_settings import EvalSettings
    from w2s_jax.stages.sample import plan

    settings.check_inputs()
    out = Path(settings.out)
    expert = Path(settings.expert).absolute()
    models = round_models(settings, 1, [expert])
    plan(sample_settings(settings, models, out / "round-1" / "samples"))
    train_settings(settings, 1, expert, out / "round-1" / "samples", out / "round-1" / "train")
    evaluation = EvalSettings(
        model=str(expert), out=str(out / "eval-base"), **eval_options(settings)
    )
    questions = load_eval_questions(
        evaluation.data, preset=evaluation.preset, max_questions=evaluation.max_questions
    )
    if not questions:
        raise ValueError(f"--eval-data {settings.eval_data}: no questions")


# ---------------------------------------------------------------- the run


class _Times:
    """Stage wall times, kept in OUT/times.json across resumed runs."""

    def __init__(self, path: Path):
        self.path = path
        self.times = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, key: str, started: float) -> float:
        self.times[key] = time.perf_counter() - started
        atomic_write_json(self.path, self.times)
        return self.times[key]


def run_rounds(settings: RoundsSettings, *, log=print) -> dict:
    """Run (or resume) `settings.rounds` rounds into `settings.out`; returns the report
    (also written there as rounds.json, summary.md and rounds.png)."""
    from w2s_jax.rounds_report import build_report, write_report
    from w2s_jax.stages.finetune import evaluate_once

    validate(settings)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    has_results = (out / "eval-base").is_dir() or any(out.glob("round-*"))
    claim(
        out / "run.json",
        {"settings": settings.settings()},
        settings_key="settings",
        what="a rounds run",
        has_results=has_results,
    )
    times = _Times(out / "times.json")
    started = time.perf_counter()
    base = evaluate_once(out / "eval-base", model=settings.expert, **eval_options(settings))
    log(f"[base] E_1 {settings.expert}: {base['accuracy_text']}")
    experts = [Path(settings.expert).absolute()]
    for round_ in range(1, settings.rounds + 1):
        experts.append(_run_round(settings, round_, experts, times, log))
    report = build_report(settings, out, experts)
    write_report(report, out)
    log(f"{settings.rounds} round(s) done in {time.perf_counter() - started:.0f} s -> {out}")
    return report


def _run_round(settings: RoundsSettings, round_: int, experts: list[Path], times, log) -> Path:
    """Every stage of round `round_` not yet done; returns E_{r+1}."""
    from w2s_jax.stages.finetune import evaluate_once, export_once, train_once
    from w2s_jax.stages.sample import sample

    out = Path(settings.out)
    folder = out / f"round-{round_}"
    models = round_models(settings, round_, experts)
    tag = f"[round {round_}/{settings.rounds}]"
    _claim_round(folder, models, out)
    if (folder / "eval" / "summary.json").is_file():
        log(f"{tag} done")
        return next_expert(folder, models)
    samples = folder / "samples"
    if not (samples / "summary.json").is_file():
        log(f"{tag} sample: E={shown(models.expert, out)} A={shown(models.amateur, out)}")
        start = time.perf_counter()
        sources = sampling_sources(settings, round_, experts)
        sample(sample_settings(settings, models, samples, sources), log=log)
        times.record(f"round-{round_}/sample", start)
    summary = json.loads((samples / "summary.json").read_text())
    model = next_expert(folder, models)
    if summary["selected"] == 0:
        log(f"{tag} no position selected: nothing to train, E_{round_ + 1} = E_{round_}")
    else:
        log(f"{tag} train: {summary['selected']} selected positions, {settings.steps} steps")
        start = time.perf_counter()
        trained = train_once(
            train_settings(settings, round_, models.expert, samples, folder / "train")
        )
        times.record(f"round-{round_}/train", start)
        log(f"{tag} train: loss {trained['final']['loss']:.4f}; export")
        start = time.perf_counter()
        export_once(folder / "train", model, models.expert)
        times.record(f"round-{round_}/export", start)
    log(f"{tag} eval {shown(model, out)}")
    start = time.perf_counter()
    scored = evaluate_once(folder / "eval", model=str(model), **eval_options(settings))
    times.record(f"round-{round_}/eval", start)
    log(f"{tag} E_{round_ + 1}: {scored['accuracy_text']}")
    return model


def next_expert(folder: Path, models: RoundModels) -> Path:
    """E_{r+1}: the round's export, or E_r when its sampling selected nothing."""
    summary = json.loads((folder / "samples" / "summary.json").read_text())
    return (folder / "model").absolute() if summary["selected"] else models.expert


def _claim_round(folder: Path, models: RoundModels, out: Path) -> None:
    """Record the round's models in round.json; refuse a folder that holds other ones."""
    document = {
        "round": int(folder.name.split("-")[1]),
        "expert": shown(models.expert, out),
        "amateur": shown(models.amateur, out),
    }
    folder.mkdir(parents=True, exist_ok=True)
    claim(folder / "round.json", document, what="a round", has_results=True)
