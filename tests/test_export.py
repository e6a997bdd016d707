"""`w2s export`: merged adapters (or fully fine-tuned weights) as a HF folder transformers
loads, the PEFT adapter beside it, the update-kept report and generation_config.json."""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from tolerances import decoder_bound, reordered_sum_bound
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from w2s_jax.checkpointing import TrainCheckpoints, restore_params
from w2s_jax.cli import main
from w2s_jax.fingerprint import tokenizer_fingerprint
from w2s_jax.lora import LoRAConfig, apply_lora, load_lora_into
from w2s_jax.models import CausalLM, ModelConfig, load_pretrained, save_pretrained
from w2s_jax.prompts import stop_ids
from w2s_jax.sharding import make_mesh
from w2s_jax.train import train
from w2s_jax.train_config import TrainSettings

IDS = np.array([[5, 17, 42, 99, 3, 250, 7, 64], [8, 9, 10, 11, 12, 13, 14, 15]], np.int32)
_forward = nnx.jit(lambda model, ids: model(ids))


def logits_bound(logits):
    """Float32 reordering bound, transformers vs w2s_jax, for logits of IDS (8 positions)
    through the tiny 2-layer expert."""
    return decoder_bound(logits, layers=2, hidden=64, intermediate=128, positions=8)


def hf_logits(model_or_folder):
    model = model_or_folder
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(torch.from_numpy(IDS).long()).logits.numpy()


def save_lora_checkpoint(run, base_dir, config, *, scale):
    """A LoRA checkpoint on `base_dir` whose A and B are scale * normal; returns its params
    as {(layer, projection): (A [in, r], B [r, out])} in float64."""
    model = load_pretrained(base_dir, dtype="float32")
    apply_lora(model, config)
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.LoRAParam))
    new = [scale * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    params = nnx.state(model, nnx.LoRAParam)
    checkpoints = TrainCheckpoints(run, save_every=1, keep=1)
    checkpoints.save(5, params, {"mu": params}, {"lora": config.to_dict()})
    checkpoints.close()
    flat = {path: np.asarray(v.get_value(), np.float64) for path, v in nnx.to_flat_state(params)}
    return {
        (path[2], path[4]): (flat[path], flat[(*path[:-1], "lora_b")])
        for path in flat
        if path[-1] == "lora_a"
    }


def adapted_logits(base_dir, run):
    """w2s's own model with the checkpoint's adapters applied (unmerged), float32."""
    return np.asarray(
        _forward(load_lora_into(load_pretrained(base_dir, dtype="float32"), run), IDS)
    )


def test_merged_lora_export_matches_adapted_model(tmp_path, tiny_qwen2_dir):
    config = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "up_proj"), dropout=0.0)
    lora = save_lora_checkpoint(tmp_path / "run", tiny_qwen2_dir, config, scale=0.2)
    ours = adapted_logits(tiny_qwen2_dir, tmp_path / "run")
    base = np.asarray(_forward(load_pretrained(tiny_qwen2_dir, dtype="float32"), IDS))
    assert np.abs(ours - base).max() > 0.05  # the adapters matter

    out = tmp_path / "merged"
    assert main(["export", "--expert", str(tiny_qwen2_dir), "--lora", str(tmp_path / "run"),
                 "--out", str(out)]) == 0  # fmt: skip
    bound = logits_bound(ours)  # dropping the adapters moves the logits by ~8
    np.testing.assert_allclose(hf_logits(out), ours, rtol=0, atol=bound)
    exported = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer_fingerprint(exported) == tokenizer_fingerprint(
        AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    )
    # the PEFT adapter on the transformers base is the same model
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(lora) == 2 * 2 * 3
    key = "base_model.model.model.layers.1.mlp.up_proj"
    a, b = lora[(1, "up_proj")]
    assert tensors[f"{key}.lora_A.weight"].dtype == np.float32
    np.testing.assert_array_equal(tensors[f"{key}.lora_A.weight"], a.T.astype(np.float32))
    np.testing.assert_array_equal(tensors[f"{key}.lora_B.weight"], b.T.astype(np.float32))
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["q_proj", "up_proj", "v_proj"]
    assert adapter_config["base_model_name_or_path"] == str(tiny_qwen2_dir)
    hf_base = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf_base, str(out / "adapter"))
    np.testing.assert_allclose(hf_logits(peft_model), ours, rtol=0, atol=bound)
    # a step folder works too, and --dtype writes that dtype
    step_dir = tmp_path / "run" / "checkpoints" / "5"
    assert main(["export", "--expert", str(tiny_qwen2_dir), "--lora", str(step_dir),
                 "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # Weights rounded once to bfloat16 (twice where adapted: W, then W + dW), computed in
    # float32: each rounding shifts a matmul's output by at most eps(bf16) of its scale,
    # whatever its length, so count one term per rounded tensor on the path: per layer 2
    # norms, q and k, v, o, gate and up, down; 2 layers; embedding, final norm, head.
    bf16_bound = reordered_sum_bound(ours, terms=1, reductions=9 * 2 + 3, dtype=ml_dtypes.bfloat16)
    np.testing.assert_allclose(hf_logits(tmp_path / "bf16"), ours, rtol=0, atol=bf16_bound)


def _float64(folder):
    """Every tensor of a folder's model.safetensors as float64 numpy (read with torch)."""
    tensors = load_torch(str(folder / "model.safetensors"))
    return {name: t.to(torch.float64).numpy() for name, t in tensors.items()}


def expected_update_kept(base_dir, export_dir, lora, scaling, dtype):
    """{"predicted"/"written": (per matrix, overall)} (kept, error, norm_ratio) in float64
    numpy, with W the base's stored weights and R = dtype(W + dW) - W (`predicted`) or
    the weights written - W (`written`)."""
    base, written = _float64(base_dir), _float64(export_dir)
    sums = {"predicted": {}, "written": {}}
    for (layer, proj), (a, b) in lora.items():
        name = f"model.layers.{layer}.self_attn.{proj}.weight"
        w, delta = base[name], scaling * (a @ b).T
        merged = {
            "predicted": (w + delta).astype(dtype).astype(np.float64),
            "written": written[name],
        }
        for kind, by_name in sums.items():
            r = merged[kind] - w
            by_name[name] = np.array([(delta**2).sum(), (r * delta).sum(), (r**2).sum(),
                                      ((r - delta) ** 2).sum()])  # fmt: skip
    measures = lambda s: (s[1] / s[0], np.sqrt(s[3] / s[0]), np.sqrt(s[2] / s[0]))  # noqa: E731
    return {
        kind: ({name: measures(s) for name, s in by_name.items()}, measures(sum(by_name.values())))
        for kind, by_name in sums.items()
    }


def test_update_kept_report_and_warning(tmp_path, tiny_qwen2_dir, capsys):
    # a bfloat16 base (saved by w2s: no generation_config.json) and an update far below
    # bfloat16's resolution at the weights' size (|W| ~ 0.2, |dW| ~ 1e-4)
    base = tmp_path / "base-bf16"
    save_pretrained(
        load_pretrained(tiny_qwen2_dir, dtype="bfloat16"), base, tokenizer=tiny_qwen2_dir
    )
    assert not (base / "generation_config.json").exists()
    config = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), dropout=0.0)
    lora = save_lora_checkpoint(tmp_path / "run", base, config, scale=0.005)
    argv = ["export", "--expert", str(base), "--lora", str(tmp_path / "run")]

    assert main([*argv, "--out", str(tmp_path / "bf16")]) == 0  # default: the base's dtype
    out, err = capsys.readouterr()
    report = json.loads((tmp_path / "bf16" / "export_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["adapter"] == "adapter"
    kept = report["update_kept"]
    assert kept["kept"] < 0.5 and kept["error"] > 0.5
    assert f"update kept {kept['kept']:.1%}" in out
    assert "warning:" in err and "--dtype float32" in err
    assert str(tmp_path / "bf16" / "adapter") in err
    keys = ("kept", "error", "norm_ratio")
    scaling = config.alpha / config.rank
    expected = expected_update_kept(base, tmp_path / "bf16", lora, scaling, ml_dtypes.bfloat16)
    matrices, overall = expected["written"]
    assert sorted(kept["matrices"]) == sorted(matrices)
    for name, want in matrices.items():
        assert [kept["matrices"][name][k] for k in keys] == pytest.approx(want, rel=1e-4)
    assert [kept[k] for k in keys] == pytest.approx(overall, rel=1e-4)
    # what was written is bfloat16(W + dW) computed independently in float64
    assert [kept[k] for k in keys] == pytest.approx(expected["predicted"][1], rel=0.02)
    assert kept["norm_ratio"] > kept["kept"]  # rounding noise inflates the norm ratio

    assert main([*argv, "--out", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    out, err = capsys.readouterr()
    kept = json.loads((tmp_path / "f32" / "export_report.json").read_text())["update_kept"]
    assert kept["kept"] == pytest.approx(1.0, abs=1e-4) and kept["error"] < 1e-3
    assert "warning" not in err
    expected = expected_update_kept(base, tmp_path / "f32", lora, scaling, np.float32)
    assert [kept[k] for k in keys] == pytest.approx(expected["predicted"][1], rel=1e-3, abs=1e-6)

    # generation_config.json, synthesized (the base has none): stops at <|im_end|>
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    generation = GenerationConfig.from_pretrained(str(tmp_path / "f32"))
    assert generation.eos_token_id == stop_ids(tokenizer, base, [2])
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation.eos_token_id
    assert generation.pad_token_id == tokenizer.pad_token_id == 0


def test_generation_config_is_copied_from_the_expert(tmp_path, tiny_qwen2_dir):
    expert = tmp_path / "expert"
    shutil.copytree(tiny_qwen2_dir, expert)
    values = {"eos_token_id": [2, 1], "pad_token_id": 0, "do_sample": True, "temperature": 0.7}
    (expert / "generation_config.json").write_text(json.dumps(values))
    save_lora_checkpoint(tmp_path / "run", expert, LoRAConfig(rank=2, dropout=0.0), scale=0.1)
    out = tmp_path / "out"
    assert main(["export", "--expert", str(expert), "--lora", str(tmp_path / "run"),
                 "--out", str(out)]) == 0  # fmt: skip
    generation = GenerationConfig.from_pretrained(str(out))
    assert {key: getattr(generation, key) for key in values} == values


def test_report_names_checkpoint_and_base_absolutely(tmp_path, tiny_qwen2_dir, monkeypatch):
    """Relative --lora and --expert: the report's paths still resolve from another folder
    (`w2s sample --amateur base` and `w2s train` read them)."""
    shutil.copytree(tiny_qwen2_dir, tmp_path / "expert")
    save_lora_checkpoint(
        tmp_path / "run", tmp_path / "expert", LoRAConfig(rank=2, dropout=0.0), scale=0.1
    )
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--expert", "expert", "--lora", "run", "--out", "out"]) == 0
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert report["expert"] == str(tmp_path / "expert")
    assert report["checkpoint"].startswith(str(tmp_path / "run" / "checkpoints") + "/")


def test_scratch_sft_run_exports_without_an_expert(tmp_path, tiny_qwen2_dir, capsys):
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
        TrainSettings(
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
    (out / "adapter").mkdir(parents=True)  # as an earlier LoRA export into the same folder left it
    (out / "adapter" / "adapter_config.json").write_text("{}")
    assert main(["export", "--lora", str(run), "--out", str(out)]) == 0
    assert "full fine-tuning checkpoint: no adapter written" in capsys.readouterr().out
    assert not (out / "adapter").exists()
    assert json.loads((out / "export_report.json").read_text())["update_kept"] is None
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    generation = GenerationConfig.from_pretrained(str(out))  # synthesized: no --expert
    assert generation.eos_token_id == stop_ids(tokenizer, tiny_qwen2_dir, [2])
    # full fine-tuning: every parameter comes from the checkpoint
    model_config = ModelConfig.from_hf_json(config_file)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(model_config, rngs=nnx.Rngs(0))))
    trained = nnx.merge(graphdef, restore_params(run, abstract))
    want = np.asarray(_forward(trained, IDS))
    np.testing.assert_allclose(hf_logits(out), want, rtol=0, atol=logits_bound(want))
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
