"""`w2s weak-to-strong`: weak-to-strong generalization (Burns et al., 2023) on two decoders.

For each seed, on labelled training data and one test split:

1. split: two disjoint halves of the training items (seeded; `split.json`);
2. weak: the weak model + a classifier head trained on half 1's ground truth (xent);
3. weak labels: the weak classifier's soft labels for half 2 (`weak_labels.jsonl`, a
   stage of its own: written atomically, checked as distributions when read back);
4. strong: the strong model trained on those labels with each loss (`w2s-<loss>`), and
   the ceiling trained on half 2's ground truth;
5. eval: every classifier's accuracy on the test split (`eval/<name>.json`).

Every sub-stage is skipped when its output exists, so a re-run resumes; all inputs
(data, labels, both models' ability to read the data) are checked before the run
folder is claimed. Under multi-host JAX every process computes every sub-stage (the
batches are split over the mesh) and process 0 alone writes; whether an output exists
is process 0's answer, so all processes take the same branch (`--out` must be a folder
they all see). report.json, report.md and report.png: accuracy with 95% Wilson CIs,
PGR per loss with bootstrap CIs over test items, the weak labels' accuracy on half 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from w2s_jax.files import atomic_write_json, atomic_write_jsonl, read_jsonl
from w2s_jax.run_folder import claim
from w2s_jax.stages.w2s_settings import STRONG_ONLY, TOY_WORLD, WeakToStrongSettings
from w2s_jax.w2s_metrics import split_halves

RUN_FILE = "w2s_config.json"
TEST_SPLIT_SEED = 0  # the held-out test items are the same for every seed


# --------------------------------------------------------------------- data


def _toy_data(settings: WeakToStrongSettings) -> tuple[list[dict], list[dict]]:
    """The toy world's judgement items: train and test splits of the shipped task."""
    from w2s_jax.data.arithmetic import TaskConfig
    from w2s_jax.data.judgement import judgement_items

    manifest = json.loads((TOY_WORLD / "manifest.json").read_text())["task"]
    task = TaskConfig(**{**manifest, "operations": tuple(manifest["operations"])})
    options = {"seed": 0, "config": task, "slip_rate": settings.slip_rate}
    options["unit"] = settings.toy_unit
    return (
        judgement_items("train", settings.train_items, **options),
        judgement_items(settings.toy_eval_split, settings.test_items, **options),
    )


def load_data(settings: WeakToStrongSettings) -> tuple[list[dict], list[dict]]:
    """(train records, test records), checked (DataError naming the file and line)."""
    from w2s_jax.classify import read_examples
    from w2s_jax.files import DataError

    if not settings.data:
        return _toy_data(settings)
    records = read_examples(settings.data, settings.num_classes)
    if settings.test_data:
        test = read_examples(settings.test_data, settings.num_classes)
        shared = {r["id"] for r in records} & {r["id"] for r in test}
        if shared:
            raise DataError(f"{settings.test_data}: ids also in --data, e.g. {min(shared)!r}")
        return records, test
    if len(records) < settings.test_items + 4:
        raise DataError(
            f"{settings.data}: {len(records)} records, too few to hold out --test-items "
            f"{settings.test_items} and train on two halves; give --test-data"
        )
    order = np.random.default_rng(TEST_SPLIT_SEED).permutation(len(records))
    test = [records[i] for i in sorted(order[: settings.test_items])]
    return [records[i] for i in sorted(order[settings.test_items :])], test


def _digest(records: list[dict]) -> str:
    text = json.dumps(records, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _encode(settings: WeakToStrongSettings, folder: Path, train, test, log) -> dict:
    """One model's token rows of the train and test records (ValueError if it cannot);
    says how many records were cut to --max-length."""
    from w2s_jax.classify import encode_examples
    from w2s_jax.prompts import EVAL_SYSTEM_PROMPT

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    options = {
        "style": settings.prompt_style,
        "system_prompt": EVAL_SYSTEM_PROMPT
        if settings.system_prompt is None
        else settings.system_prompt,
        "max_length": settings.max_length,
    }
    rows, pad_id, cut = encode_examples(folder, train + test, **options)
    if cut:
        log(
            f"note: {cut} of {len(rows)} records are longer than --max-length "
            f"{settings.max_length} tokens for {folder}: each keeps its last {settings.max_length}"
        )
    ids = [r["id"] for r in train]
    return {
        "train": dict(zip(ids, rows[: len(train)], strict=True)),
        "test": rows[len(train) :],
        "pad_id": pad_id,
    }


def _is_leader() -> bool:
    from w2s_jax.sharding import is_leader

    return is_leader()


def _exists(path: Path) -> bool:
    """Whether the file `path` exists, as process 0 sees it (the same answer everywhere)."""
    from w2s_jax.sharding import leader_says

    return leader_says(path.is_file())


# --------------------------------------------------------------------- one classifier


@dataclasses.dataclass
class _Run:
    """What every classifier of one invocation shares."""

    settings: WeakToStrongSettings
    mesh: object
    dtype: str
    test_labels: np.ndarray
    log: object


def _fit_options(run: _Run, loss: str, seed: int, *, weak: bool):
    from w2s_jax.classify import FitOptions

    s = run.settings
    if loss == "logconf":
        loss_options = (("aux_coef", s.aux_coef), ("warmup_frac", s.warmup_frac))
        loss_options += (("warmup", s.warmup),)
    elif loss == "product":
        loss_options = (("alpha", s.product_alpha), ("beta", s.product_beta))
    else:
        loss_options = ()
    fields = ("batch_size", "warmup_steps", "weight_decay")
    learning_rate = s.weak_learning_rate if weak and s.weak_learning_rate else s.learning_rate
    return FitOptions(
        loss=loss,
        learning_rate=learning_rate,
        epochs=s.weak_epochs if weak and s.weak_epochs else s.epochs,
        loss_options=loss_options,
        seed=seed,
        max_grad_norm=s.max_grad_norm,
        length_bucket=s.length_bucket,
        progress=s.progress,
        **{f: getattr(s, f) for f in fields},
    )


def _spec(run: _Run, base: Path, mode: str):
    from w2s_jax.models.classifier import ClassifierSpec
    from w2s_jax.train_config import LoRAConfig

    s = run.settings
    lora = LoRAConfig(s.lora_rank, s.lora_alpha, s.lora_targets, dropout=0.0)
    return ClassifierSpec(str(base.absolute()), s.num_classes, mode, lora)


def _classifier(run: _Run, folder: Path, role: str, encoded, ids, labels, loss, seed):
    """The `role` ("weak" or "strong") classifier saved in `folder`, trained first when it
    is not there yet."""
    from w2s_jax.classify import fit
    from w2s_jax.models.classifier import (
        META_FILE,
        build_classifier,
        load_classifier,
        save_classifier,
    )

    if _exists(folder / META_FILE):
        return load_classifier(folder, dtype=run.dtype, mesh=run.mesh)
    s, weak = run.settings, role == "weak"
    spec = _spec(run, s.weak_dir if weak else s.strong_dir, s.weak_mode if weak else s.mode)
    model = build_classifier(
        spec,
        dtype=run.dtype,
        mesh=run.mesh,
        seed=seed,
        allow_unused=run.settings.allow_unused_weights,
    )
    rows = [encoded["train"][i] for i in ids]
    summary = fit(
        model,
        spec.mode,
        rows,
        labels,
        _fit_options(run, loss, seed, weak=weak),
        pad_id=encoded["pad_id"],
        mesh=run.mesh,
        log=run.log,
    )
    if _is_leader():
        atomic_write_json(folder / "train_summary.json", summary)
    save_classifier(model, folder, spec)  # on every process: process 0 writes
    return model


def _predict(run: _Run, model, rows, pad_id) -> np.ndarray:
    from w2s_jax.classify import predict

    s = run.settings
    return predict(
        model,
        rows,
        batch_size=max(s.batch_size, 64),
        length_bucket=s.length_bucket,
        pad_id=pad_id,
        mesh=run.mesh,
    )


def _scored(run: _Run, seed_dir: Path, name: str, build) -> dict:
    """eval/<name>.json (test probabilities and correctness), computed when missing."""
    path = seed_dir / "eval" / f"{name}.json"
    if _exists(path):
        return json.loads(path.read_text())
    started = time.perf_counter()
    model, encoded = build()
    probs = _predict(run, model, encoded["test"], encoded["pad_id"])
    correct = (probs.argmax(-1) == run.test_labels).tolist()
    train_file = seed_dir / "models" / name / "train_summary.json"
    leader = _is_leader()  # the only process that writes, and so reads back, this run's files
    result = {
        "name": name,
        "accuracy": float(np.mean(correct)),
        "correct": correct,
        "probs": probs.round(6).tolist(),
        "seconds": time.perf_counter() - started,
        "train": json.loads(train_file.read_text()) if leader and train_file.is_file() else None,
    }
    if leader:
        atomic_write_json(path, result, indent=None)
    return result


# --------------------------------------------------------------------- one seed


def weak_labels(run: _Run, path: Path, weak_model, ids: list[str], encoded, golds: dict):
    """(soft labels [N, C] of `ids`, their accuracy): `path` (JSONL {id, soft_label, label})
    is written from the weak classifier's predictions when missing, and checked either way."""
    from w2s_jax.files import DataError
    from w2s_jax.objectives.w2s_losses import check_soft_labels

    if _exists(path):
        records = [r for _, r in read_jsonl(path)]
    else:
        probs = _predict(run, weak_model(), [encoded["train"][i] for i in ids], encoded["pad_id"])
        records = [
            {"id": i, "soft_label": p.tolist(), "label": golds[i]}
            for i, p in zip(ids, probs, strict=True)
        ]
        if _is_leader():
            atomic_write_jsonl(path, records)
    if [r.get("id") for r in records] != ids:
        raise DataError(f"{path}: its ids are not the second half's; delete it to relabel")
    soft = np.asarray([r.get("soft_label") for r in records], dtype=object)
    try:
        soft = soft.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: soft_label must be a list of numbers per record") from None
    check_soft_labels(soft, run.settings.num_classes, where=str(path))
    accuracy = float(np.mean(soft.argmax(-1) == np.asarray([golds[i] for i in ids])))
    return soft.astype(np.float32), accuracy


def _halves(seed_dir: Path, ids: list[str], seed: int) -> tuple[list[str], list[str]]:
    path = seed_dir / "split.json"
    if _exists(path):
        split = json.loads(path.read_text())
        return split["half1"], split["half2"]
    half1, half2 = split_halves(ids, seed)
    if _is_leader():
        atomic_write_json(path, {"seed": seed, "half1": half1, "half2": half2}, indent=None)
    return half1, half2


def _run_seed(run: _Run, seed: int, out: Path, train: list[dict], encoded: dict) -> dict:
    """Every sub-stage of one seed; returns {"models": {name: eval}, "weak_label_accuracy"}."""
    from functools import cache

    from w2s_jax.classify import one_hot_labels

    s, seed_dir = run.settings, out / f"seed-{seed}"
    golds = {r["id"]: r["label"] for r in train}
    half1, half2 = _halves(seed_dir, [r["id"] for r in train], seed)
    truth1, truth2 = (
        one_hot_labels([{"label": golds[i]} for i in half], s.num_classes)
        for half in (half1, half2)
    )
    models = seed_dir / "models"

    @cache
    def weak():
        return _classifier(
            run, models / "weak", "weak", encoded["weak"], half1, truth1, "xent", seed
        )

    def strong(name, labels, loss):
        return lambda: (
            _classifier(run, models / name, "strong", encoded["strong"], half2, labels, loss, seed),
            encoded["strong"],
        )

    run.log(f"[seed {seed}] weak: train on half 1 ({len(half1)}), score the test split")
    results = {"weak": _scored(run, seed_dir, "weak", lambda: (weak(), encoded["weak"]))}
    soft, label_accuracy = weak_labels(
        run, seed_dir / "weak_labels.jsonl", weak, half2, encoded["weak"], golds
    )
    run.log(f"[seed {seed}] weak labels on half 2 ({len(half2)}): {label_accuracy:.1%} right")
    arms = [("ceiling", truth2, "xent")] + [(f"w2s-{x}", soft, x) for x in s.losses]
    for name, labels, loss in arms:
        results[name] = _scored(run, seed_dir, name, strong(name, labels, loss))
        run.log(f"[seed {seed}] {name}: test accuracy {results[name]['accuracy']:.1%}")
    return {"models": results, "weak_label_accuracy": label_accuracy}


# --------------------------------------------------------------------- reuse


WEAK_SIDE = ("split.json", "weak_labels.jsonl", "eval/weak.json", "models/weak")


def _check_weak_source(source: Path, document: dict, seeds: int) -> None:
    """ValueError unless `source` is a run whose weak side this run may reuse."""
    from w2s_jax.run_folder import read_record, settings_difference

    record = source / RUN_FILE
    if not record.is_file():
        raise FileNotFoundError(f"--weak-from {source}: no {RUN_FILE} there")
    theirs = read_record(record)
    ignore = {f"settings.{k}" for k in STRONG_ONLY} | {"strong_weights"}
    flat = [
        {f"settings.{k}": v for k, v in doc["settings"].items()}
        | {k: v for k, v in doc.items() if k != "settings"}
        for doc in (theirs, document)
    ]
    diff = settings_difference(*flat, ignore=ignore | {"settings.seeds"})
    if diff:
        raise ValueError(
            f"--weak-from {source}: its weak side was made with other settings or data "
            "(theirs -> this run's): " + "; ".join(diff)
        )
    for seed in range(seeds):
        missing = [n for n in WEAK_SIDE if not (source / f"seed-{seed}" / n).exists()]
        if missing:
            raise FileNotFoundError(
                f"--weak-from {source}/seed-{seed}: missing {', '.join(missing)} (run it first)"
            )


def _copy_weak_side(source: Path, out: Path, seeds: int) -> None:
    """The weak side of every seed copied from `source` (what is already here is kept)."""
    import shutil

    for seed in range(seeds):
        for name in WEAK_SIDE:
            src, dst = source / f"seed-{seed}" / name, out / f"seed-{seed}" / name
            if dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".tmp")
            if tmp.is_dir():
                shutil.rmtree(tmp)
            tmp.unlink(missing_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, tmp)
            tmp.rename(dst)


# --------------------------------------------------------------------- the stage


def weak_to_strong(settings: WeakToStrongSettings, *, log=print) -> dict:
    """Run (or resume) a weak-to-strong experiment into `settings.out`; returns the report
    (under multi-host JAX: on every process, written and logged by process 0)."""
    from w2s_jax.fingerprint import weights_fingerprint
    from w2s_jax.models.dtypes import resolve_dtype
    from w2s_jax.sharding import barrier, make_mesh
    from w2s_jax.w2s_report import build_report, write_report

    started, leader = time.perf_counter(), _is_leader()
    if not leader:
        log = _quiet
    out = Path(settings.out)
    train, test = load_data(settings)
    encoded = {
        role: _encode(settings, folder, train, test, log)
        for role, folder in (("weak", settings.weak_dir), ("strong", settings.strong_dir))
    }
    document = {
        "settings": settings.settings(),
        "train_digest": _digest(train),
        "test_digest": _digest(test),
        "weak_weights": weights_fingerprint(settings.weak_dir),
        "strong_weights": weights_fingerprint(settings.strong_dir),
    }
    if settings.weak_from:
        _check_weak_source(Path(settings.weak_from), document, settings.seeds)
    out.mkdir(parents=True, exist_ok=True)
    has_results = any(out.glob("seed-*/split.json"))
    claim(
        out / RUN_FILE,
        document,
        what="a weak-to-strong run",
        has_results=has_results,
        write=leader,
    )
    if settings.weak_from and leader:
        _copy_weak_side(Path(settings.weak_from), out, settings.seeds)
    barrier("w2s weak-to-strong: folder claimed")  # every process read it before results
    run = _Run(
        settings,
        make_mesh(settings.mesh),
        resolve_dtype(settings.dtype),
        np.asarray([r["label"] for r in test]),
        log,
    )
    seeds = [_run_seed(run, seed, out, train, encoded) for seed in range(settings.seeds)]
    report = build_report(settings, seeds, test_items=len(test), train_items=len(train))
    report["wall_time_s"] = time.perf_counter() - started
    if leader:
        write_report(report, out)
    return report


def _quiet(*_) -> None:
    """The log of the processes other than 0."""
