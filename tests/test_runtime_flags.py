"""The run-time model choices on the command line: --param-dtype, --layer-stack, --remat
(training) and --attention reach the config of every model a command loads; bad values
end in one `error:` line; only --param-dtype blocks resuming a run with another value, and
a checkpoint written in one layer layout resumes in the other."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from test_train import write_samples

import w2s_jax.models
from w2s_jax.checkpointing import restore_params
from w2s_jax.cli import main
from w2s_jax.eval_settings import EvalSettings
from w2s_jax.lora import LoRAConfig, apply_lora
from w2s_jax.models.config import ATTENTION_IMPLS, LAYER_STACKS, REMAT_POLICIES
from w2s_jax.settings import free_fields
from w2s_jax.sharding import make_mesh
from w2s_jax.stages.sample_settings import SampleSettings
from w2s_jax.stages.score import ScoreSettings
from w2s_jax.train import train
from w2s_jax.train_config import TrainSettings

# Values other than the defaults, taken from ModelConfig's lists.
LAYER_STACK = next(v for v in LAYER_STACKS if v != "auto")
ATTENTION = next(v for v in ATTENTION_IMPLS if v != "auto")
REMAT = REMAT_POLICIES[-1]
FLAGS = ["--param-dtype", "bfloat16", "--layer-stack", LAYER_STACK, "--attention", ATTENTION]


class _Loaded(Exception):
    """Ends a command once the models under test are loaded (no compute needed)."""


@pytest.fixture
def loads(monkeypatch):
    """The configs of the models a command loads; it stops after `loads.stop_after`."""
    real = w2s_jax.models.load_pretrained
    configs = []

    def recording(path, **kwargs):
        model = real(path, **kwargs)
        configs.append(model.config)
        if len(configs) == recording.stop_after:
            raise _Loaded
        return model

    recording.stop_after = 1
    recording.configs = configs
    monkeypatch.setattr(w2s_jax.models, "load_pretrained", recording)
    return recording


def _stopped(loads, argv, *, stop_after=1):
    """The loaded models' configs of `w2s ARGV`, stopped after `stop_after` loads."""
    loads.stop_after = stop_after
    loads.configs.clear()
    with pytest.raises(_Loaded):
        main([str(a) for a in argv])
    assert len(loads.configs) == stop_after
    return loads.configs


def _check(config, *, remat="none", param_dtype="bfloat16"):
    assert (config.param_dtype, config.layer_stack, config.attention, config.remat) == (
        param_dtype,
        LAYER_STACK,
        ATTENTION,
        remat,
    )


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tiny_qwen2_dir):
    return write_samples(tmp_path_factory.mktemp("samples"), tiny_qwen2_dir, n=3)


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("questions") / "q.jsonl"
    path.write_text(json.dumps({"id": "q0", "question": "1 + 1?", "answer": "#### 2"}) + "\n")
    return path


def test_sample_loads_expert_and_amateur_with_the_flags(
    tmp_path, loads, tiny_qwen2_dir, tiny_qwen2_amateur_dir, questions
):
    out = tmp_path / "s"
    models = ["--expert", tiny_qwen2_dir, "--amateur", tiny_qwen2_amateur_dir]
    argv = ["sample", *models, "--data", questions, "--out", out, "--max-new-tokens", 2, *FLAGS]
    for config in _stopped(loads, argv, stop_after=2):
        _check(config)
    recorded = json.loads((out / "manifest.json").read_text())["settings"]
    assert recorded["param_dtype"] == "bfloat16"  # changes results: compared on resume
    assert "layer_stack" not in recorded and "attention" not in recorded  # free


def test_train_loads_the_student_and_the_teacher_with_the_flags(
    tmp_path, loads, tiny_qwen2_dir, samples
):
    common = ["train", "--expert", tiny_qwen2_dir, "--samples", samples, "--no-progress"]
    (student,) = _stopped(loads, [*common, "--out", tmp_path / "a", *FLAGS, "--remat", REMAT])
    _check(student, remat=REMAT)
    salt = ["--objective", "salt", "--teacher", tiny_qwen2_dir, "--kd-steps", 1]
    argv = [*common, "--out", tmp_path / "b", *salt, *FLAGS]
    teacher, student = _stopped(loads, argv, stop_after=2)
    _check(teacher, param_dtype=None)  # frozen: stored in the compute dtype
    _check(student)


def test_full_finetuning_in_bf16_loads_float32_masters(tmp_path, loads, tiny_qwen2_dir, samples):
    argv = ["train", "--expert", tiny_qwen2_dir, "--samples", samples, "--out", tmp_path]
    (config,) = _stopped(loads, [*argv, "--lora-rank", 0, "--dtype", "bfloat16", "--no-progress"])
    assert (config.dtype, config.weights_dtype) == ("bfloat16", "float32")
    (config,) = _stopped(loads, [*argv, "--dtype", "bfloat16", "--no-progress"])  # LoRA
    assert (config.dtype, config.weights_dtype) == ("bfloat16", "bfloat16")


def test_eval_and_score_load_with_the_flags(tmp_path, loads, tiny_qwen2_dir, samples, questions):
    argv = ["eval", "--model", tiny_qwen2_dir, "--data", questions, "--out", tmp_path / "e"]
    _check(_stopped(loads, [*argv, *FLAGS, "--no-progress"])[0])
    argv = ["score", "--model", tiny_qwen2_dir, "--data", samples, "--out", tmp_path / "s"]
    _check(_stopped(loads, [*argv, *FLAGS, "--no-progress"])[0])


REQUIRED = {
    "sample": ["--expert", "E", "--amateur", "A", "--data", "D"],
    "train": ["--expert", "E", "--samples", "S"],
    "eval": ["--model", "M", "--data", "D"],
    "score": ["--model", "M", "--data", "D"],
}


@pytest.mark.parametrize("command", sorted(REQUIRED))
@pytest.mark.parametrize("flag", ["--layer-stack", "--attention", "--remat", "--param-dtype"])
def test_a_bad_value_is_one_error_line(tmp_path, capsys, command, flag):
    argv = [command, *REQUIRED[command], "--out", str(tmp_path / "out"), flag, "bogus"]
    if flag == "--remat" and command != "train":  # training only
        with pytest.raises(SystemExit):
            main(argv)
        assert "unrecognized arguments: --remat bogus" in capsys.readouterr().err
        return
    with pytest.raises(SystemExit) as info:
        main(argv)
    lines = [str(info.value), *capsys.readouterr().err.splitlines()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and "bogus" in errors[0] and "Traceback" not in "".join(lines)
    if flag != "--param-dtype":  # checked against ModelConfig's list, which the message gives
        allowed = {"--layer-stack": LAYER_STACKS, "--attention": ATTENTION_IMPLS}
        listed = ", ".join(allowed.get(flag, REMAT_POLICIES))
        assert errors[0] == f"error: {flag} must be one of {listed}, got 'bogus'"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cls", [SampleSettings, TrainSettings, EvalSettings, ScoreSettings])
def test_only_param_dtype_is_compared_on_resume(cls):
    free = set(free_fields(cls))
    assert {"layer_stack", "attention"} <= free and "param_dtype" not in free
    assert ("remat" in free) == (cls is TrainSettings)


def test_a_training_run_resumes_with_other_layers_but_not_another_param_dtype(
    tmp_path, loads, tiny_qwen2_dir, samples
):
    argv = ["train", "--expert", tiny_qwen2_dir, "--samples", samples, "--out", tmp_path]
    _stopped(loads, [*argv, "--no-progress"])
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # the run holds results now
    changed = ["--layer-stack", LAYER_STACK, "--attention", ATTENTION, "--remat", REMAT]
    (resumed,) = _stopped(loads, [*argv, *changed, "--param-dtype", "float32"])
    _check(resumed, remat=REMAT, param_dtype="float32")  # float32 is the default here
    with pytest.raises(SystemExit, match="param_dtype: None -> 'bfloat16'"):
        main([str(a) for a in [*argv, "--param-dtype", "bfloat16"]])


def test_a_run_resumes_in_the_other_layer_layout(tmp_path, tiny_qwen2_dir, samples):
    """Checkpoints keep their layout; restoring converts (stacked <-> per-layer)."""
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    common = dict(samples=str(samples), expert=str(tiny_qwen2_dir), steps=4, batch_positions=8)
    common |= dict(grad_accum=2, length_bucket=32, save_every=1, lora_dropout=0.0, progress=False)
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    train(TrainSettings(out=str(whole), layer_stack="loop", **common), mesh=mesh)
    stop = lambda step: step == 2  # noqa: E731
    train(TrainSettings(out=str(parted), layer_stack="scan", **common), should_stop=stop, mesh=mesh)
    resumed = train(TrainSettings(out=str(parted), layer_stack="loop", **common), mesh=mesh)
    assert resumed["steps"] == 4
    for layout in ("loop", "scan"):
        model = w2s_jax.models.load_pretrained(tiny_qwen2_dir, layer_stack=layout)
        apply_lora(model, LoRAConfig(dropout=0.0))
        template = nnx.state(model, nnx.LoRAParam)
        a, b = restore_params(whole, template), restore_params(parted, template)
        assert jax.tree.structure(a) == jax.tree.structure(template)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
