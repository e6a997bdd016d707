"""Failure modes: a failed start never blocks its fix; changed data is never mixed in."""

import json
import shutil
from pathlib import Path

import pytest

from w2s_jax.cli import main
from w2s_jax.run_folder import SettingsChanged, claim


def test_claim_replaces_a_record_without_results_and_refuses_one_with(tmp_path):
    path = tmp_path / "run.json"
    assert claim(path, {"beta": 0.4}) is False
    assert claim(path, {"beta": 0.4}) is True  # the same settings resume
    with pytest.raises(SettingsChanged, match="beta: 0.4 -> 0.5"):
        claim(path, {"beta": 0.5})
    assert claim(path, {"beta": 0.5}, has_results=False) is False  # nothing to protect
    assert json.loads(path.read_text()) == {"beta": 0.5}
    assert claim(path, {"beta": 0.5}, has_results=False) is True  # same settings: resumed


def test_sample_after_a_missing_weights_file_is_fixed(tmp_path, tiny_qwen2_dir):
    broken = tmp_path / "expert"
    shutil.copytree(tiny_qwen2_dir, broken)
    (broken / "model.safetensors").unlink()
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "What is 2 + 3?"}\n{"question": "And 4 + 4?"}\n')
    argv = ["sample", "--expert", broken, "--amateur", tiny_qwen2_dir, "--data", data]
    argv = [str(a) for a in [*argv, "--out", tmp_path / "out", "--max-new-tokens", "4"]]
    with pytest.raises(SystemExit, match=r"^error: .*no \*\.safetensors"):
        main(argv)
    shutil.copy(tiny_qwen2_dir / "model.safetensors", broken / "model.safetensors")
    assert main(argv) == 0  # the manifest of the failed start does not refuse the fix
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["questions"] == 2


def test_train_after_an_unknown_lora_target_is_fixed(tmp_path, tiny_qwen2_dir):
    from test_train import write_samples

    samples = write_samples(tmp_path / "samples", tiny_qwen2_dir, n=4)
    argv = ["train", "--expert", tiny_qwen2_dir, "--samples", samples, "--out", tmp_path / "t"]
    argv = [str(a) for a in [*argv, "--steps", "1", "--batch-positions", "4", "--no-progress"]]
    with pytest.raises(SystemExit, match="attn_proj match no linear layer"):
        main([*argv, "--lora-targets", "attn_proj"])
    assert main([*argv, "--lora-targets", "q_proj,v_proj"]) == 0
    with pytest.raises(SystemExit, match=r"different settings.*lora_targets"):
        main([*argv, "--lora-targets", "q_proj"])  # now a checkpoint exists: refused


def test_sample_refuses_a_resume_on_changed_questions(tmp_path, tiny_qwen2_dir):
    data = tmp_path / "q.jsonl"
    lines = [{"id": f"q{i}", "question": f"What is {i} + {i}?"} for i in range(4)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["sample", "--expert", tiny_qwen2_dir, "--amateur", tiny_qwen2_dir, "--data", data]
    argv = [str(a) for a in [*argv, "--out", tmp_path / "out", "--max-new-tokens", "4"]]
    assert main(argv) == 0
    shards = sorted((tmp_path / "out" / "samples").glob("*.jsonl"))
    before = [p.read_bytes() for p in shards]
    lines[2]["question"] = "What is 2 + 3?"  # an edited question under an existing id
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(SystemExit, match=r"1 question\(s\) changed, first ids: q2"):
        main(argv)
    others = [{"id": f"n{i}", "question": f"What is {i} * 3?"} for i in range(6)]
    data.write_text("".join(json.dumps(line) + "\n" for line in others))  # another file
    with pytest.raises(SystemExit, match=r"4 sampled id\(s\) are no longer in the data: q0"):
        main(argv)
    assert [p.read_bytes() for p in shards] == before  # nothing mixed in
    data.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]))
    assert main([*argv, "--max-questions", "2"]) == 0  # a shorter resume is no change


def test_a_truncated_model_is_an_error_line_unless_allowed(tmp_path, tiny_qwen2_dir):
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_qwen2_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 1  # the weights hold 2 layers
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:1]
    (folder / "config.json").write_text(json.dumps(config))
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "What is 2 + 3?", "answer": "#### 5"}\n')
    argv = ["eval", "--model", folder, "--data", data, "--out", tmp_path / "e"]
    argv = [str(a) for a in [*argv, "--max-new-tokens", "4", "--no-progress"]]
    with pytest.raises(SystemExit, match=r"^error: .*not used by config.json: model\.layers\.1\."):
        main(argv)
    assert main([*argv, "--allow-unused-weights"]) == 0


def _with_nan(source, folder, key="model.layers.0.self_attn.q_proj.weight", value=float("nan")):
    """A copy of the checkpoint `source` with `value` at [0, 0] of tensor `key` (all of
    it, for a 1-d tensor)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors[key] = tensors[key].copy()
    if tensors[key].ndim == 1:
        tensors[key][:] = value
    else:
        tensors[key][0, 0] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("role", ["expert", "amateur"])
def test_nan_weights_stop_sampling_before_anything_is_written(role, tmp_path, tiny_qwen2_dir):
    broken = _with_nan(tiny_qwen2_dir, tmp_path / "nan_model")
    models = {"expert": tiny_qwen2_dir, "amateur": tiny_qwen2_dir, role: broken}
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "What is 2 + 3?"}\n')
    argv = ["sample", "--expert", models["expert"], "--amateur", models["amateur"]]
    argv = [str(a) for a in [*argv, "--data", data, "--out", tmp_path / "out"]]
    with pytest.raises(SystemExit, match=r"nan_model: non-finite .* model\.layers\.0\.self_attn"):
        main(argv)
    assert not list((tmp_path / "out").glob("samples/*.jsonl"))


def test_nan_weights_stop_eval(tmp_path, tiny_qwen2_dir):
    broken = _with_nan(tiny_qwen2_dir, tmp_path / "nan_model")
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "What is 2 + 3?", "answer": "#### 5"}\n')
    argv = ["eval", "--model", broken, "--data", data, "--out", tmp_path / "e", "--no-progress"]
    with pytest.raises(SystemExit, match=r"^error: .*non-finite values \(NaN or inf\) in model"):
        main([str(a) for a in argv])
    assert not (tmp_path / "e" / "summary.json").exists()


def test_logits_that_overflow_at_run_time_stop_eval(tmp_path, tiny_qwen2_dir):
    # every weight is finite, so the load-time check passes; the final norm's scale makes
    # the logits overflow float32 while decoding
    broken = _with_nan(tiny_qwen2_dir, tmp_path / "hot_model", "model.norm.weight", 3e38)
    data = tmp_path / "q.jsonl"
    data.write_text('{"id": "q7", "question": "What is 2 + 3?", "answer": "#### 5"}\n')
    argv = ["eval", "--model", broken, "--data", data, "--out", tmp_path / "e", "--no-progress"]
    with pytest.raises(SystemExit, match=r"^error: question 'q7': .*hot_model's logits are not"):
        main([str(a) for a in argv])
    assert not list((tmp_path / "e").glob("shards/*.jsonl"))
    assert not (tmp_path / "e" / "summary.json").exists()


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(
    tmp_path, tiny_qwen2_dir, monkeypatch
):
    """From step 3 on the step returns NaN weights and loss (as a diverging run does)."""
    import jax
    import jax.numpy as jnp
    from test_train import write_samples

    import w2s_jax.train as train_module
    from w2s_jax.lora import load_lora_into
    from w2s_jax.models import load_pretrained

    real_compile = train_module.compile_step

    def compile_diverging(*args, **kwargs):
        step_fn, state, rest, schedule = real_compile(*args, **kwargs)
        calls = []

        def step(state, rest, batch, key):
            calls.append(1)
            state, metrics = step_fn(state, rest, batch, key)
            if len(calls) >= 3:
                state = jax.tree.map(lambda x: x * jnp.nan if x.dtype == jnp.float32 else x, state)
                metrics = {**metrics, "loss": jnp.float32(jnp.nan)}
            return state, metrics

        return step, state, rest, schedule

    monkeypatch.setattr(train_module, "compile_step", compile_diverging)
    samples = write_samples(tmp_path / "samples", tiny_qwen2_dir, n=4)
    argv = ["train", "--expert", tiny_qwen2_dir, "--samples", samples, "--out", tmp_path / "t"]
    argv += ["--steps", "6", "--batch-positions", "4", "--save-every", "1", "--no-progress"]
    with pytest.raises(SystemExit, match=r"^error: step 3: non-finite loss=nan; .* \(step 2\)"):
        main([str(a) for a in argv])
    checkpoints = tmp_path / "t" / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [1, 2]
    load_lora_into(load_pretrained(tiny_qwen2_dir), tmp_path / "t")  # finite, or it raises


def _unprivileged(argv, cwd):
    """Run `w2s ARGV` in `cwd` as a user that cannot write where the files say it cannot
    (root ignores file modes, so as root it runs as nobody); None if that is impossible."""
    import os
    import subprocess
    import sys

    command = [str(Path(sys.executable).parent / "w2s"), *map(str, argv)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            return None
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    env = {**os.environ, "HOME": str(cwd), "W2S_JAX_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def readable_runs(tmp_path_factory):
    """A world-readable folder holding questions, a sample run and a train run of the toy
    models, and a read-only folder `ro` (pytest's own temp folders are private)."""
    import os
    import tempfile

    from w2s_jax.demo_worlds import ASSETS

    root = Path(tempfile.mkdtemp(prefix="w2s_ro_"))
    data = root / "q.jsonl"
    data.write_text('{"id": "q1", "question": "What is 2 + 3?", "answer": "#### 5"}\n')
    expert, amateur = ASSETS / "expert", ASSETS / "amateur"
    assert main(["sample", "--expert", str(expert), "--amateur", str(amateur), "--data", str(data),
                 "--out", str(root / "samples"), "--max-new-tokens", "8"]) == 0  # fmt: skip
    assert main(["train", "--expert", str(expert), "--samples", str(root / "samples"),
                 "--out", str(root / "train"), "--steps", "1", "--no-progress"]) == 0  # fmt: skip
    (root / "ro").mkdir()
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    (root / "ro").chmod(0o555)
    yield {"root": root, "data": data, "expert": expert, "amateur": amateur}
    os.chmod(root / "ro", 0o755)
    shutil.rmtree(root, ignore_errors=True)


READ_ONLY_COMMANDS = {
    "sample": ["sample", "--expert", "{expert}", "--amateur", "{amateur}", "--data", "{data}"],
    "train": ["train", "--expert", "{expert}", "--samples", "{root}/samples", "--steps", "1"],
    "export": ["export", "--expert", "{expert}", "--lora", "{root}/train"],
    "eval": ["eval", "--model", "{expert}", "--data", "{data}", "--max-new-tokens", "8"],
    "demo": ["demo"],
}


@pytest.mark.parametrize("command", sorted(READ_ONLY_COMMANDS))
def test_a_read_only_out_gives_one_error_line(command, readable_runs):
    argv = [a.format(**readable_runs) for a in READ_ONLY_COMMANDS[command]]
    result = _unprivileged([*argv, "--out", "ro/run"], readable_runs["root"])
    if result is None:
        pytest.skip("running as root without setpriv: file modes cannot be tested")
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr  # no traceback
    assert result.stderr.startswith(
        ("error: ro/run: Permission denied", "error: cannot write ro/run/")
    )
    assert not (readable_runs["root"] / "ro" / "run").exists()
