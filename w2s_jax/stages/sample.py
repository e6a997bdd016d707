"""The sampling stage: expert rollouts scored against the amateur into contrastive targets.

`sample(settings)` validates every input before the first byte is written, then
writes into `settings.out`: manifest.json (settings, fingerprints, the prompt used),
samples/*.jsonl (one record per question), summary.json and kl_histogram.png.
Re-running on the same folder resumes (finished questions are skipped); other
settings are refused. The engine (rollout, KL, targets) is `w2s_jax.sampling`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from w2s_jax.files import DataError
from w2s_jax.settings import free_fields, record
from w2s_jax.stages.sample_settings import SampleSettings

# Not part of the recorded settings: the models are identified by their fingerprints,
# the data by its resolved source.
_IDENTIFIED_ELSEWHERE = ("expert", "amateur", "data")


@dataclasses.dataclass
class SamplePlan:
    """Everything checked before any compute or any write."""

    settings: SampleSettings
    questions: list
    prompts: list
    tokenizer: object
    vocab_size: int
    eos_ids: list
    pad_id: int
    manifest: dict
    sources: tuple  # the expert's and the amateur's `model_source.ModelSource`
    cross: object = None  # `cross_scoring.CrossPlan` for an amateur of another tokenizer


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """What a sampling run left in `out`: its summary, and whether it resumed a run."""

    out: Path
    summary: dict | None  # None on the non-leader processes of a multi-host run
    resumed: bool


def _tokenizer_pair(expert: Path, amateur: Path):
    """(expert tokenizer, None) when the amateur's maps ids the same way, else (expert
    tokenizer, amateur tokenizer): an amateur of another tokenizer (`cross_scoring`)."""
    from w2s_jax import fingerprint
    from w2s_jax.models import ModelConfig, load_tokenizer
    from w2s_jax.sampling import tokenizer_difference

    # Identical tokenizer files need no second load (seconds for a 151k-token vocabulary).
    shared_files = fingerprint.same_tokenizer_files(expert, amateur)
    to_load = [("expert", expert)] if shared_files else [("expert", expert), ("amateur", amateur)]
    tokenizers = []
    for role, folder in to_load:
        try:
            tokenizers.append(load_tokenizer(folder))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the {role} tokenizer from {folder}: {exc}") from exc
    if not shared_files and tokenizer_difference(*tokenizers) is None:
        tokenizers = tokenizers[:1]
    own = tokenizers if len(tokenizers) == 2 else tokenizers * 2  # each model's tokenizer
    for role, folder, tokenizer in zip(("expert", "amateur"), (expert, amateur), own, strict=True):
        model_vocab = ModelConfig.from_hf_json(folder / "config.json").vocab_size
        if model_vocab < len(tokenizer):
            raise ValueError(
                f"{role} {folder}: the model has {model_vocab} output rows but the tokenizer "
                f"has {len(tokenizer)} tokens"
            )
    return tokenizers[0], (tokenizers[1] if len(tokenizers) > 1 else None)


def _questions(settings: SampleSettings) -> list:
    from w2s_jax.data.tfds_source import load_source

    questions = load_source(
        settings.data,
        split=settings.tfds_split,
        data_dir=settings.tfds_data_dir,
        question_field=settings.question_field,
        id_field=settings.id_field,
        max_questions=settings.max_questions,
    )
    if not questions:
        raise ValueError(f"{settings.data}: no questions")
    return questions


def plan(settings: SampleSettings) -> SamplePlan:
    """Validate every input (ValueError/DataError naming it) and build the manifest; the
    plan holds the settings with their dtypes resolved."""
    from w2s_jax import __version__, fingerprint, model_source
    from w2s_jax.data.tfds_source import TFDS_PREFIX
    from w2s_jax.models import ModelConfig
    from w2s_jax.models.dtypes import resolve_dtypes
    from w2s_jax.prompts import prompt_example, stop_ids
    from w2s_jax.sample_store import FORMAT

    settings = resolve_dtypes(settings)
    if Path(settings.out).exists() and not Path(settings.out).is_dir():
        raise ValueError(f"--out {settings.out} exists and is not a folder")
    sources = model_source.resolve_pair(settings.expert, settings.amateur)
    expert, amateur = (source.folder for source in sources)  # a run's: its base folder
    tokenizer, amateur_tokenizer = _tokenizer_pair(expert, amateur)
    questions = _questions(settings)
    cross = None
    if amateur_tokenizer is not None:
        from w2s_jax.cross_scoring import plan_cross

        names = {"expert": str(expert), "amateur": str(amateur)}
        cross = plan_cross(tokenizer, amateur_tokenizer, questions, settings=settings, **names)
    expert_config = ModelConfig.from_hf_json(expert / "config.json")
    prompts = _encoded_prompts(settings, tokenizer, questions, (expert, amateur))
    model_eos = expert_config.eos_token_ids
    eos_ids = stop_ids(tokenizer, expert, model_eos, settings.eos_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    source = settings.data
    if not source.startswith(TFDS_PREFIX):
        source = str(Path(source).resolve())
    fingerprints, identified = model_source.manifest_entries(*sources)
    fingerprints["tokenizer_fingerprint"] = fingerprint.tokenizer_fingerprint(tokenizer)
    skip = set(free_fields(SampleSettings)) | set(_IDENTIFIED_ELSEWHERE)
    if cross is None:  # settings of an amateur of another tokenizer only
        skip |= {"unmapped_mass", "min_vocab_coverage"}
    recorded = {k: v for k, v in record(settings).items() if k not in skip}
    if cross is not None:  # a resume refuses another amateur tokenizer
        fingerprint_key = "amateur_tokenizer_fingerprint"
        recorded[fingerprint_key] = cross.manifest_block[fingerprint_key]
    recorded.update(
        fingerprints,
        eos_ids=eos_ids,
        data=source,
        tfds_split=settings.tfds_split if source.startswith(TFDS_PREFIX) else None,
    )
    manifest = {
        "format": FORMAT,
        "settings": recorded,
        **fingerprints,
        **identified,
        "vocab_size": len(tokenizer),
        "eos_ids": eos_ids,
        "pad_id": pad_id,
        "prompt_example": prompt_example(
            tokenizer, style=settings.prompt_style, system_prompt=settings.system_prompt
        ),
        "w2s_jax_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cross is not None:
        manifest["cross_tokenizer"] = cross.manifest_block
    return SamplePlan(
        settings,
        questions,
        prompts,
        tokenizer,
        len(tokenizer),
        eos_ids,
        pad_id,
        manifest,
        sources,
        cross,
    )


def _encoded_prompts(settings: SampleSettings, tokenizer, questions, folders) -> list[list[int]]:
    """Every question's prompt ids, each checked to fit the shorter context of the two
    models (`folders`: the expert's and the amateur's)."""
    from w2s_jax.models import ModelConfig
    from w2s_jax.prompts import encode_prompts

    context = min(
        ModelConfig.from_hf_json(folder / "config.json").max_position_embeddings
        for folder in folders
    )
    return encode_prompts(
        tokenizer,
        questions,
        style=settings.prompt_style,
        system_prompt=settings.system_prompt,
        context=context,
    )


def _check_same_questions(finished: dict[str, list[int]], the_plan: SamplePlan, out) -> None:
    """Refuse a resume whose data no longer holds the sampled questions as they were.

    A record's prompt ids are its question as the model saw it (template included), so
    an edited question, a question gone, or another file at the same path shows up.
    """
    current = {q.id: p for q, p in zip(the_plan.questions, the_plan.prompts, strict=True)}
    limit = the_plan.settings.max_questions
    truncated = limit is not None and len(current) >= limit  # ids past the limit are unseen
    gone = [] if truncated else [i for i in finished if i not in current]
    edited = [i for i in finished if i in current and current[i] != finished[i]]
    if not (gone or edited):
        return
    parts = []
    if edited:
        parts.append(f"{len(edited)} question(s) changed, first ids: {', '.join(edited[:5])}")
    if gone:
        parts.append(f"{len(gone)} sampled id(s) are no longer in the data: {', '.join(gone[:5])}")
    raise DataError(
        f"{out} holds samples of other questions than {the_plan.settings.data} now has "
        f"({'; '.join(parts)}); use another --out"
    )


def _local_batch_size(batch_size: int, processes: int, batch_shards: int) -> int:
    """Per-process batch so that the global batch divides over the mesh's batch axes."""
    local = math.ceil(batch_size / processes)
    while (local * processes) % batch_shards:
        local += 1
    return local


def sample(settings: SampleSettings, *, mesh=None, log=print) -> SampleResult:
    """Run (or resume) the sampling stage; returns where it wrote and its summary.

    `mesh` overrides `settings.mesh`. Progress goes to a tqdm bar (process 0) and
    `log` (one line per event).
    """
    import jax
    from jax.experimental import multihost_utils

    from w2s_jax import sample_store, sharding

    sharding.maybe_initialize_distributed()
    the_plan = plan(settings)
    mesh = sharding.make_mesh(settings.mesh) if mesh is None else mesh
    out = Path(settings.out)
    process, processes = jax.process_index(), jax.process_count()
    resumed = sample_store.check_or_create_manifest(out, the_plan.manifest, create=process == 0)
    if processes > 1:
        multihost_utils.sync_global_devices("w2s sample: manifest")
    sample_store.remove_stale_temp_files(out, process)
    finished = sample_store.finished_prompts(out)
    _check_same_questions(finished, the_plan, out)
    done = set(finished)
    if process == 0 and resumed:
        log(f"resuming {out}: {len(done)} question(s) already sampled")
    _sample_batches(the_plan, mesh, done, log)
    if processes > 1:
        multihost_utils.sync_global_devices("w2s sample: shards")
    if process != 0:
        return SampleResult(out, None, resumed)
    return SampleResult(out, _finish(the_plan, out, log), resumed)


def _sample_batches(the_plan: SamplePlan, mesh, done: set, log) -> None:
    """Roll out and score every question not in `done`, one shard per batch."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    from w2s_jax import sample_store
    from w2s_jax.model_source import load_pair
    from w2s_jax.models.dtypes import warn_if_slow
    from w2s_jax.sampling import Scorer, build_records, gather_rows, rollout_and_score
    from w2s_jax.settings import model_options

    settings = the_plan.settings
    process, processes = jax.process_index(), jax.process_count()
    mine = list(range(len(the_plan.questions)))[process::processes]
    todo = [i for i in mine if the_plan.questions[i].id not in done]
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    local_batch = _local_batch_size(settings.batch_size, processes, batch_shards)
    if local_batch * processes != settings.batch_size and process == 0:
        log(f"note: global batch {local_batch * processes} (a multiple of the mesh's batch axes)")
    steps = math.ceil(len(todo) / local_batch)
    if processes > 1:
        steps = int(np.max(multihost_utils.process_allgather(np.int32(steps))))
    if not steps:
        return
    warn_if_slow(settings.dtype)
    options = model_options(settings) | {"allow_unused": settings.allow_unused_weights}
    expert, amateur = load_pair(*the_plan.sources, mesh=mesh, **options)
    cross = the_plan.cross
    expert.restrict_vocab(the_plan.vocab_size)
    amateur.restrict_vocab(the_plan.vocab_size if cross is None else cross.amateur_vocab_size)
    if cross is None:
        scorer = Scorer(expert, amateur, config=settings, mesh=mesh)
    else:
        from w2s_jax.cross_scoring import CrossScorer

        scorer = CrossScorer(expert, amateur, cross.pair, config=settings, mesh=mesh)
    bar = tqdm(total=len(todo), unit="q", desc="sampling", disable=process != 0)
    selected = 0
    for step in range(steps):
        batch = todo[step * local_batch : (step + 1) * local_batch]
        indices = batch + [batch[0] if batch else 0] * (local_batch - len(batch))  # filler
        rows = [the_plan.prompts[i] for i in indices]
        amateur_rows = None if cross is None else [cross.amateur_prompts[i] for i in indices]
        start = time.perf_counter()
        completion, lengths, scores = rollout_and_score(
            expert,
            scorer,
            gather_rows(rows),
            max_new_tokens=settings.max_new_tokens,
            eos_ids=the_plan.eos_ids,
            pad_id=the_plan.pad_id,
            amateur_prompts=None if cross is None else gather_rows(amateur_rows),
        )
        if not batch:
            continue
        own = slice(process * local_batch, process * local_batch + len(batch))
        _check_scores_finite(scores, lengths, own, [the_plan.questions[i].id for i in batch])
        records, stats = build_records(
            [the_plan.questions[i].id for i in batch],
            [the_plan.prompts[i] for i in batch],
            completion[own],
            lengths[own],
            {key: value[own] for key, value in scores.items()},
            contrast=settings.contrast,
        )
        stats["wall_time_s"] = time.perf_counter() - start
        sample_store.write_shard(Path(settings.out), records, stats, process_index=process)
        selected += sum(len(r.positions) for r in records)
        bar.set_postfix(selected=selected, refresh=False)  # shown by the update below
        bar.update(len(batch))
    bar.close()


def _check_scores_finite(scores: dict, lengths, own: slice, ids: list[str]) -> None:
    """NonFiniteError naming the first question whose KL or target weights are not finite
    (nothing of its batch is written). Unaligned positions (an amateur of another
    tokenizer) have no KL and are not checked."""
    import numpy as np

    from w2s_jax.files import NonFiniteError

    for name in ("kl", "target_weights"):
        values = np.asarray(scores[name][own], np.float64)
        if name == "kl" and "aligned" in scores:
            values = np.where(scores["aligned"][own], values, 0.0)
        for row, (question, length) in enumerate(zip(ids, lengths[own], strict=True)):
            bad = ~np.isfinite(values[row, : int(length)])
            if bad.any():
                position = int(np.argwhere(bad)[0][0])
                raise NonFiniteError(
                    f"question {question!r}: non-finite {name} at rollout position {position}; "
                    "check the expert and amateur weights (nothing of this batch was written)"
                )


def _finish(the_plan: SamplePlan, out: Path, log) -> dict:
    """summary.json and the KL histogram from every shard; the reference export if asked."""
    from w2s_jax import sample_store
    from w2s_jax.files import atomic_write_json

    settings = the_plan.settings
    cross = the_plan.manifest.get("cross_tokenizer")
    summary, kl = sample_store.summarize(out, beta=settings.beta, cross_tokenizer=cross)
    atomic_write_json(out / "summary.json", summary)
    sample_store.plot_kl_histogram(kl, settings.beta, out / "kl_histogram.png")
    log(
        f"{summary['questions']} questions, {summary['positions']} positions, "
        f"{summary['selected']} selected ({summary['selected_fraction']:.1%}"
        f"{'' if settings.select else ', --no-select keeps every position'})"
        f"{sample_store.cross_summary_line(summary)} -> {out}"
    )
    if settings.export_reference:
        rows = sample_store.export_reference(out, the_plan.tokenizer, settings.export_reference)
        log(f"{rows} reference rows -> {settings.export_reference}")
    return summary
