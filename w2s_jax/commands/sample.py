"""LightReasoner sampling: expert rollouts scored against the amateur into contrastive targets.

Writes into --out: manifest.json (settings and fingerprints), samples/*.jsonl
(one record per question), summary.json and kl_histogram.png. Re-running on the
same --out resumes (finished questions are skipped); different settings are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

from w2s_jax.sampling import DEFAULT_SYSTEM_PROMPT, PROMPT_STYLES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--expert", metavar="DIR", help="Expert HF model folder (required).")
    parser.add_argument("--amateur", metavar="DIR", help="Amateur HF model folder (required).")
    parser.add_argument(
        "--data",
        metavar="SOURCE",
        help="Questions (required): a JSONL file ({id?, question, answer?} per line) or tfds:NAME.",
    )
    parser.add_argument("--out", metavar="DIR", help="Output folder, resumable (required).")
    parser.add_argument("--alpha", type=float, default=0.2, help="Plausibility ratio α in (0, 1].")
    parser.add_argument("--beta", type=float, default=0.4, help="KL threshold β for a step.")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Rollout length T.")
    parser.add_argument("--max-questions", type=int, default=None, help="Use the first N only.")
    parser.add_argument("--batch-size", type=int, default=8, help="Questions per batch (global).")
    parser.add_argument(
        "--top-k", type=int, default=16, help="Most tokens kept per target (renormalized)."
    )
    parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT)
    parser.add_argument("--prompt-style", choices=PROMPT_STYLES, default="chat")
    parser.add_argument(
        "--eos-id",
        type=int,
        action="append",
        default=[],
        metavar="ID",
        help="Another token id that ends a rollout (repeatable), beside the tokenizer's "
        "special end tokens and the configs' eos_token_id.",
    )
    parser.add_argument("--mesh", default=None, help='e.g. "data=4,tensor=2"; default all data.')
    parser.add_argument(
        "--dtype",
        default="auto",
        help="Model compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU; the default), "
        "float32 or bfloat16.",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=32, help="Rollout positions per block of the KL kernel."
    )
    parser.add_argument(
        "--no-select", action="store_true", help="Ablation: keep every rollout position."
    )
    parser.add_argument(
        "--no-contrast",
        action="store_true",
        help="Ablation: one-hot target on the expert's own token.",
    )
    parser.add_argument(
        "--export-reference",
        metavar="FILE",
        help="Also write the LightReasoner reference's one-line-per-step JSONL.",
    )
    parser.add_argument("--question-field", default="question")
    parser.add_argument("--id-field", default="id")
    parser.add_argument("--tfds-split", default="train", help="Split of a tfds: source.")
    parser.add_argument(
        "--tfds-data-dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR)."
    )


@dataclasses.dataclass
class _Plan:
    """Everything checked before any compute or any write."""

    config: object
    questions: list
    prompts: list
    tokenizer: object
    vocab_size: int
    eos_ids: list
    pad_id: int
    manifest: dict


def _check_model_folder(role: str, path: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{role} model folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{role} model folder {folder} has no config.json")
    return folder


def _plan(args: argparse.Namespace) -> _Plan:
    """Validate every input (raising ValueError/DataError) and build the manifest."""
    missing = [f"--{n}" for n in ("expert", "amateur", "data", "out") if not getattr(args, n)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (give them as flags or in --config)")
    from w2s_jax import __version__, fingerprint
    from w2s_jax.data.tfds_source import TFDS_PREFIX, load_source
    from w2s_jax.evaluate import prompt_ids
    from w2s_jax.models import ModelConfig, load_tokenizer
    from w2s_jax.models.dtypes import resolve_dtype
    from w2s_jax.sample_store import FORMAT
    from w2s_jax.sampling import SampleConfig, check_shared_tokenizer
    from w2s_jax.stop_tokens import stop_ids

    config = SampleConfig(
        alpha=args.alpha,
        beta=args.beta,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        select=not args.no_select,
        contrast=not args.no_contrast,
        chunk_size=args.chunk_size,
    )
    config.check()
    if args.batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {args.batch_size}")
    if args.max_questions is not None and args.max_questions < 1:
        raise ValueError(f"max_questions must be >= 1, got {args.max_questions}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")
    expert = _check_model_folder("expert", args.expert)
    amateur = _check_model_folder("amateur", args.amateur)
    # Identical tokenizer files need no second load (seconds for a 151k-token vocabulary).
    shared_files = fingerprint.same_tokenizer_files(expert, amateur)
    to_load = [("expert", expert)] if shared_files else [("expert", expert), ("amateur", amateur)]
    tokenizers = []
    for role, folder in to_load:
        try:
            tokenizers.append(load_tokenizer(folder))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the {role} tokenizer from {folder}: {exc}") from exc
    tokenizer = tokenizers[0]
    if not shared_files:
        check_shared_tokenizer(*tokenizers, expert=str(expert), amateur=str(amateur))
    vocab_size = len(tokenizer)
    for role, folder in (("expert", expert), ("amateur", amateur)):
        model_vocab = ModelConfig.from_hf_json(folder / "config.json").vocab_size
        if model_vocab < vocab_size:
            raise ValueError(
                f"{role} {folder}: the model has {model_vocab} output rows but the tokenizer "
                f"has {vocab_size} tokens"
            )
    questions = load_source(
        args.data,
        split=args.tfds_split,
        data_dir=args.tfds_data_dir,
        question_field=args.question_field,
        id_field=args.id_field,
        max_questions=args.max_questions,
    )
    if not questions:
        raise ValueError(f"{args.data}: no questions")
    prompts = [
        prompt_ids(tokenizer, q.question, style=args.prompt_style, system_prompt=args.system_prompt)
        for q in questions
    ]
    model_eos = ModelConfig.from_hf_json(expert / "config.json").eos_token_ids
    eos_ids = stop_ids(tokenizer, expert, model_eos, args.eos_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    source = args.data
    if not source.startswith(TFDS_PREFIX):
        source = str(Path(source).resolve())
    expert_hashed = fingerprint.weights_fingerprint_record(expert)
    amateur_hashed = fingerprint.weights_fingerprint_record(amateur)
    fingerprints = {
        "expert_weights_fingerprint": expert_hashed["fingerprint"],
        "amateur_weights_fingerprint": amateur_hashed["fingerprint"],
        "tokenizer_fingerprint": fingerprint.tokenizer_fingerprint(tokenizer),
    }
    settings = {
        **fingerprints,
        "alpha": config.alpha,
        "beta": config.beta,
        "top_k": config.top_k,
        "max_new_tokens": config.max_new_tokens,
        "select": config.select,
        "contrast": config.contrast,
        "prompt_style": args.prompt_style,
        "system_prompt": args.system_prompt,
        "dtype": resolve_dtype(args.dtype),
        "eos_ids": eos_ids,
        "data": source,
        "tfds_split": args.tfds_split if source.startswith(TFDS_PREFIX) else None,
        "question_field": args.question_field,
        "id_field": args.id_field,
    }
    manifest = {
        "format": FORMAT,
        "settings": settings,
        **fingerprints,
        "expert_weights_hashed": expert_hashed,
        "amateur_weights_hashed": amateur_hashed,
        "expert": str(expert.resolve()),
        "amateur": str(amateur.resolve()),
        "vocab_size": vocab_size,
        "eos_ids": eos_ids,
        "pad_id": pad_id,
        "w2s_jax_version": __version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return _Plan(config, questions, prompts, tokenizer, vocab_size, eos_ids, pad_id, manifest)


def _local_batch_size(batch_size: int, processes: int, batch_shards: int) -> int:
    """Per-process batch so that the global batch divides over the mesh's batch axes."""
    local = math.ceil(batch_size / processes)
    while (local * processes) % batch_shards:
        local += 1
    return local


def run(args: argparse.Namespace) -> int:
    from w2s_jax import sharding

    sharding.maybe_initialize_distributed()
    try:
        plan = _plan(args)
        mesh = sharding.make_mesh(args.mesh)
    except ValueError as exc:  # includes DataError, ConfigError, CheckpointError
        raise SystemExit(f"error: {exc}") from None
    return _sample(args, plan, mesh)


def _sample(args: argparse.Namespace, plan: _Plan, mesh) -> int:
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    from w2s_jax import sample_store
    from w2s_jax.files import atomic_write_json
    from w2s_jax.models import load_pretrained
    from w2s_jax.models.dtypes import warn_if_slow
    from w2s_jax.sampling import Scorer, build_records, gather_rows, rollout_and_score

    out = Path(args.out)
    process, processes = jax.process_index(), jax.process_count()
    try:
        resumed = sample_store.check_or_create_manifest(out, plan.manifest, create=process == 0)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if processes > 1:
        multihost_utils.sync_global_devices("w2s sample: manifest")
    sample_store.remove_stale_temp_files(out, process)
    done = sample_store.finished_ids(out)
    mine = list(range(len(plan.questions)))[process::processes]
    todo = [i for i in mine if plan.questions[i].id not in done]
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    local_batch = _local_batch_size(args.batch_size, processes, batch_shards)
    if local_batch * processes != args.batch_size and process == 0:
        print(f"note: global batch {local_batch * processes} (a multiple of the mesh's batch axes)")
    steps = math.ceil(len(todo) / local_batch)
    if processes > 1:
        steps = int(np.max(multihost_utils.process_allgather(np.int32(steps))))
    if process == 0 and resumed:
        print(f"resuming {out}: {len(done)} question(s) already sampled")

    if steps:
        dtype = plan.manifest["settings"]["dtype"]
        warn_if_slow(dtype)
        expert = load_pretrained(args.expert, dtype=dtype, mesh=mesh)
        amateur = load_pretrained(args.amateur, dtype=dtype, mesh=mesh)
        expert.restrict_vocab(plan.vocab_size)
        amateur.restrict_vocab(plan.vocab_size)
        scorer = Scorer(expert, amateur, config=plan.config, vocab_size=plan.vocab_size, mesh=mesh)
    bar = tqdm(total=len(todo), unit="q", desc="sampling", disable=process != 0)
    selected = 0
    for step in range(steps):
        batch = todo[step * local_batch : (step + 1) * local_batch]
        filler = plan.prompts[batch[0] if batch else 0]
        rows = [plan.prompts[i] for i in batch] + [filler] * (local_batch - len(batch))
        start = time.perf_counter()
        completion, lengths, scores = rollout_and_score(
            expert,
            scorer,
            gather_rows(rows),
            max_new_tokens=plan.config.max_new_tokens,
            eos_ids=plan.eos_ids,
            pad_id=plan.pad_id,
        )
        if not batch:
            continue
        own = slice(process * local_batch, process * local_batch + len(batch))
        records, stats = build_records(
            [plan.questions[i].id for i in batch],
            [plan.prompts[i] for i in batch],
            completion[own],
            lengths[own],
            {key: value[own] for key, value in scores.items()},
            contrast=plan.config.contrast,
        )
        stats["wall_time_s"] = time.perf_counter() - start
        sample_store.write_shard(out, records, stats, process_index=process)
        selected += sum(len(r["positions"]) for r in records)
        bar.update(len(batch))
        bar.set_postfix(selected=selected)
    bar.close()

    if processes > 1:
        multihost_utils.sync_global_devices("w2s sample: shards")
    if process != 0:
        return 0
    summary, kl = sample_store.summarize(out, beta=plan.config.beta)
    atomic_write_json(out / "summary.json", summary)
    sample_store.plot_kl_histogram(kl, plan.config.beta, out / "kl_histogram.png")
    print(
        f"{summary['questions']} questions, {summary['positions']} positions, "
        f"{summary['selected']} selected ({summary['selected_fraction']:.1%}) -> {out}"
    )
    if args.export_reference:
        rows = sample_store.export_reference(out, plan.tokenizer, args.export_reference)
        print(f"{rows} reference rows -> {args.export_reference}")
    return 0
