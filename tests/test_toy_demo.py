"""`w2s demo` on the shipped toy world: a reduced run end to end, its report, its arms' data,
resume; and the shipped checkpoints against their recorded validation accuracy."""

from __future__ import annotations

import json
import struct
from dataclasses import replace

import pytest

from w2s_jax.demo import DemoSettings, run_demo
from w2s_jax.demo_report import ARMS
from w2s_jax.demo_worlds import ASSETS
from w2s_jax.files import read_jsonl
from w2s_jax.run_folder import SettingsChanged

# every arm the toy world can run (the cross-tokenizer arm needs the Qwen world's SmolLM2)
TOY_WORLD_ARMS = tuple(arm for arm in ARMS if arm != "lightreasoner_cross")
SMALL = dict(
    questions=8,
    eval_questions=8,
    steps=2,
    batch_positions=16,
    max_new_tokens=64,
    batch_size=8,
    arms=TOY_WORLD_ARMS,  # the toy world's default leaves weak_sft out
)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    lines = []
    report = run_demo(DemoSettings(out=str(out), **SMALL), log=lines.append)
    return out, report, lines


def test_report_is_well_formed(demo):
    out, report, lines = demo
    assert json.loads((out / "report.json").read_text()) == report
    assert [a["arm"] for a in report["arms"]] == list(TOY_WORLD_ARMS)
    assert report["eval_questions"] == 8 and report["seeds"] == 1
    assert report["table"] in (out / "report.md").read_text()
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 100
    base = report["arms"][0]["per_seed"][0]
    base_rows = {r["id"]: r for _, r in read_jsonl(out / "eval" / "base" / "predictions.jsonl")}
    for arm in report["arms"]:
        (row,) = arm["per_seed"]
        # accuracy is correct/total of the arm's own per-question file (base when untrained)
        eval_dir = out / "seed-0" / "eval" / arm["arm"]
        if arm["arm"] == "contrastive_decoding":  # inference only, scored once for all seeds
            eval_dir = out / "eval" / arm["arm"]
            settings = json.loads((eval_dir / "run.json").read_text())
            assert settings["decoding"] == "contrastive" and settings["amateur"]
            rows = {r["id"]: r for _, r in read_jsonl(eval_dir / "predictions.jsonl")}
        elif arm["arm"] == "base" or "note" in row:
            rows = base_rows
        else:
            rows = {r["id"]: r for _, r in read_jsonl(eval_dir / "predictions.jsonl")}
        assert len(rows) == row["total"] == 8
        assert row["correct"] == sum(r["correct"] for r in rows.values())
        assert row["accuracy"] == pytest.approx(row["correct"] / row["total"])
        assert arm["accuracy_mean"] == pytest.approx(row["accuracy"])
        assert row["accuracy_ci95"][0] <= row["accuracy"] <= row["accuracy_ci95"][1]
        assert arm["label"] in report["table"]
        if arm["arm"] != "base":
            assert row["diff"] == pytest.approx(row["accuracy"] - base["accuracy"])
            assert row["diff_ci95"][0] <= row["diff"] <= row["diff_ci95"][1]
            assert 0 <= row["mcnemar_p"] <= 1
            assert row["times"]["eval"] > 0
            if arm["arm"] != "contrastive_decoding":
                assert row["times"]["sample"] > 0
            if "note" not in row:
                assert row["times"]["train"] > 0 and row["times"]["eval"] > 0
    no_select = report["arms"][ARMS.index("no_select")]["per_seed"][0]
    lightreasoner = report["arms"][ARMS.index("lightreasoner")]["per_seed"][0]
    # every rollout position of every question is a no-select target
    samples = list(read_jsonl(next((out / "seed-0" / "samples" / "samples").glob("*.jsonl"))))
    assert no_select["problems_used"] == 8
    assert no_select["supervised_tokens"] == sum(len(r["completion_ids"]) for _, r in samples)
    assert lightreasoner["supervised_tokens"] <= no_select["supervised_tokens"]
    assert any("sampled 8 questions" in line for line in lines)


def _sampler_output(out, questions, *flags):
    from w2s_jax.cli import main
    from w2s_jax.data.toy_tokenizer import SYSTEM_PROMPT

    d = DemoSettings()
    argv = (
        ["--expert", str(ASSETS / "expert"), "--amateur", str(ASSETS / "amateur")]
        + ["--data", str(questions), "--out", str(out), "--system-prompt", SYSTEM_PROMPT]
        + ["--max-new-tokens", str(SMALL["max_new_tokens"]), "--batch-size", "8", *flags]
        + ["--alpha", str(d.alpha), "--beta", str(d.beta), "--top-k", str(d.top_k)]
        + ["--dtype", "float32"]
    )
    assert main(["sample", *argv]) == 0
    from w2s_jax.sample_store import read_samples

    return {r["id"]: r for r in read_samples(out)}


@pytest.mark.parametrize("arm, flags", [("lightreasoner", ()), ("no_contrast", ("--no-contrast",))])
def test_arm_data_equals_the_samplers_own_output(demo, tmp_path, arm, flags):
    """The arms derived from one every-position pass are what `w2s sample` itself writes."""
    out, _, _ = demo
    reference = _sampler_output(tmp_path / arm, out / "seed-0" / "questions.jsonl", *flags)
    shard = out / "seed-0" / "data" / arm / "samples" / "p000-00000.jsonl"
    derived = {r["id"]: r for _, r in read_jsonl(shard)}
    assert derived.keys() == reference.keys()
    for qid, ref in reference.items():
        got = derived[qid]
        assert got["completion_ids"] == ref["completion_ids"]
        assert got["positions"] == ref["positions"]
        assert got["target_ids"] == ref["target_ids"]
        for got_w, ref_w in zip(got["target_weights"], ref["target_weights"], strict=True):
            assert got_w == pytest.approx(ref_w, abs=1e-6)


def test_sft_arm_keeps_exactly_the_right_rollouts(demo):
    from w2s_jax.grading import extract_answer, is_equiv
    from w2s_jax.models import load_tokenizer

    out, _, _ = demo
    tokenizer = load_tokenizer(ASSETS / "expert")
    questions = read_jsonl(out / "seed-0" / "questions.jsonl")
    golds = {r["id"]: r["answer"].split("#### ")[1] for _, r in questions}
    for _, r in read_jsonl(out / "seed-0" / "data" / "sft" / "samples" / "p000-00000.jsonl"):
        text = tokenizer.decode(r["completion_ids"], skip_special_tokens=True)
        right = is_equiv(extract_answer(text), golds[r["id"]])
        assert r["positions"] == (list(range(len(r["completion_ids"]))) if right else [])
        assert r["target_ids"] == [[r["completion_ids"][t]] for t in r["positions"]]


def test_weak_sft_arm_trains_on_the_amateurs_finished_solutions(demo):
    from w2s_jax.models import load_tokenizer
    from w2s_jax.prompts import end_of_turn_id

    out, _, _ = demo
    tokenizer = load_tokenizer(ASSETS / "expert")
    end = end_of_turn_id(tokenizer)
    solved = {
        r["id"]: r
        for _, r in read_jsonl(out / "seed-0" / "amateur-solutions" / "predictions.jsonl")
    }
    samples = {
        r["id"]: r
        for _, r in read_jsonl(next((out / "seed-0" / "samples" / "samples").glob("*.jsonl")))
    }
    rows = list(read_jsonl(out / "seed-0" / "data" / "weak_sft" / "samples" / "p000-00000.jsonl"))
    assert len(rows) == len(solved) == 8 and any(r["positions"] for _, r in rows)
    for _, r in rows:
        solution = solved[r["id"]]
        assert r["prompt_ids"] == samples[r["id"]]["prompt_ids"] and "kl" not in r
        if solution["hit_max_new_tokens"]:
            assert r["positions"] == []
            continue
        ids = tokenizer(solution["output"], add_special_tokens=False)["input_ids"]
        assert r["completion_ids"] == [*ids, end]
        assert r["positions"] == list(range(len(ids) + 1))
        assert r["target_ids"] == [[t] for t in r["completion_ids"]]
        assert tokenizer.decode(ids) == solution["output"]


def test_resume_does_no_work_and_refuses_other_settings(demo):
    out, report, _ = demo
    times = json.loads((out / "seed-0" / "times.json").read_text())
    again = run_demo(DemoSettings(out=str(out), **SMALL), log=lambda _: None)
    assert json.loads((out / "seed-0" / "times.json").read_text()) == times
    assert [a["per_seed"] for a in again["arms"]] == [a["per_seed"] for a in report["arms"]]
    with pytest.raises(SettingsChanged, match="different settings.*beta"):
        run_demo(DemoSettings(out=str(out), **(SMALL | {"beta": 0.9})))


def test_shipped_expert_matches_its_recorded_validation_accuracy(tmp_path):
    from w2s_jax.data.arithmetic import TaskConfig, write_split
    from w2s_jax.data.toy_tokenizer import SYSTEM_PROMPT
    from w2s_jax.evaluate import EvalSettings, run_eval

    manifest = json.loads((ASSETS / "manifest.json").read_text())
    task = TaskConfig(**(manifest["task"] | {"operations": tuple(manifest["task"]["operations"])}))
    for name in ("expert", "amateur"):
        recorded = manifest["models"][name]["validation_check"]
        data = tmp_path / "validation.jsonl"
        write_split(data, "validation", recorded["total"], seed=manifest["data_seed"], config=task)
        settings = EvalSettings(
            model=str(ASSETS / name),
            data=str(data),
            system_prompt=SYSTEM_PROMPT,
            max_new_tokens=manifest["eval_max_new_tokens"],
            dtype="float32",
        )
        summary = run_eval(
            replace(settings, out=str(tmp_path / name), batch_size=64, progress=False)
        )
        assert summary["total"] == recorded["total"]
        # greedy decoding is deterministic up to float reassociation: allow one flipped question
        assert abs(summary["correct"] - recorded["correct"]) <= 1, (name, summary, recorded)
    expert, amateur = (
        manifest["models"][n]["validation"]["accuracy"] for n in ("expert", "amateur")
    )
    assert amateur < expert


def test_one_result_repeated_over_seeds_is_pooled_once():
    from w2s_jax.demo_report import arm_rows

    ids = [f"q{i}" for i in range(40)]
    base = [i % 2 == 0 for i in range(40)]
    seeds = [{"arms": {}, "times": {}} for _ in range(3)]
    one = arm_rows("base", seeds[:1], base, ids)
    three = arm_rows("base", seeds, base, ids)
    assert three["accuracy_ci95"] == one["accuracy_ci95"]  # not narrowed by repetition


def test_every_arm_has_its_own_colour_in_the_chart():
    from w2s_jax.demo_report import COLORS

    assert set(COLORS) == set(ARMS)
