"""Stage settings are declared once: flags, defaults, checks and resume rules come from them."""

import argparse
import dataclasses

import pytest

from w2s_jax import settings as settings_module
from w2s_jax import stages
from w2s_jax.cli import build_parser

# Every flag the commands had before their flags were generated from settings classes.
LEGACY_FLAGS = {
    "sample": "--expert --amateur --data --out --alpha --beta --max-new-tokens --max-questions "
    "--batch-size --top-k --system-prompt --prompt-style --eos-id --mesh --dtype --chunk-size "
    "--no-select --no-contrast --export-reference --question-field --id-field --tfds-split "
    "--tfds-data-dir",
    "train": "--expert --samples --out --objective --init --model-config --tokenizer --lora-rank "
    "--lora-alpha --lora-targets --lora-dropout --lr --learning-rate --warmup-steps "
    "--weight-decay --adam-b1 --adam-b2 --adam-eps --max-grad-norm --steps --batch-positions "
    "--grad-accum --dtype --loss-chunk-size --length-bucket --bucket-window --seed --mesh "
    "--save-every --keep-checkpoints --log-every --no-progress",
    "export": "--expert --lora --out --step --dtype --tokenizer",
    "eval": "--out --model --lora --data --preset --question-field --answer-field --id-field "
    "--prompt-style --system-prompt --max-new-tokens --eos-id --batch-size --max-questions "
    "--mesh --dtype --symbolic-timeout --compare --labels --bootstrap-resamples --seed "
    "--no-progress",
    "demo": "--out --seeds --questions --eval-questions --split --alpha --beta --top-k "
    "--max-new-tokens --lora-rank --lora-alpha --lr --steps --batch-positions --batch-size "
    "--lora-targets --arms --length-bucket --expert --amateur --progress",
}
SETTINGS = {
    "sample": stages.SampleSettings,
    "train": stages.TrainSettings,
    "export": stages.ExportSettings,
    "eval": stages.EvalSettings,
    "demo": stages.DemoSettings,
}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}  # noqa: SLF001


@pytest.mark.parametrize("command", sorted(LEGACY_FLAGS))
def test_every_flag_is_kept_and_every_field_has_one(command):
    _, subparsers = build_parser()
    flags = _flags(subparsers[command])
    assert set(LEGACY_FLAGS[command].split()) <= flags
    for field in dataclasses.fields(SETTINGS[command]):
        assert set(settings_module.flag_names(field)) <= flags, field.name


def test_defaults_are_the_published_ones_and_shared_not_copied():
    sample = stages.SampleSettings(expert="e", amateur="a", data="d", out="o")
    assert (sample.alpha, sample.beta, sample.top_k, sample.max_new_tokens) == (0.2, 0.4, 16, 128)
    train = stages.TrainSettings(samples="s", out="o", expert="e")
    assert (train.lora_rank, train.lora_alpha, train.lora_targets) == (
        8,
        16.0,
        ("q_proj", "v_proj"),
    )
    assert (train.learning_rate, train.steps, train.batch_positions, train.grad_accum) == (
        5e-5,
        1000,
        16,
        2,
    )
    demo = stages.DemoSettings()
    assert (demo.alpha, demo.top_k) == (sample.alpha, sample.top_k)


def test_flags_build_the_same_settings_as_python():
    _, subparsers = build_parser()
    argv = ["--samples", "s", "--out", "o", "--expert", "e", "--lr", "1e-3"]
    argv += ["--lora-targets", "q_proj, k_proj", "--no-progress"]
    args = subparsers["train"].parse_args(argv)
    built = settings_module.from_namespace(stages.TrainSettings, args)
    expected = stages.TrainSettings(
        samples="s",
        out="o",
        expert="e",
        learning_rate=1e-3,
        lora_targets=("q_proj", "k_proj"),
        progress=False,
    )
    assert built == expected
    args = subparsers["eval"].parse_args(["--model", "m", "--data", "d", "--eos-id", "7"])
    evaluated = settings_module.from_namespace(stages.EvalSettings, args, out="o")
    assert evaluated.eos_ids == (7,) and evaluated.out == "o"


def test_checks_name_the_flag_and_the_value():
    with pytest.raises(ValueError, match=r"--lr must be a finite number > 0, got -1"):
        stages.TrainSettings(samples="s", out="o", expert="e", learning_rate=-1)
    with pytest.raises(ValueError, match=r"--arms must start with base"):
        stages.DemoSettings(arms=("sft",))
    with pytest.raises(ValueError, match=r"--dtype must be one of"):
        stages.ExportSettings(lora="l", out="o", dtype="auto")  # the written dtype is explicit
    with pytest.raises(ValueError, match=r"--samples is required"):
        stages.TrainSettings(out="o", expert="e")


def test_free_fields_are_the_ones_that_do_not_change_results():
    assert set(settings_module.free_fields(stages.TrainSettings)) == {
        "out",
        "mesh",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "progress",
        "layer_stack",  # same results in either layout; checkpoints are converted on restore
        "remat",
        "attention",
        "eval_batch_size",  # validation batches: the same greedy answers
    }
    assert set(settings_module.free_fields(stages.DemoSettings)) == {
        "out",
        "seeds",
        "progress",
        "layer_stack",  # passed to the stages, where it is free too
        "remat",  # the same results with less memory
        "loss_chunk_size",  # the same loss, fewer logits held at once
    }
    eval_free = set(settings_module.free_fields(stages.EvalSettings))
    assert {"batch_size", "max_questions", "mesh", "progress"} <= eval_free
    assert "max_new_tokens" not in eval_free
