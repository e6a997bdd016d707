"""The sampling stage's output folder: manifest, atomic JSONL shards, resume, summary, export.

Layout of `OUT`:
- `manifest.json`: the settings that shape the samples (refused if they change on
  resume) and the fingerprints of the expert, amateur and tokenizer.
- `samples/pPPP-NNNNN.jsonl`: one record per question (`w2s_jax.records.SampleRecord`),
  one shard per batch and process, written atomically; a shard on disk is a finished batch.
- `samples/pPPP-NNNNN.stats.json`: per-shard sums the records do not carry
  (plausible-set sizes, top-k dropped mass, compute time); written before its shard.
- `summary.json` and `kl_histogram.png`: rebuilt from all shards at the end of a run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from w2s_jax.files import DataError, atomic_write_json, atomic_write_jsonl, read_jsonl
from w2s_jax.records import SampleRecord
from w2s_jax.run_folder import claim

FORMAT = "w2s_jax.samples/1"
KL_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
_SHARD_RE = re.compile(r"^p(\d{3})-(\d{5})\.jsonl$")


def manifest_path(out: str | Path) -> Path:
    return Path(out) / "manifest.json"


def read_manifest(out: str | Path) -> dict:
    """The manifest of a samples folder; DataError if it is missing or unreadable."""
    path = manifest_path(out)
    if not path.is_file():
        raise DataError(f"{path}: no such file (not a `w2s sample` output folder?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path}: not a {FORMAT} manifest")
    return manifest


def check_or_create_manifest(out: str | Path, manifest: dict, *, create: bool = True) -> bool:
    """Refuse an `out` whose recorded settings differ; write the manifest if there is none.

    Returns True when `out` already held a manifest (a resumed run). With
    `create=False` (non-leader processes) nothing is written.
    """
    out = Path(out)
    path = manifest_path(out)
    if path.exists():
        read_manifest(out)  # a samples manifest, not some other JSON file
    elif shard_paths(out):
        raise DataError(f"{out}/samples holds shards but {path} is missing; refusing to mix runs")
    return claim(
        path,
        manifest,
        settings_key="settings",
        what="samples",
        write=create,
        has_results=bool(shard_paths(out)),
    )


def samples_dir(out: str | Path) -> Path:
    return Path(out) / "samples"


def shard_paths(out: str | Path) -> list[Path]:
    """Finished shards of every process, in (process, index) order."""
    folder = samples_dir(out)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _SHARD_RE.match(p.name))


def _stats_path(shard: Path) -> Path:
    return shard.with_name(shard.name[: -len(".jsonl")] + ".stats.json")


def read_samples(out: str | Path) -> Iterator[dict]:
    """Every record of every finished shard of `out`, in shard order, as its JSON object,
    checked by `SampleRecord.from_json` (DataError naming the shard and line)."""
    for shard in shard_paths(out):
        for lineno, record in read_jsonl(shard):
            SampleRecord.from_json(record, where=f"{shard}:{lineno}")
            yield record


def finished_ids(out: str | Path) -> set[str]:
    """Ids of the questions already sampled into `out` (by any process)."""
    return set(finished_prompts(out))


def finished_prompts(out: str | Path) -> dict[str, list[int]]:
    """{id: prompt ids} of the questions already sampled into `out` (by any process)."""
    return {record["id"]: record["prompt_ids"] for record in read_samples(out)}


def remove_stale_temp_files(out: str | Path, process_index: int) -> None:
    """Delete this process's temp files left by a killed run (never another process's)."""
    folder = samples_dir(out)
    if folder.is_dir():
        for path in folder.glob(f".p{process_index:03d}-*.tmp"):
            path.unlink(missing_ok=True)


def write_shard(
    out: str | Path, records: Iterable[SampleRecord | dict], stats: dict, *, process_index: int
) -> Path:
    """Write one batch's records (`SampleRecord`s or their JSON objects) as the next shard
    of `process_index`, atomically.

    The stats sidecar goes first, the shard last: a shard on disk means the whole
    batch is done, and a kill in between leaves only a sidecar that the next
    shard of the same name overwrites.
    """
    folder = samples_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    taken = [
        int(m.group(2))
        for p in folder.iterdir()
        if (m := _SHARD_RE.match(p.name)) and int(m.group(1)) == process_index
    ]
    shard = folder / f"p{process_index:03d}-{max(taken, default=-1) + 1:05d}.jsonl"
    rows = [r.to_json() if isinstance(r, SampleRecord) else r for r in records]
    atomic_write_json(_stats_path(shard), stats)
    atomic_write_jsonl(shard, rows)
    return shard


def summarize(
    out: str | Path, *, beta: float, cross_tokenizer: dict | None = None
) -> tuple[dict, np.ndarray]:
    """Summary over every finished shard, and the flat array of KL values at all positions
    (all aligned positions, for an amateur of another tokenizer).

    `cross_tokenizer` (the manifest's block of that name, for such an amateur) adds a
    `cross_tokenizer` section: the aligned share of positions, the amateur's mapped mass
    per aligned position (mean, p10, median), and the map's coverage and mode.
    """
    kl_chunks, questions, selected, prompt_tokens, positions = [], 0, 0, 0, 0
    for record in read_samples(out):
        questions += 1
        selected += len(record["positions"])
        prompt_tokens += len(record["prompt_ids"])
        positions += len(record["kl"])
        kl_chunks.append(np.array([v for v in record["kl"] if v is not None], np.float64))
    kl = np.concatenate(kl_chunks) if kl_chunks else np.zeros(0)
    sums = {"plausible_size_sum": 0.0, "dropped_mass_sum": 0.0, "wall_time_s": 0.0}
    dropped_max, mapped_mass = 0.0, []
    for shard in shard_paths(out):
        if not _stats_path(shard).is_file():
            raise DataError(f"{_stats_path(shard)}: missing (written with every shard)")
        stats = json.loads(_stats_path(shard).read_text())
        for key in sums:
            sums[key] += stats[key]
        dropped_max = max(dropped_max, stats["dropped_mass_max"])
        mapped_mass += stats.get("mapped_mass", [])
    summary = {
        "questions": questions,
        "prompt_tokens": prompt_tokens,
        "positions": positions,
        "selected": selected,
        "selected_fraction": selected / positions if positions else 0.0,
        "beta": beta,
        "kl_mean": float(kl.mean()) if positions else None,
        "kl_quantiles": {
            f"p{round(q * 100)}": float(np.quantile(kl, q)) if positions else None
            for q in KL_QUANTILES
        },
        "kl_below_0.1_fraction": float((kl < 0.1).mean()) if positions else None,
        "mean_plausible_size": sums["plausible_size_sum"] / selected if selected else None,
        "mean_dropped_mass": sums["dropped_mass_sum"] / selected if selected else None,
        "max_dropped_mass": dropped_max,
        "wall_time_s": sums["wall_time_s"],
        "tokens_per_s": positions / sums["wall_time_s"] if sums["wall_time_s"] else None,
    }
    if cross_tokenizer is not None:
        summary["cross_tokenizer"] = _cross_summary(
            cross_tokenizer, kl.size, positions, mapped_mass
        )
    return summary, kl


def cross_summary_line(summary: dict) -> str:
    """ ", A% aligned, mapped mass mean M (p10 P), map coverage C" for a summary with a
    `cross_tokenizer` section; "" without one."""
    cross = summary.get("cross_tokenizer")
    if cross is None:
        return ""
    mass, share = cross["mapped_mass"], cross["aligned_share"]
    parts = [f"{share:.1%} of positions aligned" if share is not None else "no positions"]
    if mass["mean"] is not None:
        parts.append(f"mapped amateur mass mean {mass['mean']:.3f} (p10 {mass['p10']:.3f})")
    parts.append(f"map covers {cross['coverage']['token_occurrences']:.1%} of question tokens")
    return "; " + ", ".join(parts)


def _cross_summary(manifest_block: dict, aligned: int, positions: int, mapped_mass) -> dict:
    mass = np.asarray(mapped_mass, np.float64)
    stat = lambda f: float(f(mass)) if mass.size else None  # noqa: E731
    return {
        "aligned_positions": aligned,
        "aligned_share": aligned / positions if positions else None,
        "mapped_mass": {
            "mean": stat(np.mean),
            "p10": stat(lambda m: np.quantile(m, 0.1)),
            "p50": stat(np.median),
        },
        "coverage": manifest_block["coverage"],
        "unmapped_mass": manifest_block["unmapped_mass"],
    }


def plot_kl_histogram(kl: np.ndarray, beta: float, path: str | Path) -> None:
    """Histogram of per-position KL (log count axis) with the β threshold line; PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from w2s_jax.files import atomic_save_figure

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    top = max(float(kl.max()) if kl.size else 1.0, beta * 2)
    ax.hist(kl, bins=np.linspace(0.0, top, 61), color="tab:blue")
    ax.axvline(beta, color="tab:red", linestyle="--", label=f"β = {beta:g}")
    ax.set_yscale("log")
    ax.set_xlabel("KL(π_E ‖ π_A) per rollout position")
    ax.set_ylabel("positions")
    selected = int((kl > beta).sum())
    ax.set_title(f"{kl.size} positions, {selected} above β ({selected / max(kl.size, 1):.1%})")
    ax.legend()
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)  # tight_layout: +0.1 s
    atomic_save_figure(fig, path)
    plt.close(fig)


def reference_rows(record: dict, tokenizer) -> Iterator[dict]:
    """One LightReasoner-reference JSONL row per selected step of a record.

    Fields: prompt_id, step (index into the completion), prefix (decoded
    completion before the step), tokens (each target id decoded alone),
    token_ids, weights, kl_divergence. Text fields are for humans and the
    reference's tools only; this project never re-tokenizes them.
    """
    completion = record["completion_ids"]
    for step, ids, weights in zip(
        record["positions"], record["target_ids"], record["target_weights"], strict=True
    ):
        yield {
            "prompt_id": record["id"],
            "step": step,
            "prefix": tokenizer.decode(completion[:step]),
            "tokens": [tokenizer.decode([i]) for i in ids],
            "token_ids": ids,
            "weights": weights,
            "kl_divergence": record["kl"][step],
        }


def export_reference(out: str | Path, tokenizer, path: str | Path) -> int:
    """Write every selected step of `out` in the reference's format to `path`; returns rows."""
    rows = [row for record in read_samples(out) for row in reference_rows(record, tokenizer)]
    atomic_write_jsonl(path, rows)
    return len(rows)
