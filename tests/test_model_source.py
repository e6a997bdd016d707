"""Model sources of `w2s sample` (`w2s_jax.model_source`): RUN, RUN@STEP and `base` as the
expert or the (dynamic) amateur, one shared base in memory, and training on their samples.

References: transformers (PyTorch) on `w2s export`'s merged folder of the same checkpoint,
and the base folder loaded on its own.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from tolerances import decoder_bound
from transformers import AutoModelForCausalLM

from w2s_jax.export import ExportSettings, export
from w2s_jax.files import DataError, atomic_write_json, atomic_write_jsonl
from w2s_jax.model_source import (
    load_pair,
    manifest_entries,
    parse_source,
    resolve_pair,
)
from w2s_jax.models import load_pretrained, load_tokenizer
from w2s_jax.run_folder import SettingsChanged
from w2s_jax.sharding import make_mesh
from w2s_jax.stages.sample import sample
from w2s_jax.stages.sample_settings import SampleSettings
from w2s_jax.train import check_samples_match, train
from w2s_jax.train_config import TrainSettings

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 64], [8, 9, 10, 11, 12, 13, 14, 15]], np.int32)
_forward = nnx.jit(lambda model, ids: model(ids))


def _train(samples, expert, out, steps):
    """A LoRA `w2s train` run on one device (every call compiles the same step)."""
    settings = TrainSettings(
        samples=str(samples),
        expert=str(expert),
        out=str(out),
        steps=steps,
        save_every=2,
        batch_positions=8,
        dtype="float32",
        learning_rate=5e-2,
        length_bucket=128,
        progress=False,
    )
    return train(settings, mesh=make_mesh("data=1", devices=jax.devices()[:1]))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_qwen2_dir):
    """A 4-step LoRA `w2s train` run on the tiny expert (checkpoints of steps 1, 2, 4)."""
    from tiny_checkpoints import random_sample_records

    from w2s_jax.fingerprint import tokenizer_fingerprint, weights_fingerprint
    from w2s_jax.sample_store import FORMAT

    samples = tmp_path_factory.mktemp("train_samples")
    atomic_write_jsonl(samples / "samples" / "p000-00000.jsonl", random_sample_records(4, 4))
    atomic_write_json(
        samples / "manifest.json",
        {
            "format": FORMAT,
            "expert_weights_fingerprint": weights_fingerprint(tiny_qwen2_dir),
            "tokenizer_fingerprint": tokenizer_fingerprint(load_tokenizer(tiny_qwen2_dir)),
            "pad_id": 0,
        },
    )
    out = tmp_path_factory.mktemp("lora_run")
    _train(samples, tiny_qwen2_dir, out, steps=4)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, run, tiny_qwen2_dir):
    """`w2s export` of the run's checkpoints at steps 2 and 4 (float32 merged folders)."""
    folders = {}
    for step in (2, 4):
        folders[step] = tmp_path_factory.mktemp(f"export_{step}")
        export(
            ExportSettings(
                lora=str(run), out=str(folders[step]), expert=str(tiny_qwen2_dir), step=step
            )
        )
    return folders


def _logits(model):
    return np.asarray(_forward(model, IDS))


def _bound(logits):
    """Float32 reordering bound, transformers vs w2s_jax, for logits of IDS (8 positions)
    through the tiny 2-layer expert."""
    return decoder_bound(logits, layers=2, hidden=64, intermediate=128, positions=8)


def _hf_logits(folder):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(IDS).long()).logits.numpy()


def test_dynamic_amateur_equals_the_export_of_its_checkpoint(run, exported, tiny_qwen2_dir):
    expert, amateur = load_pair(*resolve_pair(str(run), f"{run}@2"), dtype="float32")
    for model, step in ((expert, 4), (amateur, 2)):
        want = _hf_logits(exported[step])
        np.testing.assert_allclose(_logits(model), want, atol=_bound(want), rtol=0)
    # the two steps are different models, and neither is the base: mixing them up would
    # exceed the bound
    base_logits = _hf_logits(tiny_qwen2_dir)
    assert np.abs(_logits(expert) - _logits(amateur)).max() > 10 * _bound(base_logits)
    assert np.abs(_logits(amateur) - base_logits).max() > 10 * _bound(base_logits)
    # `base`: the expert's base folder, as it is
    _, base = load_pair(*resolve_pair(f"{run}@4", "base"), dtype="float32")
    np.testing.assert_allclose(_logits(base), base_logits, atol=_bound(base_logits), rtol=0)


def _buffers(model, kind):
    """{path: device buffer pointer} of the model's variables of `kind`."""
    return {
        path: variable.get_value().unsafe_buffer_pointer()
        for path, variable in nnx.to_flat_state(nnx.state(model, kind))
    }


def _unique_bytes(*models):
    """Bytes of the distinct device buffers behind the models' parameters."""
    seen = {}
    for model in models:
        for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            value = variable.get_value()
            seen[value.unsafe_buffer_pointer()] = value.nbytes
    return sum(seen.values())


def test_the_two_models_share_the_base_arrays(run, tiny_qwen2_dir):
    sources = resolve_pair(f"{run}@4", f"{run}@2")
    expert, amateur = load_pair(*sources, dtype="float32")
    base_only = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    base_e, base_a = _buffers(expert, base_only), _buffers(amateur, base_only)
    assert base_e == base_a and len(base_e) > 10  # the same buffers, every one of them
    lora_e, lora_a = _buffers(expert, nnx.LoRAParam), _buffers(amateur, nnx.LoRAParam)
    assert lora_e.keys() == lora_a.keys() and len(lora_e) == 2 * 2 * 2  # 2 layers, q/v, A/B
    assert not set(lora_e.values()) & set(lora_a.values())
    differ = [
        not np.array_equal(x.get_value(), y.get_value())
        for (_, x), (_, y) in zip(
            nnx.to_flat_state(nnx.state(expert, nnx.LoRAParam)),
            nnx.to_flat_state(nnx.state(amateur, nnx.LoRAParam)),
            strict=True,
        )
    ]
    assert any(differ)
    # memory: one base plus two adapter sets, where two loads hold two bases
    base = load_pretrained(tiny_qwen2_dir, dtype="float32")
    one_base = _unique_bytes(base)
    adapters = sum(x.nbytes for x in jax.tree.leaves(nnx.state(expert, nnx.LoRAParam)))
    assert _unique_bytes(expert, amateur) == one_base + 2 * adapters
    separate = load_pretrained(tiny_qwen2_dir, dtype="float32")
    assert _unique_bytes(base, separate) == 2 * one_base  # the measure sees unshared copies


def test_full_finetuning_run_replaces_the_base_of_its_model_only(tmp_path, tiny_qwen2_dir):
    """A rank-0 checkpoint replaces every parameter of the expert; the `base` amateur,
    merged from the same split, keeps the base folder's weights."""
    from w2s_jax.checkpointing import TrainCheckpoints
    from w2s_jax.fingerprint import weights_fingerprint_record
    from w2s_jax.lora import LoRAConfig

    model = load_pretrained(tiny_qwen2_dir, dtype="float32")
    params = jax.tree.map(lambda x: 1.1 * x, nnx.state(model, nnx.Param))
    meta = {
        "lora": LoRAConfig(rank=0).to_dict(),
        "expert_weights_hashed": weights_fingerprint_record(tiny_qwen2_dir),
    }
    checkpoints = TrainCheckpoints(tmp_path / "full", save_every=1, keep=1)
    checkpoints.save(3, params, {"mu": params}, meta)
    checkpoints.close()
    atomic_write_json(tmp_path / "full" / "train_config.json", {"expert": str(tiny_qwen2_dir)})
    sources = resolve_pair(str(tmp_path / "full"), "base")
    assert (sources[0].rank, sources[0].step, sources[1].folder) == (0, 3, tiny_qwen2_dir)
    expert, amateur = load_pair(*sources, dtype="float32")
    nnx.update(model, params)
    np.testing.assert_array_equal(_logits(expert), _logits(model))
    want = _hf_logits(tiny_qwen2_dir)
    np.testing.assert_allclose(_logits(amateur), want, atol=_bound(want), rtol=0)


def test_source_parsing(run, exported, tiny_qwen2_dir):
    latest = parse_source("expert", str(run))
    assert (latest.kind, latest.step, latest.rank, latest.folder) == ("run", 4, 8, tiny_qwen2_dir)
    assert parse_source("expert", f"{run}@2").step == 2
    with pytest.raises(ValueError, match=r"no checkpoint for step 3 \(have \[1, 2, 4\]\)"):
        parse_source("amateur", f"{run}@3")
    folder = parse_source("amateur", str(tiny_qwen2_dir))
    assert (folder.kind, folder.checkpoint) == ("folder", None)
    with pytest.raises(ValueError, match="is not a `w2s train` run"):
        parse_source("expert", f"{tiny_qwen2_dir}@2")
    with pytest.raises(ValueError, match="does not exist"):
        parse_source("expert", f"{run}/nowhere")
    # base: of a run, of an export of one; refused for a plain folder
    for expert in (f"{run}@2", str(exported[4])):
        _, base = resolve_pair(expert, "base")
        assert (base.kind, base.folder, base.checkpoint) == ("base", tiny_qwen2_dir, None)
    with pytest.raises(ValueError, match="base needs an expert that records its base model"):
        resolve_pair(str(tiny_qwen2_dir), "base")
    # fingerprints: the step and the checkpoint files identify the model
    settings, entries = manifest_entries(*resolve_pair(f"{run}@4", f"{run}@2"))
    assert (settings["expert_step"], settings["amateur_step"]) == (4, 2)
    assert settings["expert_weights_fingerprint"] != settings["amateur_weights_fingerprint"]
    assert entries["expert_source"]["checkpoint"] == str((run / "checkpoints" / "4").resolve())
    base_settings, _ = manifest_entries(*resolve_pair(str(tiny_qwen2_dir), str(tiny_qwen2_dir)))
    assert base_settings["expert_step"] is None
    assert (
        entries["expert_weights_hashed"]["fingerprint"]
        == (base_settings["expert_weights_fingerprint"])
    )


def test_sample_with_base_amateur_then_train_on_the_export(tmp_path, run, exported, tiny_qwen2_dir):
    questions = tmp_path / "q.jsonl"
    atomic_write_jsonl(questions, [{"id": f"q{i}", "question": f"{i} plus {i}"} for i in range(2)])
    out = tmp_path / "samples"
    options = dict(data=str(questions), out=str(out), max_new_tokens=6, batch_size=2)
    options |= dict(beta=0.0, dtype="float32")
    one_device = make_mesh("data=1", devices=jax.devices()[:1])
    sample(SampleSettings(expert=str(run), amateur="base", **options), mesh=one_device)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["expert_source"]["step"] == 4 and manifest["amateur_source"]["kind"] == "base"
    assert manifest["amateur"] == str(tiny_qwen2_dir.resolve())
    assert json.loads((out / "summary.json").read_text())["questions"] == 2
    # another step on the same folder is refused
    with pytest.raises(SettingsChanged, match="expert_step: 4 -> 2"):
        sample(SampleSettings(expert=f"{run}@2", amateur="base", **options), mesh=one_device)
    # `w2s train` takes the export of that checkpoint as the expert, and refuses others
    assert check_samples_match(out, exported[4]) == manifest
    other_base = tmp_path / "other_base"  # that checkpoint, said to be merged elsewhere
    shutil.copytree(exported[4], other_base)
    report = json.loads((other_base / "export_report.json").read_text())
    atomic_write_json(other_base / "export_report.json", report | {"expert": str(exported[2])})
    for other, why in (
        (exported[2], "is the export of another checkpoint"),
        (tiny_qwen2_dir, "is not a `w2s export` folder"),
        (other_base, "merged the adapters into another base"),
    ):
        with pytest.raises(DataError, match=f"made by the run checkpoint .*{why}"):
            _train(out, other, tmp_path / "refused", steps=1)
