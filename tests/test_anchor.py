"""The KL anchor to the base (`w2s train --anchor-kl W`): the loss against a float64
formula on logits of an independently loaded base, its gradient against a plain
full-logits formula, W = 0 as the plain objective, a run that stays nearer its base, and
the settings it refuses."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import decoder_bound

from w2s_jax.data.packing import collate_step, find_sample_files, iter_steps, load_trajectories
from w2s_jax.files import atomic_write_jsonl
from w2s_jax.lora import LoRAConfig, apply_lora, without_adapters
from w2s_jax.models import load_pretrained
from w2s_jax.objectives import LossContext
from w2s_jax.objectives.contrastive import Anchor, anchor_kl, positions_hidden, soft_target_loss
from w2s_jax.train_config import TrainSettings


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """One packed micro-batch of random sample records (3 trajectories, 12 positions)."""
    from tiny_checkpoints import random_sample_records

    folder = tmp_path_factory.mktemp("anchor_samples")
    atomic_write_jsonl(folder / "samples" / "p.jsonl", random_sample_records(3, 4, 0, max_k=3))
    trajectories, stats = load_trajectories(find_sample_files(folder), vocab_size=320)
    step = next(iter_steps(trajectories, positions_per_step=12, seed=0))
    arrays = collate_step(trajectories, step, k=stats["k"], length_bucket=8)
    return {name: jnp.asarray(value[0]) for name, value in arrays.items()}


def _adapted(folder, scale=0.3):
    """The tiny model with LoRA adapters whose B is random (the model is off its base)."""
    model = load_pretrained(folder, dtype="float32")
    apply_lora(model, LoRAConfig(rank=4, targets=("q_proj", "v_proj", "down_proj"), dropout=0))
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
    new = [scale * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def _log_softmax64(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _positions_logits(model, micro):
    """Logits [P, V] at the micro-batch's positions, from the model's full forward pass."""
    logits = model(micro["input_ids"], micro["attention_mask"])
    return np.asarray(logits).reshape(-1, logits.shape[-1])[np.asarray(micro["flat_index"])]


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_the_anchored_loss_is_the_formula(tiny_qwen2_dir, micro, direction):
    model = _adapted(tiny_qwen2_dir)
    base = load_pretrained(tiny_qwen2_dir, dtype="float32")  # loaded apart: no adapters
    log_p = _log_softmax64(_positions_logits(model, micro))
    log_base = _log_softmax64(_positions_logits(base, micro))
    ids, weights = np.asarray(micro["target_ids"]), np.asarray(micro["target_weights"])
    soft_ce = -(weights * np.take_along_axis(log_p, ids, -1)).sum(-1).mean()
    if direction == "reverse":  # KL(trained || base)
        kl = (np.exp(log_p) * (log_p - log_base)).sum(-1).mean()
    else:  # KL(base || trained)
        kl = (np.exp(log_base) * (log_base - log_p)).sum(-1).mean()
    assert kl > 0.05  # the adapters matter, so a dropped or misdirected term would show
    weight = 2.5
    for chunk in (0, 5):  # all positions at once, and chunks of 5 (the fused kernel's loop)
        loss, aux = soft_target_loss(
            model, micro, LossContext(chunk), anchor=Anchor(weight, direction)
        )
        # Both sides compute the logits in float32 in another order: each log-softmax
        # moves by at most twice the logits' difference d, so the CE by 2d and the KL by
        # (4 + 2 max|log p - log q|) d.
        config = json.loads((tiny_qwen2_dir / "config.json").read_text())
        d = decoder_bound(
            np.abs(log_p).max(), layers=config["num_hidden_layers"], hidden=config["hidden_size"],
            intermediate=config["vocab_size"], positions=micro["input_ids"].shape[1],
        )  # fmt: skip
        spread = np.abs(log_p - log_base).max()
        np.testing.assert_allclose(aux["anchor_kl"], kl, rtol=0, atol=(4 + 2 * spread) * d)
        np.testing.assert_allclose(
            loss, soft_ce + weight * kl, rtol=0, atol=(2 + weight * (4 + 2 * spread)) * d
        )


def test_the_gradient_is_the_full_logits_formulas(tiny_qwen2_dir, micro):
    """d/dB of the fused anchor equals d/dB of the same KL written on full logits with
    jax.nn.log_softmax, the base's logits held fixed; at the base itself it is 0."""
    model = _adapted(tiny_qwen2_dir)
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    base_log = jax.nn.log_softmax(
        jnp.asarray(_positions_logits(load_pretrained(tiny_qwen2_dir, dtype="float32"), micro))
    )

    def fused(adapters):
        m = nnx.merge(graphdef, adapters, rest)
        return anchor_kl(m, micro, positions_hidden(m, micro), Anchor(1.0), loss_chunk_size=4)

    def plain(adapters):
        m = nnx.merge(graphdef, adapters, rest)
        logits = m(micro["input_ids"], micro["attention_mask"])
        log_p = jax.nn.log_softmax(logits.reshape(-1, logits.shape[-1])[micro["flat_index"]])
        return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - base_log), -1))

    got, want = jax.grad(fused)(adapters), jax.grad(plain)(adapters)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
    assert scale > 1e-3
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-3 * scale)
    at_base = jax.tree.map(jnp.zeros_like, adapters)  # B = 0: the model is its base
    zero = jax.grad(fused)(at_base)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(zero))
    assert float(fused(at_base)) == 0


def test_without_adapters_is_the_base_exactly(tiny_qwen2_dir, micro):
    model = _adapted(tiny_qwen2_dir)
    base = load_pretrained(tiny_qwen2_dir, dtype="float32")
    ids, mask = micro["input_ids"], micro["attention_mask"]
    assert np.abs(np.asarray(model(ids, mask)) - np.asarray(base(ids, mask))).max() > 0.1
    np.testing.assert_array_equal(without_adapters(model)(ids, mask), base(ids, mask))


def test_zero_weight_is_the_plain_objective(tiny_qwen2_dir, micro):
    model = _adapted(tiny_qwen2_dir)
    plain = soft_target_loss(model, micro, LossContext(0))
    zero = soft_target_loss(model, micro, LossContext(0), anchor=Anchor(0.0))
    assert float(plain[0]) == float(zero[0]) and set(zero[1]) == {"agree", "entropy"}


def _train(tmp_path, tiny_qwen2_dir, out, **changes):
    from test_train import write_samples

    from w2s_jax.train import train

    samples = tmp_path / "samples"
    if not samples.is_dir():
        write_samples(samples, tiny_qwen2_dir, n=8, seed=1)
    settings = dict(
        samples=str(samples), expert=str(tiny_qwen2_dir), out=str(tmp_path / out), steps=12,
        batch_positions=8, grad_accum=1, learning_rate=5e-2, length_bucket=16, dtype="float32",
        lora_targets=("q_proj", "v_proj", "down_proj"), log_every=12, progress=False,
    )  # fmt: skip
    return train(TrainSettings(**{**settings, **changes}))


def test_an_anchored_run_stays_nearer_its_base(tmp_path, tiny_qwen2_dir):
    free = _train(tmp_path, tiny_qwen2_dir, "free", anchor_kl=0.0)
    anchored = _train(tmp_path, tiny_qwen2_dir, "anchored", anchor_kl=5.0)
    assert "anchor_kl" not in free["final"] and anchored["final"]["anchor_kl"] >= 0
    recorded = json.loads((tmp_path / "free" / "train_config.json").read_text())
    assert "anchor_kl" not in recorded  # runs recorded before the anchor existed read the same
    assert json.loads((tmp_path / "anchored" / "train_config.json").read_text())["anchor_kl"] == 5
    # the anchored run's final policy is nearer the base, measured on the same positions
    from w2s_jax.lora import load_lora_into

    def distance(run):
        model = load_lora_into(load_pretrained(tiny_qwen2_dir, dtype="float32"), tmp_path / run)
        files = find_sample_files(tmp_path / "samples")
        trajectories, stats = load_trajectories(files, vocab_size=320)
        step = next(iter_steps(trajectories, positions_per_step=32, seed=0))
        batch = collate_step(trajectories, step, k=stats["k"], length_bucket=16)
        micro = {name: jnp.asarray(value[0]) for name, value in batch.items()}
        return float(anchor_kl(model, micro, positions_hidden(model, micro), Anchor(1.0)))

    assert distance("anchored") < 0.5 * distance("free")


def test_settings_the_anchor_refuses(tmp_path, tiny_qwen2_dir):
    common = dict(samples=str(tmp_path), expert=str(tiny_qwen2_dir), out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="--anchor-kl must be a finite number, got inf"):
        TrainSettings(**common, anchor_kl=float("inf"))
    with pytest.raises(ValueError, match="anchor-kl applies to the contrastive and sft"):
        TrainSettings(**common, anchor_kl=1.0, objective="salt", teacher=str(tiny_qwen2_dir))
    with pytest.raises(ValueError, match="--anchor-kl needs LoRA"):
        Anchor.from_settings(TrainSettings(**common, anchor_kl=1.0, lora_rank=0))
