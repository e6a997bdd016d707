"""The demo arms' training data, all derived from one every-position sampling pass
(see `w2s_jax.demo`): which positions each arm supervises and towards which targets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from w2s_jax.files import atomic_write_json, atomic_write_jsonl


def write_arm_data(folder: Path, manifest: dict, records: list[dict]) -> dict:
    """A samples folder (manifest + one shard) for one arm; returns its data stats."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(tmp / "manifest.json", manifest)
    atomic_write_jsonl(tmp / "samples" / "p000-00000.jsonl", records)
    data_stats = {
        "supervised_tokens": sum(len(r["positions"]) for r in records),
        "problems_used": sum(bool(r["positions"]) for r in records),
    }
    atomic_write_json(tmp / "data_stats.json", data_stats)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return data_stats


def derive_arm_records(records: list[dict], arm: str, beta: float, golds: dict, tokenizer):
    """Training records of `arm` from every-position sample records (see module doc)."""
    from w2s_jax.grading import extract_answer, is_equiv

    out = []
    for r in records:
        kl = np.asarray(r["kl"], np.float64)
        all_positions = r["positions"]
        if arm == "no_select":
            keep = list(range(len(all_positions)))
        elif arm == "sft":
            text = tokenizer.decode(r["completion_ids"], skip_special_tokens=True)
            right = is_equiv(extract_answer(text), golds[r["id"]])
            keep = list(range(len(all_positions))) if right else []
        else:
            keep = [j for j, t in enumerate(all_positions) if kl[t] > beta]
        positions = [all_positions[j] for j in keep]
        if arm == "no_contrast" or arm == "sft":
            target_ids = [[r["completion_ids"][t]] for t in positions]
            target_weights = [[1.0] for _ in positions]
        else:
            target_ids = [r["target_ids"][j] for j in keep]
            target_weights = [r["target_weights"][j] for j in keep]
        out.append(
            r | {"positions": positions, "target_ids": target_ids, "target_weights": target_weights}
        )
    return out


def weak_sft_records(records: list[dict], predictions: list[dict], tokenizer) -> list[dict]:
    """Training records of the weak_sft arm (weak-to-strong generative SFT): per question,
    the amateur's greedy solution (a `w2s eval` prediction row, no ground truth read) as
    a one-hot target at every token, after the expert's prompt from `records` (the
    sampling records); solutions cut at the token limit supervise nothing."""
    from w2s_jax.prompts import end_of_turn_id

    end = end_of_turn_id(tokenizer)
    solutions = {p["id"]: p for p in predictions}
    out = []
    for r in records:
        solution = solutions[r["id"]]
        ids = (
            []
            if solution["hit_max_new_tokens"]
            else tokenizer(solution["output"], add_special_tokens=False)["input_ids"]
        )
        completion = [*ids, end] if ids else r["completion_ids"]
        positions = list(range(len(completion))) if ids else []
        out.append(
            {k: v for k, v in r.items() if k != "kl"}  # the expert's KL: not this completion's
            | {
                "completion_ids": completion,
                "positions": positions,
                "target_ids": [[completion[t]] for t in positions],
                "target_weights": [[1.0] for _ in positions],
            }
        )
    return out
