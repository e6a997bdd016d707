"""Bad input and broken disks, as a user meets them: one `error:` line naming the file,
line or value, raised before the first byte is written, and nothing left behind."""

import json
import shutil
import subprocess
import sys

import pytest

from w2s_jax.cli import main

QUESTION = '{"id": "q0", "question": "What is 2 + 3?", "answer": "#### 5"}\n'


def _error(argv) -> str:
    """The `error:` line of a refused `w2s ARGV`."""
    with pytest.raises(SystemExit) as caught:
        main([str(a) for a in argv])
    message = str(caught.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(QUESTION)
    return path


def _sample(expert, amateur, data, out):
    return ["sample", "--expert", expert, "--amateur", amateur, "--data", data, "--out", out]


def _eval(model, data, out, *extra):
    return ["eval", "--model", model, "--data", data, "--out", out, "--no-progress", *extra]


def test_a_model_folder_without_its_tokenizer_is_named(tmp_path, tiny_qwen2_dir, questions):
    broken = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_qwen2_dir, broken)
    (broken / "tokenizer.json").unlink()
    out = tmp_path / "out"
    message = _error(_eval(broken, questions, out))
    assert f"{broken} holds no tokenizer: expected tokenizer.json" in message
    message = _error(_sample(tiny_qwen2_dir, broken, questions, out))
    assert "amateur" in message and f"{broken} holds no tokenizer" in message
    assert not out.exists()


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(
    tmp_path, tiny_qwen2_dir, questions
):
    small = tmp_path / "small_vocab"
    shutil.copytree(tiny_qwen2_dir, small)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 100
    (small / "config.json").write_text(json.dumps(config))
    message = _error(_eval(small, questions, tmp_path / "out"))
    assert "vocabulary has 100 rows" in message
    assert not (tmp_path / "out").exists()


def test_a_prompt_longer_than_the_context_names_the_question(tmp_path, tiny_qwen2_dir):
    data = tmp_path / "long.jsonl"
    long_question = "What is " + " + ".join(["12"] * 400) + "?"
    lines = [QUESTION, json.dumps({"id": "huge", "question": long_question, "answer": "#### 1"})]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    for argv in (
        _eval(tiny_qwen2_dir, data, out),
        _sample(tiny_qwen2_dir, tiny_qwen2_dir, data, out),
    ):
        message = _error(argv)
        assert "question 'huge': its prompt is" in message
        assert "context of 512 positions" in message
    assert not out.exists()


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--lora-alpha", "nan", "--lora-alpha must be a finite number, got nan"),
        ("--lr", "inf", "--lr must be a finite number, got inf"),
    ],
)
def test_non_finite_float_flags_are_refused(tmp_path, tiny_qwen2_dir, flag, value, expected):
    samples = tmp_path / "samples"  # never read: the flags are checked first
    argv = ["train", "--expert", tiny_qwen2_dir, "--samples", samples, "--out", tmp_path / "t"]
    assert expected in _error([*argv, flag, value])
    assert not (tmp_path / "t").exists()


def test_an_infinite_beta_is_refused_without_contradiction(tmp_path, tiny_qwen2_dir, questions):
    argv = _sample(tiny_qwen2_dir, tiny_qwen2_dir, questions, tmp_path / "out")
    message = _error([*argv, "--beta", "inf"])
    assert message == "error: --beta must be a finite number, got inf"


def test_a_binary_question_file_names_the_file_and_line(tmp_path, tiny_qwen2_dir):
    data = tmp_path / "q.jsonl"
    data.write_bytes(QUESTION.encode() + b'{"question": "\xa8\xff"}\n')
    message = _error(_eval(tiny_qwen2_dir, data, tmp_path / "out"))
    assert f"{data}:2: not UTF-8 text (byte 0xa8 at column 15)" in message
    assert not (tmp_path / "out").exists()


def test_a_truncated_safetensors_file_is_named(tmp_path, tiny_qwen2_dir, questions):
    broken = tmp_path / "truncated"
    shutil.copytree(tiny_qwen2_dir, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = _error(_eval(broken, questions, tmp_path / "out"))
    assert f"{weights}: truncated: its tensors need" in message
    assert not (tmp_path / "out").exists()


def test_plain_answers_under_the_gsm8k_preset_point_to_plain(tmp_path, tiny_qwen2_dir):
    data = tmp_path / "plain.jsonl"
    data.write_text('{"question": "What is 2 + 3?", "answer": "5"}\n')
    message = _error(_eval(tiny_qwen2_dir, data, tmp_path / "out"))
    assert f"{data}:1: preset 'gsm8k' cannot read the gold answer" in message
    assert message.endswith("use --preset plain")


def test_a_refused_salt_teacher_leaves_no_out_folder(tmp_path, tiny_qwen2_dir):
    from test_train import write_samples
    from tiny_checkpoints import make_tiny_model, make_tiny_tokenizer

    samples = write_samples(tmp_path / "samples", tiny_qwen2_dir, n=2)
    make_tiny_tokenizer(tmp_path / "tok", vocab_size=280)
    make_tiny_model(tmp_path / "other", tokenizer_folder=tmp_path / "tok", hidden_size=32)
    argv = ["train", "--expert", tiny_qwen2_dir, "--samples", samples, "--out", tmp_path / "t"]
    argv += ["--objective", "salt", "--teacher", tmp_path / "other", "--kd-steps", "2"]
    assert "differ (teacher vs student" in _error(argv)
    assert not (tmp_path / "t").exists()


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs filled to within a few KiB: room for the run's settings, none for
    a checkpoint. Skipped where this user may not mount."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        (disk / "filler").write_bytes(b"\0" * (2 * 1024 * 1024 - 96 * 1024))
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_during_a_checkpoint_is_one_error_line(full_disk, tmp_path, tiny_qwen2_dir):
    from test_train import write_samples

    samples = write_samples(tmp_path / "samples", tiny_qwen2_dir, n=4)
    out = full_disk / "t"
    argv = ["train", "--expert", tiny_qwen2_dir, "--samples", samples, "--out", out]
    argv += ["--steps", "2", "--batch-positions", "4", "--save-every", "1", "--no-progress"]
    command = [sys.executable, "-m", "w2s_jax.cli", *map(str, argv)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    # the checkpoint or the metrics file, whichever the disk refused first, is named
    assert lines[0].startswith(("error: cannot write a checkpoint into", "error: cannot write"))
    assert f"{out}/" in lines[0] and "No space left on device" in lines[0], lines[0]
    if "checkpoint" in lines[0]:
        assert "no checkpoint exists yet" in lines[0]
    finished = [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert finished == []  # no half-written checkpoint passes for a finished one


def test_a_non_finite_first_step_does_not_claim_a_checkpoint():
    import numpy as np

    from w2s_jax.files import NonFiniteError
    from w2s_jax.train import _check_step_finite

    with pytest.raises(NonFiniteError, match="no checkpoint was saved before it"):
        _check_step_finite({"loss": np.float32(np.nan)}, 1, 0)
    with pytest.raises(NonFiniteError, match=r"the last checkpoint \(step 4\) is kept"):
        _check_step_finite({"loss": np.float32(np.inf)}, 5, 4)


def test_a_failed_checkpoint_save_says_which_checkpoints_exist(tmp_path):
    from w2s_jax.checkpointing import CheckpointSaveError, TrainCheckpoints

    checkpoints = TrainCheckpoints(tmp_path, save_every=1, keep=2)
    (checkpoints.directory / "3").mkdir(parents=True)  # a finished step
    (checkpoints.directory / "4.orbax-checkpoint-tmp").mkdir()  # the one that failed

    class FullDisk:
        def save(self, *args, **kwargs):
            raise ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")

    checkpoints._manager = FullDisk()
    with pytest.raises(CheckpointSaveError) as caught:
        checkpoints.save(4, {}, {}, {})
    assert str(caught.value) == (
        f"cannot write a checkpoint into {checkpoints.directory}: No space left on device; "
        "checkpoints of steps [3] are complete; free the cause and re-run the same command "
        "to resume"
    )
