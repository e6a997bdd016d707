"""The sequence classifier against a torch reimplementation on the tiny HF checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tolerances import decoder_bound
from transformers import AutoModelForCausalLM

from w2s_jax.models.classifier import (
    ClassifierSpec,
    build_classifier,
    last_token_index,
    load_classifier,
    save_classifier,
    trainable_filter,
)
from w2s_jax.sharding import make_mesh, place_batch


def padded(side: str, seed=0, vocab=300):
    """ids/mask [4, 10] with rows of 10, 7, 3 and 1 real tokens, padded on `side`."""
    rng = np.random.RandomState(seed)
    lengths = [10, 7, 3, 1]
    ids = np.zeros((4, 10), np.int64)
    mask = np.zeros((4, 10), np.int64)
    for row, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(10 - n, 10)
        ids[row, cols] = rng.randint(3, vocab, n)
        mask[row, cols] = 1
    return ids, mask


def torch_classifier_logits(folder, ids, mask, head_dc):
    """HF decoder's last hidden state at each row's last real token, times the head."""
    hf = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        hidden = hf.model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).last_hidden_state
        last = torch.tensor([int(np.flatnonzero(row)[-1]) for row in mask])
        pooled = hidden[torch.arange(ids.shape[0]), last]
        return (pooled @ torch.tensor(np.asarray(head_dc))).numpy()


def random_head(model, seed=0):
    shape = model.score.get_value().shape
    model.score.set_value(jax.random.normal(jax.random.key(seed), shape, jnp.float32))


def logits_bound(logits):
    """Float32 reordering bound for class logits of `padded` (10 positions) through the
    tiny 2-layer expert, the score head (a sum over hidden 64) in the LM head's place. A
    row pooled at the wrong token is off by O(1) and more."""
    return decoder_bound(logits, layers=2, hidden=64, intermediate=128, positions=10)


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask)


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_torch_reimplementation(tiny_qwen2_dir, side):
    ids, mask = padded(side)
    model = build_classifier(ClassifierSpec(str(tiny_qwen2_dir), num_classes=3, mode="full"))
    assert float(jnp.abs(model.score.get_value()).max()) == 0.0  # zero init, as published
    random_head(model)
    got = np.asarray(_logits(model, ids, mask))
    ref = torch_classifier_logits(tiny_qwen2_dir, ids, mask, model.score.get_value())
    assert got.shape == (4, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=logits_bound(ref), rtol=0)


def test_left_and_right_padding_agree_and_last_index(tiny_qwen2_dir):
    model = build_classifier(ClassifierSpec(str(tiny_qwen2_dir), mode="head"))
    random_head(model, seed=1)
    (ids_r, mask_r), (ids_l, mask_l) = padded("right"), padded("left")
    np.testing.assert_array_equal(last_token_index(mask_r), [9, 6, 2, 0])
    np.testing.assert_array_equal(last_token_index(mask_l), [9, 9, 9, 9])
    right = np.asarray(_logits(model, ids_r, mask_r))
    np.testing.assert_allclose(right, _logits(model, ids_l, mask_l), atol=logits_bound(right))


@pytest.mark.parametrize("mode", ["lora", "full", "head"])
def test_save_load_round_trip_and_what_trains(tiny_qwen2_dir, tmp_path, mode):
    spec = ClassifierSpec(str(tiny_qwen2_dir), num_classes=2, mode=mode)
    model = build_classifier(spec, seed=3)
    random_head(model, seed=2)
    trained = nnx.state(model, trainable_filter(mode))
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trained)}
    assert "score" in names
    assert any("lora_a" in n for n in names) == (mode == "lora")
    assert any("mlp/up_proj/kernel" in n for n in names) == (mode == "full")
    # change a trained decoder weight too, so the round trip has to carry it
    if mode != "head":
        leaf = next(v for p, v in nnx.to_flat_state(trained) if "score" not in p)
        leaf.set_value(leaf.get_value() + 0.01)
        nnx.update(model, trained)
    ids, mask = padded("right")
    before = np.asarray(_logits(model, ids, mask))
    save_classifier(model, tmp_path / "clf", spec)
    after = np.asarray(_logits(load_classifier(tmp_path / "clf"), ids, mask))
    np.testing.assert_allclose(after, before, atol=1e-6)


def test_linear_probe_gradient_reaches_only_the_head(tiny_qwen2_dir):
    model = build_classifier(ClassifierSpec(str(tiny_qwen2_dir), mode="head"))
    ids, mask = padded("left")

    def loss(m):
        return jnp.mean(m(ids, mask)[:, 0])

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(model)
    norms = {
        "/".join(map(str, p)): float(jnp.abs(v.get_value()).max())
        for p, v in nnx.to_flat_state(grads)
    }
    assert norms["score"] > 0
    assert max(v for k, v in norms.items() if k != "score") == 0.0


def test_sharded_classifier_matches_single_device(tiny_qwen2_dir):
    ids, mask = padded("left")
    spec = ClassifierSpec(str(tiny_qwen2_dir), mode="lora")
    single = build_classifier(spec)
    random_head(single)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    sharded = build_classifier(spec, mesh=mesh)
    sharded.score.set_value(jax.device_put(single.score.get_value(), sharded.score.sharding))
    kernel = sharded.lm.model.layers[0].mlp.up_proj.kernel.get_value()
    assert len(kernel.sharding.device_set) == 8
    got = _logits(sharded, place_batch(ids, mesh), place_batch(mask, mesh))
    want = np.asarray(_logits(single, ids, mask))
    np.testing.assert_allclose(got, want, atol=logits_bound(want), rtol=0)


def test_bad_spec_and_missing_folder(tiny_qwen2_dir, tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        ClassifierSpec(str(tiny_qwen2_dir), mode="prefix")
    with pytest.raises(FileNotFoundError, match="no saved classifier"):
        load_classifier(tmp_path)
