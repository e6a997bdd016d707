"""`w2s export`: merged adapters (or fully fine-tuned weights) as a HF folder transformers loads."""

import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer

from w2s_jax.checkpointing import TrainCheckpoints, restore_params
from w2s_jax.cli import main
from w2s_jax.fingerprint import tokenizer_fingerprint
from w2s_jax.lora import LoRAConfig, apply_lora
from w2s_jax.models import CausalLM, ModelConfig, load_pretrained
from w2s_jax.sharding import make_mesh
from w2s_jax.train import train
from w2s_jax.train_config import TrainConfig

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 64], [8, 9, 10, 11, 12, 13, 14, 15]], np.int32)
_forward = nnx.jit(lambda model, ids: model(ids))


def hf_logits(folder):
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.from_numpy(IDS).long()).logits.numpy()


def test_merged_lora_export_matches_adapted_model(tmp_path, tiny_qwen2_dir):
    config = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj"), dropout=0.0)
    model = load_pretrained(tiny_qwen2_dir, dtype="float32")
    apply_lora(model, config)
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
    new = [0.2 * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    params = nnx.state(model, nnx.LoRAParam)
    checkpoints = TrainCheckpoints(tmp_path / "run", save_every=1, keep=1)
    checkpoints.save(5, params, {"mu": params}, {"lora": config.to_dict()})
    checkpoints.close()
    ours = np.asarray(_forward(model, IDS))
    base = np.asarray(_forward(load_pretrained(tiny_qwen2_dir, dtype="float32"), IDS))
    assert np.abs(ours - base).max() > 0.05  # the adapters matter

    out = tmp_path / "merged"
    assert main(["export", "--expert", str(tiny_qwen2_dir), "--lora", str(tmp_path / "run"),
                 "--out", str(out)]) == 0  # fmt: skip
    np.testing.assert_allclose(hf_logits(out), ours, rtol=1e-4, atol=1e-4)
    exported = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer_fingerprint(exported) == tokenizer_fingerprint(
        AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    )
    # a step folder works too, and --dtype writes that dtype
    step_dir = tmp_path / "run" / "checkpoints" / "5"
    assert main(["export", "--expert", str(tiny_qwen2_dir), "--lora", str(step_dir),
                 "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    np.testing.assert_allclose(hf_logits(tmp_path / "bf16"), ours, atol=0.15)


def test_scratch_sft_run_exports_without_an_expert(tmp_path, tiny_qwen2_dir):
    config_file = tmp_path / "config.json"
    config_file.write_text((tiny_qwen2_dir / "config.json").read_text())
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        prompt, completion = rng.integers(3, 300, 4).tolist(), rng.integers(3, 300, 6).tolist()
        lines.append(json.dumps({"id": i, "prompt_ids": prompt, "completion_ids": completion}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    summary = train(
        TrainConfig(
            samples=str(tmp_path),
            out=str(run),
            objective="sft",
            init="random",
            model_config=str(config_file),
            tokenizer=str(tiny_qwen2_dir),
            lora_rank=0,
            steps=8,
            batch_positions=24,
            grad_accum=1,
            learning_rate=3e-3,
            dtype="float32",
            length_bucket=16,
            log_every=1,
            progress=False,
        ),
        mesh=make_mesh("data=1", devices=jax.devices()[:1]),
    )
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.5, losses
    assert summary["final"]["agreement"] > 0.2  # it memorises the completions

    out = tmp_path / "export"
    assert main(["export", "--lora", str(run), "--out", str(out)]) == 0
    # full fine-tuning: every parameter comes from the checkpoint
    model_config = ModelConfig.from_hf_json(config_file)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(model_config, rngs=nnx.Rngs(0))))
    trained = nnx.merge(graphdef, restore_params(run, abstract))
    np.testing.assert_allclose(hf_logits(out), _forward(trained, IDS), rtol=1e-4, atol=1e-4)
    assert (out / "tokenizer.json").is_file()


def test_export_errors(tmp_path, tiny_qwen2_dir):
    with pytest.raises(SystemExit, match="checkpoint folder does not exist"):
        main(["export", "--expert", str(tiny_qwen2_dir), "--lora", str(tmp_path / "no"),
              "--out", str(tmp_path / "o")])  # fmt: skip
    model = load_pretrained(tiny_qwen2_dir, dtype="float32")
    config = LoRAConfig(rank=2)
    apply_lora(model, config)
    params = nnx.state(model, nnx.LoRAParam)
    checkpoints = TrainCheckpoints(tmp_path / "run", save_every=1, keep=1)
    checkpoints.save(1, params, {"mu": params}, {"lora": config.to_dict()})
    checkpoints.close()
    with pytest.raises(SystemExit, match=r"holds LoRA adapters: --expert .* is required"):
        main(["export", "--lora", str(tmp_path / "run"), "--out", str(tmp_path / "o")])
