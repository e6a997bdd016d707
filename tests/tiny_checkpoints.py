"""Tiny Hugging Face checkpoints and tokenizers, made offline for tests.

Everything here is built from scratch with `tokenizers`, `transformers` and
`torch` (random weights, fixed seeds), so tests never download anything.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS_WORDS = (
    "question answer step reason think add subtract multiply divide total each more less "
    "apples oranges books pens coins boxes students tickets price cost sum difference "
    "the a of and is are has have how many much what if then so therefore final"
).split()


def _training_corpus(lines: int = 400) -> list[str]:
    import random

    rng = random.Random(0)
    corpus = []
    for _ in range(lines):
        words = [rng.choice(_CORPUS_WORDS) for _ in range(rng.randint(4, 14))]
        numbers = [str(rng.randint(0, 9999)) for _ in range(rng.randint(1, 3))]
        corpus.append(" ".join(words + numbers) + ". The answer is \\boxed{" + numbers[0] + "}.")
    return corpus


def make_tiny_tokenizer(folder: str | Path, *, vocab_size: int = 300):
    """Train a byte-level BPE tokenizer with a chat template; save it as a HF folder.

    Returns the loaded `PreTrainedTokenizerFast`. Ids of the special tokens are
    0, 1, 2 (<|endoftext|>, <|im_start|>, <|im_end|>).
    """
    from transformers import AutoTokenizer

    from w2s_jax.data.toy_tokenizer import save_tokenizer, train_tokenizer

    tokenizer = train_tokenizer(
        _training_corpus(),
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        split_digits=False,
    )
    save_tokenizer(
        tokenizer,
        folder,
        special_tokens=SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    return AutoTokenizer.from_pretrained(str(folder))


def make_tiny_model(
    folder: str | Path,
    *,
    family: str = "qwen2",
    tokenizer_folder: str | Path | None = None,
    vocab_size: int = 320,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = True,
    attention_bias: bool | None = None,
    rope_parameters: dict | None = None,
    initializer_range: float = 0.02,
    seed: int = 0,
):
    """Save a tiny random `family` ("qwen2" or "llama") causal LM to `folder`.

    `vocab_size` may exceed the tokenizer's size (padded logit rows, as in Qwen).
    A larger `initializer_range` gives peakier, more distinct next-token
    distributions. The tokenizer of `tokenizer_folder`, if given, is copied in.
    Returns the PyTorch model in eval mode (float32).
    """
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        max_position_embeddings=512,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )
    if rope_parameters is not None:
        common["rope_parameters"] = rope_parameters
    if family == "qwen2":
        config, model_cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif family == "llama":
        config = LlamaConfig(**common, attention_bias=bool(attention_bias), mlp_bias=False)
        model_cls = LlamaForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if family == "qwen2" and attention_bias is not False:
        # HF initialises q/k/v biases to zero; random biases make the test meaningful.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0.0, 0.5)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(str(folder))
    if tokenizer_folder is not None:
        AutoTokenizer.from_pretrained(str(tokenizer_folder)).save_pretrained(str(folder))
    return model


def make_tiny_qwen3(folder: str | Path, *, seed: int = 0):
    """Save a tiny random Qwen3 (q/k RMSNorm, explicit head_dim, untied) to `folder`.

    Returns the PyTorch model in eval mode (float32).
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        tie_word_embeddings=False,
        initializer_range=0.2,
        max_position_embeddings=512,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(str(folder))
    return model


def random_sample_records(n=8, per_trajectory=4, seed=0, *, max_k=4, vocab=300) -> list[dict]:
    """`n` sample records with random ids and `per_trajectory` sparse targets each."""
    import random

    rng = random.Random(seed)
    records = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 8))]
        completion = [rng.randrange(3, vocab) for _ in range(rng.randint(per_trajectory, 20))]
        positions = sorted(rng.sample(range(len(completion)), per_trajectory))
        ids, weights = [], []
        for _ in positions:
            k = rng.randint(1, max_k)
            w = sorted((rng.random() + 0.05 for _ in range(k)), reverse=True)
            ids.append(rng.sample(range(3, vocab), k))
            weights.append([x / sum(w) for x in w])
        records.append(
            dict(
                id=f"q{i}",
                prompt_ids=prompt,
                completion_ids=completion,
                kl=[1.0] * len(completion),
                positions=positions,
                target_ids=ids,
                target_weights=weights,
            )
        )
    return records
