"""`w2s train`: packed objective = one position per forward, training, resume, mesh, bad input."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tolerances import decoder_bound, reordered_sum_bound

from w2s_jax.checkpointing import StopSignal, restore_params
from w2s_jax.cli import main
from w2s_jax.data.packing import collate_step, find_sample_files, iter_steps, load_trajectories
from w2s_jax.files import DataError, atomic_write_json, atomic_write_jsonl
from w2s_jax.lora import LoRAConfig, apply_lora, load_lora_into
from w2s_jax.models import load_pretrained, load_tokenizer
from w2s_jax.run_folder import SettingsChanged
from w2s_jax.sharding import make_mesh
from w2s_jax.train import make_loss_and_grads, train
from w2s_jax.train_config import TrainSettings


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Each train() jits a fresh step; a persistent cache makes identical re-compiles cheap."""
    options = {
        "jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
        "jax_persistent_cache_min_compile_time_secs": 0.0,
        "jax_persistent_cache_min_entry_size_bytes": 0,
    }
    before = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    yield
    for name, value in before.items():
        jax.config.update(name, value)


def write_samples(folder, expert_dir, *, n=8, per_trajectory=4, seed=0, fingerprints=None):
    """A `w2s sample`-shaped folder: random ids, `per_trajectory` positions with sparse targets."""
    from tiny_checkpoints import random_sample_records

    from w2s_jax.fingerprint import tokenizer_fingerprint, weights_fingerprint
    from w2s_jax.sample_store import FORMAT

    records = random_sample_records(n, per_trajectory, seed)
    atomic_write_jsonl(folder / "samples" / "p000-00000.jsonl", records)
    manifest = {
        "format": FORMAT,
        "expert_weights_fingerprint": weights_fingerprint(expert_dir),
        "tokenizer_fingerprint": tokenizer_fingerprint(load_tokenizer(expert_dir)),
        "pad_id": 0,
        **(fingerprints or {}),
    }
    atomic_write_json(folder / "manifest.json", manifest)
    return folder


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tiny_qwen2_dir):
    """3 trajectories x 4 positions: each 8-position step draws from a reshuffled stream."""
    return write_samples(tmp_path_factory.mktemp("samples"), tiny_qwen2_dir, n=3)


@pytest.fixture(scope="module")
def one_device():
    return make_mesh("data=1", devices=jax.devices()[:1])


def _config(samples, expert, out, **kw):
    base = dict(
        samples=str(samples),
        expert=str(expert),
        out=str(out),
        steps=6,
        batch_positions=8,
        grad_accum=2,
        dtype="float32",
        learning_rate=2e-2,
        length_bucket=32,
        save_every=2,
        log_every=1,
        progress=False,
    )
    return TrainSettings(**(base | kw))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, samples, tiny_qwen2_dir, one_device):
    out = tmp_path_factory.mktemp("run_a")
    summary = train(_config(samples, tiny_qwen2_dir, out), mesh=one_device)
    return out, summary


def _curve(out, key="loss"):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines]


def _trained(out, tiny_qwen2_dir):
    model = load_pretrained(tiny_qwen2_dir, dtype="float32")
    apply_lora(model, LoRAConfig(dropout=0.0))
    return restore_params(out, nnx.state(model, nnx.LoRAParam))


# --- the packed objective is the one-position-per-forward objective ----------------------


def grad_bound(grad):
    """Float32 reordering bound for a gradient array of a next-token loss on the tiny
    expert: forward and backward through 2 layers (2 * (9 * 2 + 2) reductions), the
    log-softmax over V = 320 and the mean over positions, V the longest."""
    return reordered_sum_bound(grad, terms=320, reductions=2 * (9 * 2 + 2) + 2)


@pytest.mark.parametrize("objective", ["contrastive", "sft"])
def test_packed_equals_one_position_per_forward(tmp_path, tiny_qwen2_dir, objective):
    write_samples(tmp_path, tiny_qwen2_dir, n=4, per_trajectory=5, seed=3)
    trajectories, stats = load_trajectories(
        find_sample_files(tmp_path), objective=objective, vocab_size=320
    )
    # 2 micro-batches whose positions come from several trajectories, some split between them
    n = 14 if objective == "contrastive" else 48  # sft: every completion token (up to 20 each)
    step = next(iter_steps(trajectories, positions_per_step=n, micro_batches=2, seed=1))
    assert max(len(m) for m in step) >= 2
    batch = collate_step(trajectories, step, k=stats["k"], length_bucket=8)

    model = load_pretrained(tiny_qwen2_dir, dtype="float32")
    apply_lora(model, LoRAConfig(rank=4, dropout=0.0))
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
    new = [0.1 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))  # non-zero B: every gradient is live
    graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
    metrics, grads = jax.jit(make_loss_and_grads(graphdef))(params, rest, batch, jax.random.key(0))

    # Reference: one row per supervised position holding exactly its prefix (right-padded),
    # logits read at the prefix's last token, soft CE written out, mean over positions.
    rows, ids, weights = [], [], []
    for micro in step:
        for seg in micro:
            traj = trajectories[seg.trajectory]
            for j in range(seg.start, seg.stop):
                rows.append(traj.input_ids[: traj.logit_index[j] + 1])
                pad = stats["k"] - traj.target_ids.shape[1]
                ids.append(np.pad(traj.target_ids[j], (0, pad)))
                weights.append(np.pad(traj.target_weights[j], (0, pad)))
    length = max(map(len, rows))
    input_ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)], mask[r, : len(row)] = row, 1
    last = np.array([len(row) - 1 for row in rows])
    ids, weights = np.stack(ids), np.stack(weights)

    def reference(params):
        m = nnx.merge(graphdef, params, rest)
        logits = m(input_ids, mask)[np.arange(len(rows)), last]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        per_position = -jnp.sum(weights * jnp.take_along_axis(logp, ids, axis=-1), axis=-1)
        return per_position.mean(), logits

    (ref_loss, ref_logits), ref_grads = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
    assert len(rows) == n
    # Packed rows and one row per position reduce in other orders. The loss moves by at
    # most twice the logits' error (through the log-softmax, weights summing to 1); a
    # position read from the wrong token or a leak across packed segments is off by O(1).
    length = batch["input_ids"].shape[-1]
    logits_error = decoder_bound(
        ref_logits, layers=2, hidden=64, intermediate=128, positions=length
    )
    loss_bound = 2 * logits_error
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=0, atol=loss_bound)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=grad_bound(want))
    assert max(np.abs(g).max() for g in jax.tree.leaves(ref_grads)) > 1e-3
    entropy = -np.sum(np.where(weights > 0, weights * np.log(np.maximum(weights, 1e-30)), 0), -1)
    np.testing.assert_allclose(metrics["kl"], ref_loss - entropy.mean(), rtol=0, atol=loss_bound)
    agreement = np.mean(np.argmax(np.asarray(ref_logits), -1) == ids[:, 0])
    np.testing.assert_allclose(metrics["agreement"], agreement)
    if objective == "sft":  # the vocabulary projection in blocks of 5 positions: same numbers
        chunked = jax.jit(make_loss_and_grads(graphdef, loss_chunk_size=5))
        metrics_c, grads_c = chunked(params, rest, batch, jax.random.key(0))
        for key in metrics:
            np.testing.assert_allclose(metrics_c[key], metrics[key], rtol=0, atol=loss_bound)
        for got, want in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=grad_bound(want))


# --- training ---------------------------------------------------------------------------


def test_training_lowers_the_loss_and_trains_only_adapters(uninterrupted, tiny_qwen2_dir):
    out, summary = uninterrupted
    assert summary["steps"] == 6 and not summary["stopped"]
    loss = _curve(out)
    assert len(loss) == 6 and loss[-1] < loss[0] - 0.5, loss
    for name in ("loss_curve.png", "summary.json", "train_config.json"):
        assert (out / name).is_file()
    assert list((out / "tensorboard").iterdir())
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(record) == {
        "step", "loss", "kl", "agreement", "grad_norm", "lr", "positions_per_s", "tokens_per_s"
    }  # fmt: skip
    assert record["lr"] == pytest.approx(2e-2)  # linear decay from the peak at step 0

    # the checkpoint holds the adapters only; merged, they change only q_proj and v_proj
    base = load_pretrained(tiny_qwen2_dir, dtype="float32")
    trained = load_lora_into(load_pretrained(tiny_qwen2_dir, dtype="float32"), out)
    from w2s_jax.lora import merge_lora

    merged = nnx.to_flat_state(nnx.state(merge_lora(trained), nnx.Param))
    original = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
    changed = {
        "/".join(map(str, path))
        for path, v in merged
        if not np.array_equal(v.get_value(), original[path].get_value())
    }
    assert changed == {
        f"model/layers/{i}/self_attn/{p}/kernel" for i in (0, 1) for p in ("q_proj", "v_proj")
    }


def test_kill_and_resume_equals_uninterrupted(
    tmp_path, uninterrupted, samples, tiny_qwen2_dir, one_device
):
    out = tmp_path / "run"
    config = _config(samples, tiny_qwen2_dir, out)
    # 1) a stop request (SIGTERM) after step 3: checkpoint saved at 3, run reports stopped
    summary = train(config, should_stop=lambda step: step == 3, mesh=one_device)
    assert summary["stopped"] and summary["steps"] == 3

    # 2) resumed at 3, then killed hard after step 5 (last checkpoint: step 4)
    def crash(step):
        if step == 5:
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        train(config, should_stop=crash, mesh=one_device)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [2, 3, 4]

    # 3) resumed at 4: replays step 5's data, finishes; a further re-run has nothing to do
    assert train(config, mesh=one_device)["steps"] == 6
    assert train(config, mesh=one_device)["steps"] == 6
    a, b = _trained(uninterrupted[0], tiny_qwen2_dir), _trained(out, tiny_qwen2_dir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_curve(out), _curve(uninterrupted[0]), rtol=1e-6)

    # a re-run with settings that change the result is refused
    with pytest.raises(SettingsChanged, match=r"different settings.*learning_rate: 0.02 -> 0.01"):
        train(_config(samples, tiny_qwen2_dir, out, learning_rate=1e-2), mesh=one_device)


def test_stop_signal_catches_sigterm():
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_mesh_2x4_gives_the_same_loss_curve(tmp_path, samples, tiny_qwen2_dir, one_device):
    kw = dict(steps=3, lora_dropout=0.0)
    train(_config(samples, tiny_qwen2_dir, tmp_path / "one", **kw), mesh=one_device)
    train(_config(samples, tiny_qwen2_dir, tmp_path / "mesh", mesh="data=2,fsdp=4", **kw))
    np.testing.assert_allclose(_curve(tmp_path / "mesh"), _curve(tmp_path / "one"), rtol=1e-5)
    np.testing.assert_allclose(
        _curve(tmp_path / "mesh", "grad_norm"), _curve(tmp_path / "one", "grad_norm"), rtol=1e-4
    )


# --- bad input --------------------------------------------------------------------------


def _cli(*args):
    with pytest.raises(SystemExit) as info:
        main(["train", *map(str, args), "--no-progress"])
    return str(info.value)


def test_samples_from_another_expert_are_refused(
    tmp_path, tiny_qwen2_dir, tiny_qwen2_amateur_dir, samples
):
    message = _cli("--expert", tiny_qwen2_amateur_dir, "--samples", samples, "--out", tmp_path)
    assert "samples were made with different expert weights" in message
    other = write_samples(
        tmp_path / "s", tiny_qwen2_dir, fingerprints={"tokenizer_fingerprint": "abc"}
    )
    message = _cli("--expert", tiny_qwen2_dir, "--samples", other, "--out", tmp_path / "o")
    assert "different tokenizer (tokenizer_fingerprint abc there" in message
    (other / "manifest.json").unlink()
    message = _cli("--expert", tiny_qwen2_dir, "--samples", other, "--out", tmp_path / "o")
    assert "manifest.json is missing" in message


def test_empty_samples_and_bad_targets_are_refused(tmp_path, tiny_qwen2_dir, samples):
    empty = write_samples(tmp_path / "empty", tiny_qwen2_dir, n=0)
    message = _cli("--expert", tiny_qwen2_dir, "--samples", empty, "--out", tmp_path / "o")
    assert "no records" in message
    message = _cli("--expert", tiny_qwen2_dir, "--samples", tmp_path / "nope", "--out", tmp_path)
    assert "samples folder does not exist" in message
    args = ("--expert", tiny_qwen2_dir, "--samples", samples, "--out", tmp_path / "o2")
    message = _cli(*args, "--lora-targets", "q_proj,attn_proj")
    assert "attn_proj match no linear layer" in message and "v_proj" in message
    message = _cli(*args, "--batch-positions", "9", "--grad-accum", "2")
    assert "must be a positive multiple of grad accumulation" in message


def test_bad_record_names_file_and_line(tmp_path, tiny_qwen2_dir):
    folder = write_samples(tmp_path / "bad", tiny_qwen2_dir, n=3)
    shard = folder / "samples" / "p000-00000.jsonl"
    lines = shard.read_text().splitlines()
    record = json.loads(lines[1])
    record["target_ids"][0][0] = 5000
    shard.write_text("\n".join([lines[0], json.dumps(record), lines[2]]) + "\n")
    with pytest.raises(DataError, match=rf"{shard}:2: field 'target_ids\[0\]' has value 5000"):
        train(_config(folder, tiny_qwen2_dir, tmp_path / "o"))
