"""Training objectives as plug-ins: the registry, and objectives the step uses unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import decoder_bound, reordered_sum_bound

from w2s_jax import objectives
from w2s_jax.data.packing import collate_step, find_sample_files, iter_steps, load_trajectories
from w2s_jax.divergence import token_kl
from w2s_jax.files import atomic_write_jsonl
from w2s_jax.lora import LoRAConfig, apply_lora
from w2s_jax.models import load_pretrained
from w2s_jax.objectives import LossContext, Objective, get_objective, objective_names
from w2s_jax.objectives.contrastive import (
    contrastive_targets,
    soft_target_loss,
    soft_target_metrics,
)
from w2s_jax.train import make_loss_and_grads


@pytest.fixture
def registry(monkeypatch):
    """Objectives registered inside a test are forgotten after it."""
    monkeypatch.setattr(objectives, "_registered", dict(objectives._registered))


def test_registry_knows_both_objectives_and_names_them_on_a_typo(tmp_path):
    assert objective_names()[:2] == ("contrastive", "sft")
    for name in ("contrastive", "sft"):
        objective = get_objective(name)
        assert isinstance(objective, Objective) and objective.name == name
    assert get_objective("contrastive").requires_manifest
    assert not get_objective("sft").requires_manifest
    with pytest.raises(ValueError, match="unknown objective 'contrastiv'.*contrastive, sft"):
        get_objective("contrastiv")
    shard = tmp_path / "samples" / "p.jsonl"
    atomic_write_jsonl(shard, [{"prompt_ids": [1], "completion_ids": [2]}])
    with pytest.raises(ValueError, match="known objectives: contrastive, sft"):
        load_trajectories([shard], objective="nope")


def _write_records(folder, n=4, per_trajectory=3, seed=0):
    from tiny_checkpoints import random_sample_records

    records = random_sample_records(n, per_trajectory, seed, max_k=3)
    atomic_write_jsonl(folder / "samples" / "p000-00000.jsonl", records)
    return find_sample_files(folder)


def _batch(files, objective, positions=8):
    trajectories, stats = load_trajectories(files, objective=objective, vocab_size=320)
    step = next(iter_steps(trajectories, positions_per_step=positions, micro_batches=2, seed=1))
    return collate_step(trajectories, step, k=stats["k"], length_bucket=8)


def _lora_model(folder):
    model = load_pretrained(folder, dtype="float32")
    apply_lora(model, LoRAConfig(rank=4, dropout=0.0))
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
    new = [0.1 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))  # non-zero B: every gradient is live
    return nnx.split(model, nnx.LoRAParam, ...)


def _scaled_loss(model, micro, ctx):
    loss, aux = soft_target_loss(model, micro, ctx)
    return 3.0 * loss, {**aux, "positions": jnp.int32(micro["flat_index"].shape[0])}


def _scaled_metrics(mean_loss, aux, batch):
    return {"positions": aux["positions"], **soft_target_metrics(mean_loss / 3.0, aux, batch)}


def test_a_registered_objective_is_used_by_the_step(tmp_path, tiny_qwen2_dir, registry):
    """A toy objective (3 x the contrastive loss, plus a metric of its own) defined here:
    loading, the step's loss, gradients and metrics follow it; train.py is not touched."""
    objectives.register(
        Objective(
            name="scaled",
            record_targets=contrastive_targets,
            loss=_scaled_loss,
            metrics=_scaled_metrics,
        )
    )
    assert "scaled" in objective_names()
    files = _write_records(tmp_path)
    batch = _batch(files, "scaled")
    graphdef, params, rest = _lora_model(tiny_qwen2_dir)
    run = lambda name: jax.jit(make_loss_and_grads(graphdef, objective=name))(  # noqa: E731
        params, rest, batch, jax.random.key(0)
    )
    plain, plain_grads = run("contrastive")
    scaled, scaled_grads = run("scaled")
    np.testing.assert_allclose(scaled["loss"], 3.0 * plain["loss"], rtol=1e-6)
    # A cotangent of 3 instead of 1 rounds every step of the backward pass differently: the
    # forward and backward through 2 layers (2 * (9 * 2 + 2) reductions), the log-softmax
    # over V = 320 and the mean, V the longest. Ignoring the objective is off by 2/3.
    for got, want in zip(jax.tree.leaves(scaled_grads), jax.tree.leaves(plain_grads), strict=True):
        bound = reordered_sum_bound(3.0 * want, terms=320, reductions=2 * (9 * 2 + 2) + 2)
        np.testing.assert_allclose(got, 3.0 * want, rtol=0, atol=bound)
    assert int(scaled["positions"]) == 8  # the objective's own aux, summed over micro-batches
    np.testing.assert_allclose(scaled["kl"], plain["kl"], rtol=1e-5)
    assert plain["loss"] > 0.1


def _kd_loss(model, micro, ctx: LossContext):
    """Toy teacher objective: mean KL(teacher ‖ student) at the supervised positions."""

    def at_positions(m):
        hidden_rtd = m.hidden_states(micro["input_ids"], micro["attention_mask"])
        flat = hidden_rtd.reshape(-1, hidden_rtd.shape[-1])
        return m.logits(jnp.take(flat, micro["flat_index"], 0))

    kl_p = token_kl(jax.lax.stop_gradient(at_positions(ctx.teacher)), at_positions(model))
    return kl_p.mean(), {}


def test_a_teacher_objective_runs_the_teacher_in_the_step(
    tmp_path, tiny_qwen2_dir, tiny_qwen2_amateur_dir
):
    """needs_teacher: the frozen teacher rides beside the frozen student state and its
    forward pass runs inside the jitted step (SALT's shape); the loss matches a reference
    from two plain forward passes."""
    kd = Objective(
        name="kd",
        record_targets=contrastive_targets,
        loss=_kd_loss,
        metrics=lambda mean_loss, aux, batch: {},
        needs_teacher=True,
    )
    files = _write_records(tmp_path, seed=4)
    batch = _batch(files, kd)
    graphdef, params, rest = _lora_model(tiny_qwen2_dir)
    teacher_graphdef, teacher_state = nnx.split(load_pretrained(tiny_qwen2_amateur_dir))
    step = make_loss_and_grads(graphdef, objective=kd, teacher_graphdef=teacher_graphdef)
    metrics, grads = jax.jit(step)(params, (rest, teacher_state), batch, jax.random.key(0))

    student = nnx.merge(graphdef, params, rest)
    teacher = nnx.merge(teacher_graphdef, teacher_state)
    per_micro, bounds = [], []
    for m in range(batch["input_ids"].shape[0]):
        ids, mask, index = (batch[k][m] for k in ("input_ids", "attention_mask", "flat_index"))
        z_teacher, z_student = (np.asarray(net(ids, mask)) for net in (teacher, student))
        logp = [
            np.asarray(jax.nn.log_softmax(z.reshape(-1, 320)[index], axis=-1))
            for z in (z_teacher, z_student)
        ]
        kl = np.sum(np.exp(logp[0]) * (logp[0] - logp[1]), axis=-1)
        per_micro.append(np.mean(kl))
        # logits in another order (the step's jit vs plain calls): the teacher (1 layer,
        # hidden 32, intermediate 64) and the student (2 layers, 64, 128); a log-prob moves
        # by at most twice its logits' error, the KL by that times 1 + sum p |log p - log q|
        n = ids.shape[-1]
        logits_error = decoder_bound(
            z_teacher, layers=1, hidden=32, intermediate=64, positions=n
        ) + decoder_bound(z_student, layers=2, hidden=64, intermediate=128, positions=n)
        spread = np.sum(np.exp(logp[0]) * np.abs(logp[0] - logp[1]), axis=-1).max()
        bounds.append(2 * logits_error * (1 + spread))
    np.testing.assert_allclose(metrics["loss"], np.mean(per_micro), rtol=0, atol=max(bounds))
    assert metrics["loss"] > 0.01
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4
