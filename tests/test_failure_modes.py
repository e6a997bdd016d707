"""Failure modes: a failed start never blocks its fix; changed data is never mixed in."""

import json
import shutil

import pytest

from w2s_jax.cli import main
from w2s_jax.run_folder import SettingsChanged, claim


def test_claim_replaces_a_record_without_results_and_refuses_one_with(tmp_path):
    path = tmp_path / "run.json"
    assert claim(path, {"beta": 0.4}) is False
    assert claim(path, {"beta": 0.4}) is True  # the same settings resume
    with pytest.raises(SettingsChanged, match="beta: 0.4 -> 0.5"):
        claim(path, {"beta": 0.5})
    assert claim(path, {"beta": 0.5}, has_results=False) is False  # nothing to protect
    assert json.loads(path.read_text()) == {"beta": 0.5}
    assert claim(path, {"beta": 0.5}, has_results=False) is True  # same settings: resumed


def test_sample_after_a_missing_weights_file_is_fixed(tmp_path, tiny_qwen2_dir):
    broken = tmp_path / "expert"
    shutil.copytree(tiny_qwen2_dir, broken)
    (broken / "model.safetensors").unlink()
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "What is 2 + 3?"}\n{"question": "And 4 + 4?"}\n')
    argv = ["sample", "--expert", broken, "--amateur", tiny_qwen2_dir, "--data", data]
    argv = [str(a) for a in [*argv, "--out", tmp_path / "out", "--max-new-tokens", "4"]]
    with pytest.raises(SystemExit, match=r"^error: .*no \*\.safetensors"):
        main(argv)
    shutil.copy(tiny_qwen2_dir / "model.safetensors", broken / "model.safetensors")
    assert main(argv) == 0  # the manifest of the failed start does not refuse the fix
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["questions"] == 2


def test_train_after_an_unknown_lora_target_is_fixed(tmp_path, tiny_qwen2_dir):
    from test_train import write_samples

    samples = write_samples(tmp_path / "samples", tiny_qwen2_dir, n=4)
    argv = ["train", "--expert", tiny_qwen2_dir, "--samples", samples, "--out", tmp_path / "t"]
    argv = [str(a) for a in [*argv, "--steps", "1", "--batch-positions", "4", "--no-progress"]]
    with pytest.raises(SystemExit, match="attn_proj match no linear layer"):
        main([*argv, "--lora-targets", "attn_proj"])
    assert main([*argv, "--lora-targets", "q_proj,v_proj"]) == 0
    with pytest.raises(SystemExit, match=r"different settings.*lora_targets"):
        main([*argv, "--lora-targets", "q_proj"])  # now a checkpoint exists: refused


def test_sample_refuses_a_resume_on_changed_questions(tmp_path, tiny_qwen2_dir):
    data = tmp_path / "q.jsonl"
    lines = [{"id": f"q{i}", "question": f"What is {i} + {i}?"} for i in range(4)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["sample", "--expert", tiny_qwen2_dir, "--amateur", tiny_qwen2_dir, "--data", data]
    argv = [str(a) for a in [*argv, "--out", tmp_path / "out", "--max-new-tokens", "4"]]
    assert main(argv) == 0
    shards = sorted((tmp_path / "out" / "samples").glob("*.jsonl"))
    before = [p.read_bytes() for p in shards]
    lines[2]["question"] = "What is 2 + 3?"  # an edited question under an existing id
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(SystemExit, match=r"1 question\(s\) changed, first ids: q2"):
        main(argv)
    others = [{"id": f"n{i}", "question": f"What is {i} * 3?"} for i in range(6)]
    data.write_text("".join(json.dumps(line) + "\n" for line in others))  # another file
    with pytest.raises(SystemExit, match=r"4 sampled id\(s\) are no longer in the data: q0"):
        main(argv)
    assert [p.read_bytes() for p in shards] == before  # nothing mixed in
    data.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    assert main([*argv, "--max-questions", "2"]) == 0  # a shorter resume is no change


def test_a_truncated_model_is_an_error_line_unless_allowed(tmp_path, tiny_qwen2_dir):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_qwen2_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 1  # the weights hold 2 layers
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:1]
    (folder / "config.json").write_text(json.dumps(config))
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "What is 2 + 3?", "answer": "#### 5"}\n')
    argv = ["eval", "--model", folder, "--data", data, "--out", tmp_path / "e"]
    argv = [str(a) for a in [*argv, "--max-new-tokens", "4", "--no-progress"]]
    with pytest.raises(SystemExit, match=r"^error: .*not used by config.json: model\.layers\.1\."):
        main(argv)
    assert main([*argv, "--allow-unused-weights"]) == 0
