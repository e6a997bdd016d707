"""`salt`: KD term, ω schedule, gradient, resume mid-KD, tokenizer check, from scratch."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import compilation_cache, write_samples  # noqa: F401 (fixture)

from w2s_jax.checkpointing import restore_params
from w2s_jax.cli import main
from w2s_jax.data.packing import collate_step, find_sample_files, iter_steps, load_trajectories
from w2s_jax.divergence import DISTILL_DIRECTIONS
from w2s_jax.models import load_pretrained
from w2s_jax.objectives.salt import KDSchedule, salt_objective
from w2s_jax.sharding import make_mesh
from w2s_jax.train import make_loss_and_grads, train
from w2s_jax.train_config import TrainSettings

TOKENS = 300  # the tiny tokenizer's size; the tiny models have 320 (student) / 310 rows


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A small teacher with its own padded vocabulary (310 rows) and the shared tokenizer."""
    from tiny_checkpoints import make_tiny_model

    folder = tmp_path_factory.mktemp("teacher")
    make_tiny_model(
        folder,
        tokenizer_folder=tiny_tokenizer_dir,
        vocab_size=310,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        tie_word_embeddings=False,
        initializer_range=0.2,
        seed=3,
    )
    return folder


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tiny_qwen2_dir):
    return write_samples(tmp_path_factory.mktemp("salt_samples"), tiny_qwen2_dir, n=4)


@pytest.fixture(scope="module")
def one_device():
    return make_mesh("data=1", devices=jax.devices()[:1])


def _batch(samples, micro_batches=2, positions=12):
    trajectories, stats = load_trajectories(find_sample_files(samples), objective="salt")
    step = next(iter_steps(trajectories, positions_per_step=positions, micro_batches=micro_batches))
    return {k: jnp.asarray(v) for k, v in collate_step(trajectories, step, k=1).items()}


def _models(student_dir, teacher_dir):
    student, teacher = load_pretrained(student_dir), load_pretrained(teacher_dir)
    student.restrict_vocab(TOKENS)
    teacher.restrict_vocab(TOKENS)
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)
    teacher_graphdef, teacher_state = nnx.split(teacher)
    return graphdef, params, (rest, teacher_state), teacher_graphdef


def _torch_logits(folder, batch):
    """float64 logits [A, P, TOKENS] of the supervised positions, from transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).double().eval()
    out = []
    for m in range(batch["input_ids"].shape[0]):
        ids = torch.tensor(np.asarray(batch["input_ids"][m]), dtype=torch.long)
        mask = torch.tensor(np.asarray(batch["attention_mask"][m]), dtype=torch.long)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.numpy()
        flat = logits.reshape(-1, logits.shape[-1])[np.asarray(batch["flat_index"][m])]
        out.append(flat[:, :TOKENS])
    return np.stack(out)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kd_reference(zt, zs, temperature, direction):
    lt, ls = _log_softmax(zt / temperature), _log_softmax(zs / temperature)
    if direction == "forward":
        return np.sum(np.exp(lt) * (lt - ls), -1)
    if direction == "reverse":
        return np.sum(np.exp(ls) * (ls - lt), -1)
    lm = np.log(0.5 * (np.exp(lt) + np.exp(ls)))
    return 0.5 * np.sum(np.exp(lt) * (lt - lm), -1) + 0.5 * np.sum(np.exp(ls) * (ls - lm), -1)


@pytest.mark.parametrize("direction", DISTILL_DIRECTIONS)
def test_kd_term_equals_float64_numpy_on_torch_logits(
    tiny_qwen2_dir, teacher_dir, samples, direction
):
    batch = _batch(samples)
    graphdef, params, rest, teacher_graphdef = _models(tiny_qwen2_dir, teacher_dir)
    schedule = KDSchedule(steps=10, weight=0.25, temperature=2.0, direction=direction)
    step = make_loss_and_grads(
        graphdef,
        objective=salt_objective(schedule),
        loss_chunk_size=5,
        teacher_graphdef=teacher_graphdef,
    )
    metrics, _ = jax.jit(step)(params, rest, batch, jax.random.key(0), 9)
    zs, zt = _torch_logits(tiny_qwen2_dir, batch), _torch_logits(teacher_dir, batch)
    kd = _kd_reference(zt, zs, 2.0, direction).mean(-1).mean()
    targets = np.asarray(batch["target_ids"])[..., 0]
    ce = -np.take_along_axis(_log_softmax(zs), targets[..., None], -1)[..., 0].mean(-1).mean()
    agree = np.mean(zs.argmax(-1) == zt.argmax(-1))
    np.testing.assert_allclose(metrics["kd"], kd, rtol=2e-5)
    np.testing.assert_allclose(metrics["ce"], ce, rtol=2e-5)
    np.testing.assert_allclose(metrics["loss"], 0.75 * ce + 0.25 * kd, rtol=2e-5)
    np.testing.assert_allclose(metrics["teacher_agreement"], agree, atol=1e-6)
    assert kd > 0.05 and metrics["kd_weight"] == 0.25


@pytest.mark.parametrize(
    "transition, expected",
    [("step", [0.6, 0.6, 0.6, 0.0, 0.0]), ("linear", [0.6, 0.4, 0.2, 0.0, 0.0])],
)
def test_omega_around_the_end_of_the_kd_phase(transition, expected):
    schedule = KDSchedule(steps=3, weight=0.6, transition=transition)
    got = [float(schedule.omega(s)) for s in range(5)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jax.jit(schedule.omega)(jnp.int32(1)), expected[1], rtol=1e-6)


def _config(samples, out, teacher, **kw):
    base = dict(
        samples=str(samples),
        out=str(out),
        objective="salt",
        teacher=str(teacher),
        kd_steps=3,
        kd_weight=0.6,
        steps=5,
        batch_positions=8,
        grad_accum=2,
        dtype="float32",
        learning_rate=2e-2,
        length_bucket=32,
        save_every=1,
        log_every=1,
        loss_chunk_size=3,
        progress=False,
    )
    return TrainSettings(**(base | kw))


def _log(out, key):
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_run_follows_the_schedule_step_by_step(
    tmp_path, samples, tiny_qwen2_dir, teacher_dir, one_device
):
    config = _config(samples, tmp_path / "run", teacher_dir, expert=str(tiny_qwen2_dir))
    train(dataclasses.replace(config, kd_transition="linear"), mesh=one_device)
    np.testing.assert_allclose(_log(tmp_path / "run", "kd_weight"), [0.6, 0.4, 0.2, 0, 0], 1e-6)
    kd = _log(tmp_path / "run", "kd")
    assert min(kd[:3]) > 0.05 and kd[3:] == [0.0, 0.0]  # the teacher stops running


def test_gradient_of_the_mixed_loss_matches_finite_differences(
    tiny_qwen2_dir, teacher_dir, samples
):
    batch = _batch(samples)
    graphdef, params, rest, teacher_graphdef = _models(tiny_qwen2_dir, teacher_dir)
    objective = salt_objective(KDSchedule(steps=5, weight=0.4, temperature=1.5))
    step = jax.jit(
        make_loss_and_grads(
            graphdef, objective=objective, loss_chunk_size=4, teacher_graphdef=teacher_graphdef
        )
    )
    key = jax.random.key(0)
    _, grads = step(params, rest, batch, key, 2)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    direction = [jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in leaves]
    eps = 1e-3

    def loss_at(sign):
        moved = [x + sign * eps * d for x, d in zip(leaves, direction, strict=True)]
        return float(step(jax.tree.unflatten(tree, moved), rest, batch, key, 2)[0]["loss"])

    numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
    analytic = sum(
        float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), direction, strict=True)
    )
    np.testing.assert_allclose(analytic, numeric, rtol=1e-2)
    assert abs(analytic) > 1.0


def _params(out, like_dir):
    model = load_pretrained(like_dir, dtype="float32")
    return restore_params(out, nnx.state(model, nnx.Param))


def test_resume_in_the_kd_phase_equals_uninterrupted_from_scratch(
    tmp_path, samples, tiny_qwen2_dir, teacher_dir, one_device
):
    """--init random --model-config, full fine-tuning; stopped at step 2 of 3 KD steps."""
    scratch = dict(init="random", model_config=str(tiny_qwen2_dir / "config.json"), lora_rank=0)
    whole = _config(samples, tmp_path / "whole", teacher_dir, **scratch)
    train(whole, mesh=one_device)
    parted = _config(samples, tmp_path / "parted", teacher_dir, **scratch)
    assert train(parted, should_stop=lambda s: s == 2, mesh=one_device)["steps"] == 2
    assert train(parted, mesh=one_device)["steps"] == 5
    a, b = _params(tmp_path / "whole", tiny_qwen2_dir), _params(tmp_path / "parted", tiny_qwen2_dir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_log(tmp_path / "parted", "kd"), _log(tmp_path / "whole", "kd"))


def test_lora_on_a_mesh_gives_the_one_device_curve(
    tmp_path, samples, tiny_qwen2_dir, teacher_dir, one_device
):
    kw = dict(expert=str(tiny_qwen2_dir), steps=3, lora_dropout=0.0)
    train(_config(samples, tmp_path / "one", teacher_dir, **kw), mesh=one_device)
    train(_config(samples, tmp_path / "mesh", teacher_dir, mesh="data=2,fsdp=4", **kw))
    for key in ("loss", "kd", "teacher_agreement"):
        np.testing.assert_allclose(_log(tmp_path / "mesh", key), _log(tmp_path / "one", key), 1e-5)


def _cli(*args):
    with pytest.raises(SystemExit) as info:
        main(["train", *map(str, args), "--no-progress"])
    return str(info.value)


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, samples, tiny_qwen2_dir):
    from tiny_checkpoints import make_tiny_model, make_tiny_tokenizer

    make_tiny_tokenizer(tmp_path / "tok", vocab_size=280)
    make_tiny_model(tmp_path / "other", tokenizer_folder=tmp_path / "tok", hidden_size=32)
    common = ["--samples", samples, "--expert", tiny_qwen2_dir, "--objective", "salt"]
    message = _cli(
        *common, "--out", tmp_path / "t", "--teacher", tmp_path / "other", "--kd-steps", 2
    )
    assert message.startswith("error: --teacher ")
    assert "differ (teacher vs student: sizes 280 vs 300" in message
    assert not (tmp_path / "t" / "train_config.json").exists()
    assert "needs --teacher DIR" in _cli(*common, "--out", tmp_path / "u", "--kd-steps", "2")
    message = _cli(*common, "--out", tmp_path / "v", "--teacher", tiny_qwen2_dir)
    assert "--objective salt needs --kd-steps N >= 1" in message
    assert not (tmp_path / "v" / "train_config.json").exists()


def test_reduced_toy_run_moves_a_scratch_student_towards_the_shipped_amateur(tmp_path):
    """The toy world in small: toy tokenizer and problems, the shipped amateur as teacher,
    a student from scratch; KD toward the teacher falls during the KD phase."""
    from pathlib import Path

    from w2s_jax.data.arithmetic import TaskConfig, generate_split
    from w2s_jax.data.sft_records import write_sft_records
    from w2s_jax.files import atomic_write_json
    from w2s_jax.models import load_tokenizer

    amateur = Path(__file__).parents[1] / "w2s_jax" / "assets" / "toy_world" / "amateur"
    tokenizer = load_tokenizer(amateur)
    task = TaskConfig(min_steps=1, max_steps=2, digits=2, operand_digits=1)
    problems = generate_split("train", 24, seed=0, config=task)
    write_sft_records(
        tmp_path / "data", tokenizer, ((p.id, p.question, p.answer) for p in problems)
    )
    student = json.loads((amateur / "config.json").read_text())
    student.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16)
    atomic_write_json(tmp_path / "student.json", student)
    config = TrainSettings(
        samples=str(tmp_path / "data"),
        out=str(tmp_path / "run"),
        objective="salt",
        teacher=str(amateur),
        init="random",
        model_config=str(tmp_path / "student.json"),
        lora_rank=0,
        kd_steps=8,
        kd_weight=0.9,
        steps=10,
        batch_positions=64,
        grad_accum=1,
        dtype="float32",
        learning_rate=1e-2,
        length_bucket=64,
        log_every=1,
        loss_chunk_size=32,
        progress=False,
    )
    train(config, mesh=make_mesh("data=1", devices=jax.devices()[:1]))
    kd, ce = _log(tmp_path / "run", "kd"), _log(tmp_path / "run", "ce")
    assert kd[7] < 0.7 * kd[0] and kd[8:] == [0.0, 0.0]
    assert ce[-1] < ce[0] and all(np.isfinite(ce))
