"""`w2s lightreasoner --rounds N` on the shipped toy models: the amateur each rule picks
(from the round folders' manifests), a run interrupted in round 2 and resumed equals one
run straight through, a finished run extended by a round, refused changes and bad input.
About 50 s of CPU (compilation mostly: sampling, decoding, two train-step shapes, export)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from w2s_jax.cli import main
from w2s_jax.demo_worlds import ASSETS, system_prompt, write_problems
from w2s_jax.files import read_jsonl
from w2s_jax.run_folder import SettingsChanged
from w2s_jax.stages.rounds import round_models, run_rounds
from w2s_jax.stages.rounds_settings import RoundsSettings

EXPERT, AMATEUR = ASSETS / "expert", ASSETS / "amateur"


@pytest.fixture(scope="module", autouse=True)
def compilation_cache():
    """Each train() call compiles its step afresh: the persistent cache (on in `w2s`) makes
    the repeats loads. The setting is put back afterwards."""
    import jax

    from w2s_jax import compile_cache

    was = jax.config.jax_enable_compilation_cache
    compile_cache.enable_compilation_cache()
    yield
    if not was:
        compile_cache.disable_compilation_cache()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rounds_inputs")
    write_problems("toy", EXPERT, folder / "train.jsonl", "train", 4, seed=1000)
    write_problems("toy", EXPERT, folder / "eval.jsonl", "validation", 4, seed=0)
    return folder


def _settings(inputs: Path, out: Path, **changes) -> RoundsSettings:
    small = dict(
        expert=str(EXPERT),
        amateur=str(AMATEUR),
        amateur_rule="previous",
        rounds=2,
        data=str(inputs / "train.jsonl"),
        eval_data=str(inputs / "eval.jsonl"),
        out=str(out),
        beta=1e-3,  # round 2's amateur is E_1, close to E_2: a low threshold still selects
        max_new_tokens=24,
        eval_max_new_tokens=24,
        steps=2,
        batch_positions=4,
        grad_accum=1,
        learning_rate=5e-3,
        length_bucket=128,
        dtype="float32",
        batch_size=4,
        eval_batch_size=4,
        save_every=1,
        progress=False,
        system_prompt=system_prompt("toy"),
    )
    return RoundsSettings(**{**small, **changes})


@pytest.fixture(scope="module")
def straight(inputs, tmp_path_factory):
    """Run A: two rounds, rule previous, straight through."""
    out = tmp_path_factory.mktemp("rounds_a")
    lines = []
    report = run_rounds(_settings(inputs, out), log=lines.append)
    return out, report, lines


def _manifest(out: Path, round_: int) -> dict:
    return json.loads((out / f"round-{round_}" / "samples" / "manifest.json").read_text())


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_rules_pick_the_amateur_of_each_round(inputs, tmp_path):
    experts = [Path(f"/E{i}") for i in range(1, 5)]  # E_1 .. E_4
    fixed = Path(AMATEUR).absolute()
    expected = {
        "fixed": [fixed, fixed, fixed, fixed],
        "base": [fixed, experts[0], experts[0], experts[0]],
        "previous": [fixed, experts[0], experts[1], experts[2]],
    }
    for rule, amateurs in expected.items():
        settings = _settings(inputs, tmp_path, amateur_rule=rule)
        for round_, amateur in enumerate(amateurs, start=1):
            models = round_models(settings, round_, experts[:round_])
            assert (models.expert, models.amateur) == (experts[round_ - 1], amateur), rule


def test_previous_rule_in_the_run_folders(straight):
    out, report, lines = straight
    round_1, round_2 = _manifest(out, 1), _manifest(out, 2)
    assert round_1["expert"] == str(EXPERT.resolve())
    assert round_1["amateur"] == str(AMATEUR.resolve())  # round 1: always --amateur
    # round 2 samples E_2 as round 1's train run over E_1 and A_2 = E_1 as its `base`:
    # one shared base; E_2 is that checkpoint's export, which trains on the samples
    expert_2, amateur_2 = round_2["expert_source"], round_2["amateur_source"]
    assert (expert_2["kind"], amateur_2["kind"]) == ("run", "base")
    assert Path(expert_2["checkpoint"]).parent.parent == (out / "round-1" / "train").resolve()
    assert round_2["expert"] == round_2["amateur"] == str(EXPERT.resolve())  # E_1
    assert [(r["expert"], r["amateur"]) for r in report["per_round"]] == [
        (str(EXPERT.absolute()), str(AMATEUR.absolute())),
        ("round-1/model", str(EXPERT.absolute())),
    ]
    # both rounds trained a fresh LoRA on their own expert, and their exports differ
    for round_ in (1, 2):
        assert report["per_round"][round_ - 1]["samples"]["selected"] > 0
        run = json.loads((out / f"round-{round_}" / "train" / "train_config.json").read_text())
        assert run["seed"] == round_ - 1
        expert = out / "round-1" / "model" if round_ == 2 else EXPERT  # E_r
        assert Path(run["expert"]).resolve() == expert.resolve()
    one, two = _weights(out / "round-1" / "model"), _weights(out / "round-2" / "model")
    assert any(not np.array_equal(one[k], two[k]) for k in one)
    assert any("[round 2/2] train" in line for line in lines)


@pytest.mark.parametrize("rule, round_, amateur", [("fixed", 2, AMATEUR), ("base", 3, EXPERT)])
def test_fixed_and_base_rules_in_the_run_folders(straight, inputs, tmp_path, rule, round_, amateur):
    """Run A's rounds before `round_` are the same under `rule` (round 1 always uses
    --amateur; round 2 pairs E_2 with E_1 under base as under previous): copied, then
    round `round_` runs under `rule`."""
    out = tmp_path / rule
    for name in ["eval-base", *(f"round-{r}" for r in range(1, round_))]:
        shutil.copytree(straight[0] / name, out / name)
    settings = _settings(inputs, out, amateur_rule=rule, rounds=round_)
    report = run_rounds(settings, log=lambda line: None)
    assert _manifest(out, round_)["amateur"] == str(amateur.resolve())
    assert _manifest(out, round_)["expert"] == str((out / f"round-{round_ - 1}/model").resolve())
    assert report["per_round"][-1]["amateur"] == str(amateur.absolute())


def test_report_matches_the_eval_folders(straight):
    out, report, _ = straight
    assert json.loads((out / "rounds.json").read_text()) == report
    base = {r["id"]: r["correct"] for _, r in read_jsonl(out / "eval-base" / "predictions.jsonl")}
    previous = base
    for row in report["per_round"]:
        rows = {
            r["id"]: r["correct"]
            for _, r in read_jsonl(out / f"round-{row['round']}" / "eval" / "predictions.jsonl")
        }
        acc = row["eval"]
        assert (acc["correct"], acc["total"]) == (sum(rows.values()), 4)
        assert acc["accuracy_ci95"][0] <= acc["accuracy"] <= acc["accuracy_ci95"][1]
        for key, before in (("vs_base", base), ("vs_previous", previous)):
            diff = sum(rows.values()) / 4 - sum(before.values()) / 4
            assert row[key]["diff"] == pytest.approx(diff)
            assert row[key]["diff_ci95"][0] <= diff <= row[key]["diff_ci95"][1]
        previous = rows
    assert "| 2 | round-1/model |" in (out / "summary.md").read_text()
    assert (out / "rounds.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_mid_round_two_equals_a_straight_run(straight, inputs, tmp_path, monkeypatch):
    """Run B: A's finished base evaluation and round 1, then killed in round 2's training
    after one of its two steps, then the same command again."""
    import w2s_jax.train

    out_a, report_a, _ = straight
    out_b = tmp_path / "b"
    for name in ("eval-base", "round-1"):
        shutil.copytree(out_a / name, out_b / name)
    real_train = w2s_jax.train.train

    def killed(config, **kwargs):
        assert "round-2" in config.out
        real_train(config, should_stop=lambda step: step >= 1)  # saves step 1 and stops
        raise KeyboardInterrupt("killed in round 2's training")

    monkeypatch.setattr(w2s_jax.train, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        run_rounds(_settings(inputs, out_b), log=lambda line: None)
    assert json.loads((out_b / "round-2" / "train" / "summary.json").read_text())["steps"] == 1
    assert (out_b / "round-2" / "samples" / "summary.json").is_file()
    assert not (out_b / "round-2" / "model").exists()
    monkeypatch.setattr(w2s_jax.train, "train", real_train)
    lines = []  # resumed with a free setting changed
    report_b = run_rounds(_settings(inputs, out_b, save_every=2), log=lines.append)
    assert "[round 1/2] done" in lines and not any("round 2/2] sample" in x for x in lines)
    assert report_b["per_round"] == report_a["per_round"]
    a = [r for _, r in read_jsonl(out_a / "round-2" / "eval" / "predictions.jsonl")]
    assert a == [r for _, r in read_jsonl(out_b / "round-2" / "eval" / "predictions.jsonl")]
    weights_a, weights_b = (_weights(o / "round-2" / "model") for o in (out_a, out_b))
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        np.testing.assert_array_equal(weights_a[key], weights_b[key], err_msg=key)


def test_a_finished_run_grows_by_a_round(straight, inputs, tmp_path):
    out = tmp_path / "grown"
    shutil.copytree(straight[0], out)
    report = run_rounds(_settings(inputs, out, rounds=3), log=lambda line: None)
    assert report["per_round"][:2] == straight[1]["per_round"]
    third = report["per_round"][2]
    assert (third["expert"], third["amateur"]) == ("round-2/model", "round-1/model")
    assert _manifest(out, 3)["amateur"] == str((out / "round-1" / "model").resolve())  # E_2
    # a copied run's train runs record the original folders as their bases: this copy
    # samples its own folders (a run sampled in place uses the shared base, above)
    assert _manifest(out, 3)["amateur_source"]["kind"] == "folder"


def test_a_changed_setting_is_refused(straight, inputs):
    out = straight[0]
    before = sorted(p.name for p in out.iterdir())
    for change in ({"beta": 0.5}, {"amateur_rule": "base"}, {"amateur": str(EXPERT)}):
        with pytest.raises(SettingsChanged, match=list(change)[0]):
            run_rounds(_settings(inputs, out, **change), log=lambda line: None)
    assert sorted(p.name for p in out.iterdir()) == before


def _cli(inputs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "lightreasoner",
        "--expert",
        str(EXPERT),
        "--data",
        str(inputs / "train.jsonl"),
        "--eval-data",
        str(inputs / "eval.jsonl"),
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        ((), "--amateur is required"),
        (("--amateur", str(AMATEUR), "--rounds", "0"), "--rounds must be an integer >= 1"),
        (("--amateur", "/no/such/model"), "--amateur /no/such/model is not a model folder"),
        (("--amateur", str(AMATEUR), "--amateur-rule", "latest"), "invalid choice"),
        (("--amateur", str(AMATEUR), "--batch-positions", "5"), "multiple of --grad-accum"),
    ],
)
def test_bad_input_errors_before_writing(inputs, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        main(_cli(inputs, out, *extra))
    assert message in str(exc.value) + capsys.readouterr().err
    assert not out.exists()


def test_missing_eval_file_errors_before_writing(inputs, tmp_path):
    settings = _settings(inputs, tmp_path / "never", eval_data=str(inputs / "gone.jsonl"))
    with pytest.raises(ValueError, match="--eval-data .*gone.jsonl is not a file"):
        run_rounds(settings)
    assert not (tmp_path / "never").exists()


def test_killed_in_round_one_export_equals_a_straight_run(straight, inputs, tmp_path):
    """`w2s lightreasoner` in a process of its own, killed with SIGKILL while round 1's
    model is being written, then the same command again: run A's report and predictions."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out_a, report_a, _ = straight
    out = tmp_path / "killed"
    settings = _settings(inputs, out)
    argv = ["lightreasoner", "--expert", EXPERT, "--amateur", AMATEUR, "--amateur-rule",
            "previous", "--rounds", 2, "--data", settings.data, "--eval-data",
            settings.eval_data, "--out", out, "--beta", settings.beta, "--max-new-tokens", 24,
            "--eval-max-new-tokens", 24, "--steps", 2, "--batch-positions", 4, "--grad-accum",
            1, "--lr", settings.learning_rate, "--length-bucket", 128, "--dtype", "float32",
            "--batch-size", 4, "--eval-batch-size", 4, "--save-every", 1, "--no-progress",
            "--system-prompt", settings.system_prompt]  # fmt: skip
    argv = [str(a) for a in argv]
    process = subprocess.Popen(
        [sys.executable, "-m", "w2s_jax.cli", *argv], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / "round-1" / "model" / "config.json").is_file() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert main(argv) == 0
    report = json.loads((out / "rounds.json").read_text())
    assert report["per_round"] == report_a["per_round"]
    for round_ in (1, 2):
        predictions = f"round-{round_}/eval/predictions.jsonl"
        assert (out / predictions).read_bytes() == (out_a / predictions).read_bytes()
    assert not list(out.rglob(".*.tmp"))
