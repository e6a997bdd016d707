"""Model sources of `w2s sample`: an HF folder, a `w2s train` run at a step, or `base`.

A source is one of
  DIR        an HF model folder (config.json + safetensors);
  RUN        a `w2s train --out` folder with checkpoints: its latest step;
  RUN@STEP   that run's checkpoint of step STEP (a step it did not keep is refused,
             naming the steps kept);
  base       (the amateur only) the model the expert's training started from: the
             base of an expert given as RUN or RUN@STEP, or of an expert folder made by
             `w2s export` (its export_report.json names the checkpoint and the base).
A run's model is its recorded base folder (train_config.json `expert`, refused when its
weights fingerprint is not the one the checkpoint recorded) plus the checkpoint: LoRA
adapters, or every parameter for full fine-tuning (rank 0). Its config and tokenizer
are the base folder's. When expert and amateur start from one folder, `load_pair`
loads it once and both models hold the same base arrays (one model plus two adapter
sets in memory). `manifest_entries` identifies each model exactly; `check_sampled_by`
lets `w2s train` accept samples of a run source when given that checkpoint's export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

from w2s_jax.files import DataError

BASE = "base"
_RUN_AT_STEP = re.compile(r"^(?P<run>.+)@(?P<step>\d+)$")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved source: `folder` is the HF folder its config, tokenizer and (base)
    weights come from; a run adds its `checkpoints` folder, `step` and LoRA `rank`
    (0: full fine-tuning)."""

    spec: str
    folder: Path
    checkpoints: Path | None = None
    step: int | None = None
    rank: int | None = None

    @property
    def kind(self) -> str:
        """One of "run", "base", "folder"."""
        if self.checkpoints is not None:
            return "run"
        return BASE if self.spec == BASE else "folder"

    @property
    def checkpoint(self) -> Path | None:
        """The step's checkpoint folder (RUN/checkpoints/STEP) of a run source."""
        return None if self.checkpoints is None else self.checkpoints / str(self.step)


def parse_source(role: str, spec: str) -> ModelSource:
    """The source `spec` names (DIR, RUN or RUN@STEP); ValueError naming what is wrong.

    A folder that exists is taken as it is (so a folder whose name ends in @digits
    still works); otherwise a trailing @STEP picks a run's step.
    """
    path, step = Path(spec), None
    if not path.is_dir() and (match := _RUN_AT_STEP.match(spec)):
        path, step = Path(match["run"]), int(match["step"])
    if not path.is_dir():
        raise ValueError(
            f"{role} model folder {spec} does not exist (a source is an HF model folder, a "
            "`w2s train` run folder RUN, or RUN@STEP)"
        )
    if (path / "checkpoints").is_dir():
        return _run_source(role, spec, path, step)
    if step is not None:
        raise ValueError(f"{role} {spec}: {path} is not a `w2s train` run (no checkpoints/)")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{role} model folder {path} has no config.json (nor checkpoints/ of a `w2s train` run)"
        )
    return ModelSource(spec, path)


def _run_source(role: str, spec: str, run: Path, step: int | None) -> ModelSource:
    from w2s_jax.checkpointing import locate_checkpoint, read_meta
    from w2s_jax.lora import LoRAConfig, check_adapter_base
    from w2s_jax.run_folder import read_record
    from w2s_jax.train import RUN_FILE

    try:
        checkpoints, step = locate_checkpoint(run, step)
    except FileNotFoundError as exc:
        raise ValueError(f"{role} {spec}: {exc}") from exc
    recorded = run / RUN_FILE
    base = read_record(recorded).get("expert") if recorded.is_file() else None
    if not base:
        raise ValueError(
            f"{role} {spec}: {recorded} names no base model folder (`expert`); a run source "
            "must be a `w2s train` run on an HF --expert (not --init random)"
        )
    base = Path(base)
    if not (base / "config.json").is_file():
        raise ValueError(f"{role} {spec}: its base model folder {base} has no config.json")
    rank = LoRAConfig.from_dict(read_meta(checkpoints, step=step)["lora"]).rank
    check_adapter_base(checkpoints / str(step), base)  # ValueError if the base has changed
    return ModelSource(spec, base, checkpoints, step, rank)


def base_of(expert: ModelSource) -> ModelSource:
    """The `base` amateur of `expert`: the folder its training started from."""
    from w2s_jax.export import REPORT_FILE
    from w2s_jax.lora import check_adapter_base
    from w2s_jax.run_folder import read_record

    if expert.checkpoints is not None:
        return ModelSource(BASE, expert.folder)
    report = expert.folder / REPORT_FILE
    exported = read_record(report) if report.is_file() else {}
    base = exported.get("expert")
    if not base:
        raise ValueError(
            f"--amateur base needs an expert that records its base model: a `w2s train` run "
            f"(RUN or RUN@STEP) or a `w2s export --expert DIR` of one (its {REPORT_FILE} "
            f"names the base); expert {expert.spec} is "
            + (f"an export without a base (see {report})" if report.is_file() else "neither")
        )
    base = Path(base)
    if not (base / "config.json").is_file():
        raise ValueError(f"--amateur base: {report} names base {base}, which has no config.json")
    checkpoint = Path(exported.get("checkpoint") or "")
    if checkpoint.name and checkpoint.is_dir():  # still kept: its base must match
        check_adapter_base(checkpoint, base)
    return ModelSource(BASE, base)


def resolve_pair(expert: str, amateur: str) -> tuple[ModelSource, ModelSource]:
    """The expert's and the amateur's sources (`amateur` may be `base`)."""
    resolved = parse_source("expert", expert)
    if amateur == BASE:
        return resolved, base_of(resolved)
    return resolved, parse_source("amateur", amateur)


def source_record(source: ModelSource) -> dict:
    """What identifies the model: its spec, kind and `fingerprint`; the base folder's
    weights record, and for a run the checkpoint folder, step, LoRA rank and the hash
    of every file of that step's checkpoint. A folder's fingerprint is its weights
    fingerprint; a run's hashes the base's and the checkpoint's together."""
    from w2s_jax.fingerprint import folder_fingerprint_record, weights_fingerprint_record

    weights = weights_fingerprint_record(source.folder)
    record = {
        "spec": source.spec,
        "kind": source.kind,
        "folder": str(source.folder.resolve()),
        "weights_hashed": weights,
        "weights_fingerprint": weights["fingerprint"],
        "fingerprint": weights["fingerprint"],
    }
    if source.checkpoint is None:
        return record
    hashed = folder_fingerprint_record(source.checkpoint)
    listing = f"{weights['fingerprint']}  base\n{hashed['fingerprint']}  checkpoint\n"
    return record | {
        "checkpoint": str(source.checkpoint.resolve()),
        "step": source.step,
        "lora_rank": source.rank,
        "checkpoint_hashed": hashed,
        "fingerprint": hashlib.sha256(listing.encode()).hexdigest(),
    }


def manifest_entries(expert: ModelSource, amateur: ModelSource) -> tuple[dict, dict]:
    """(recorded settings, other manifest entries) identifying both models.

    The settings hold each model's fingerprint and checkpoint step (None for a folder),
    so a resumed run whose adapters or step changed is refused; the entries hold the
    models' folders, hashed files and full source records.
    """
    settings, entries = {}, {}
    for role, source in (("expert", expert), ("amateur", amateur)):
        record = source_record(source)
        settings[f"{role}_weights_fingerprint"] = record["fingerprint"]
        settings[f"{role}_step"] = record.get("step")
        entries[f"{role}_weights_hashed"] = record["weights_hashed"]
        entries[role] = record["folder"]
        entries[f"{role}_source"] = {k: v for k, v in record.items() if k != "weights_hashed"}
    return settings, entries


def load_pair(expert: ModelSource, amateur: ModelSource, *, mesh=None, **options):
    """(expert, amateur) models; `options` go to `load_pretrained`.

    Sources on one base folder share it: it is loaded once and both models hold the
    same base parameter arrays, each with its own checkpoint applied (`load_lora_into`).
    """
    from flax import nnx

    from w2s_jax.lora import load_lora_into
    from w2s_jax.models import load_pretrained

    if expert.folder.resolve() == amateur.folder.resolve():
        graphdef, state = nnx.split(load_pretrained(expert.folder, mesh=mesh, **options))
        # copy=True: new Variables (an adapter or full update of one leaves the other
        # alone) around the same arrays (no device copy)
        models = [nnx.merge(graphdef, state, copy=True) for _ in range(2)]
    else:
        models = [load_pretrained(s.folder, mesh=mesh, **options) for s in (expert, amateur)]
    for model, source in zip(models, (expert, amateur), strict=True):
        if source.checkpoints is not None:
            load_lora_into(model, source.checkpoints, step=source.step)
    return tuple(models)


def check_sampled_by(manifest: dict, samples, expert) -> None:
    """DataError unless `expert` (an HF folder) is the model whose rollouts `samples` holds:
    the same weights, or, for samples of a run source, the `w2s export` of that run's
    checkpoint (the same checkpoint files, else the same folder and step; for LoRA the
    same base weights too)."""
    from w2s_jax.fingerprint import weights_fingerprint

    source = manifest.get("expert_source") or {}
    recorded = manifest.get("expert_weights_fingerprint")
    if source.get("kind") != "run":
        actual = weights_fingerprint(expert)
        if recorded != actual:
            raise DataError(
                f"{samples}/manifest.json: the samples were made with different expert weights "
                f"(expert_weights_fingerprint {recorded} there, {actual} for --expert "
                f"{expert}); sample again with this expert or train the expert they came from"
            )
        return
    problem = _not_export_of(source, Path(expert))
    if problem:
        raise DataError(
            f"{samples}/manifest.json: the samples were made by the run checkpoint "
            f"{source['checkpoint']} (expert {source['spec']}), but --expert {expert} {problem}; "
            f"train on its export: w2s export --lora {Path(source['checkpoint']).parent.parent} "
            f"--step {source['step']} --expert {source['folder']} --out DIR"
        )


def _not_export_of(source: dict, expert: Path) -> str | None:
    """Why `expert` is not the export of the run checkpoint `source` records (None if it is)."""
    from w2s_jax.export import REPORT_FILE
    from w2s_jax.fingerprint import folder_fingerprint_record, weights_fingerprint
    from w2s_jax.run_folder import read_record

    report = expert / REPORT_FILE
    if not report.is_file():
        return f"is not a `w2s export` folder (no {REPORT_FILE})"
    exported = read_record(report)
    checkpoint = Path(exported.get("checkpoint") or "")
    if checkpoint.name and checkpoint.is_dir():  # the same checkpoint files, wherever they are
        same = folder_fingerprint_record(checkpoint) == source["checkpoint_hashed"]
    else:  # since removed: the same folder and step
        same = str(checkpoint.resolve()) == source["checkpoint"]
    if not same:
        return f"is the export of another checkpoint ({exported.get('checkpoint')})"
    if source.get("lora_rank"):
        base = exported.get("expert")
        if not base or weights_fingerprint(base) != source["weights_fingerprint"]:
            return f"merged the adapters into another base ({base}) than {source['folder']}"
    return None
