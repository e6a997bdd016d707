"""A GGUF checkpoint read with numpy: its metadata, the HF config it describes, and its
tensors dequantized to float32 under Hugging Face names.

The `gguf` package memory-maps the file (`GGUFReader`) and dequantizes every tensor type
in numpy (`gguf.quants.dequantize`). GGUF lists a tensor's dimensions fastest-moving
first, so the numpy array is already HF's [out, in]. llama.cpp's converter reorders the
rows of a `llama` model's q and k projections for its rotary layout: within each head
the two halves of the head dimension are interleaved (row pairs), where HF keeps the
first half before the second; `_unpermute_rotary_rows` puts them back (per attention head
for q, per key/value head for k). `qwen2` tensors are stored in HF's order.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_REQUIRED = object()
_ROWS_PER_STEP = 8192


class GGUFCheckpoint:
    """One GGUF file (memory-mapped): metadata values, HF config, float32 tensors."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        self._reader = GGUFReader(self.path)
        self.architecture = self.value("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"{self.path}: architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        self.tensors = {}
        for tensor in self._reader.tensors:
            self.tensors[self._hf_name(tensor.name)] = tensor

    def value(self, key: str, default=_REQUIRED):
        """The metadata value under `key` (a str, number, bool or list); ValueError naming
        the file when it is missing and no default is given."""
        field = self._reader.fields.get(key)
        if field is not None:
            return field.contents()
        if default is _REQUIRED:
            raise ValueError(f"{self.path}: metadata key {key!r} is missing")
        return default

    def _arch(self, key: str, default=_REQUIRED):
        return self.value(f"{self.architecture}.{key}", default)

    def _hf_name(self, name: str) -> str:
        layer = _LAYER_TENSOR.fullmatch(name)
        stem, _, kind = name.rpartition(".")
        if layer and layer[2] in _LAYER:
            return f"model.layers.{layer[1]}.{_LAYER[layer[2]]}.{layer[3]}"
        if not layer and stem in _TOP and kind in ("weight", "bias"):
            return f"{_TOP[stem]}.{kind}"
        raise ValueError(
            f"{self.path}: tensor {name!r} has no Hugging Face {self.architecture} counterpart "
            "that this import knows"
        )

    @property
    def tied(self) -> bool:
        """llama.cpp writes no output layer when it is the embedding matrix."""
        return "lm_head.weight" not in self.tensors

    def hf_config(self) -> dict:
        """config.json as transformers writes it for this file, in every field w2s_jax's
        `ModelConfig.from_hf_json` reads."""
        hidden, heads = self._arch("embedding_length"), self._arch("attention.head_count")
        head_dim = self._arch("attention.key_length", hidden // heads)
        if self._arch("rope.dimension_count", head_dim) != head_dim:
            raise ValueError(f"{self.path}: rotary embedding on part of each head is not supported")
        scaling = [
            key
            for key in self._reader.fields
            if key.startswith(f"{self.architecture}.rope.scaling")
        ]
        if scaling:
            raise ValueError(f"{self.path}: RoPE scaling ({scaling[0]}) is not supported")
        config = {
            "architectures": [ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": int(self.tensors["model.embed_tokens.weight"].shape[-1]),
            "hidden_size": hidden,
            "intermediate_size": self._arch("feed_forward_length"),
            "num_hidden_layers": self._arch("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._arch("attention.head_count_kv", heads),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self._arch("attention.layer_norm_rms_epsilon"),
            "max_position_embeddings": self._arch("context_length"),
            "rope_parameters": {"rope_type": "default", "rope_theta": self._arch("rope.freq_base")},
            "tie_word_embeddings": self.tied,
            "initializer_range": 0.02,
            "dtype": "float32",
        }
        for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
            config[f"{role}_token_id"] = self.value(f"tokenizer.ggml.{key}_token_id", None)
        if self.architecture == "llama":
            config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self.tensors
            config["mlp_bias"] = False
        else:
            config["use_sliding_window"] = False
        self._check_complete(config["num_hidden_layers"])
        return config

    def _check_complete(self, layers: int) -> None:
        """ValueError naming the file and the first missing tensors, if any are missing."""
        per_layer = [f"{module}.weight" for module in _LAYER.values()]
        if self.architecture == "qwen2":
            per_layer += [f"self_attn.{p}_proj.bias" for p in "qkv"]
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        names += [f"model.layers.{i}.{name}" for i in range(layers) for name in per_layer]
        missing = [name for name in names if name not in self.tensors]
        if missing:
            raise ValueError(
                f"{self.path}: {len(missing)} of the tensors a {layers}-layer "
                f"{self.architecture} needs are missing, e.g. {', '.join(missing[:3])}"
            )

    def specs(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """(HF name, HF shape, float32) of every tensor, in the file's order."""
        return [
            (name, tuple(int(n) for n in reversed(tensor.shape)), np.dtype(np.float32))
            for name, tensor in self.tensors.items()
        ]

    def fetch(self, name: str) -> np.ndarray:
        """The tensor `name` (an HF name) dequantized to float32 in HF's layout."""
        values = self._dequantized(self.tensors[name])
        if self.architecture == "llama" and ".self_attn.q_proj." in name:
            return _unpermute_rotary_rows(values, self._arch("attention.head_count"))
        if self.architecture == "llama" and ".self_attn.k_proj." in name:
            heads = self._arch("attention.head_count")
            return _unpermute_rotary_rows(values, self._arch("attention.head_count_kv", heads))
        return values

    def _dequantized(self, tensor) -> np.ndarray:
        """float32 values of a `gguf` ReaderTensor, dequantized a slab of rows at a time
        (blocks never span rows; numpy's temporaries stay small)."""
        from gguf.quants import dequantize

        shape = tuple(int(n) for n in reversed(tensor.shape))
        rows = tensor.data.reshape(-1, tensor.data.shape[-1])
        values = np.empty((len(rows), shape[-1]), np.float32)
        try:
            for start in range(0, len(rows), _ROWS_PER_STEP):
                step = slice(start, start + _ROWS_PER_STEP)
                values[step] = dequantize(rows[step], tensor.tensor_type)
        except NotImplementedError as exc:
            raise ValueError(
                f"{self.path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
                f"which the installed gguf package cannot dequantize ({exc})"
            ) from None
        return values.reshape(shape)


def _unpermute_rotary_rows(values: np.ndarray, heads: int) -> np.ndarray:
    """Rows (or bias entries) from llama.cpp's interleaved rotary order back to HF's:
    in each of `heads` heads, row pair j (rows 2j, 2j+1) goes to rows j and j + dim/2."""
    rows, rest = values.shape[0], values.shape[1:]
    pairs = values.reshape(heads, rows // heads // 2, 2, *rest)
    return np.ascontiguousarray(pairs.swapaxes(1, 2)).reshape(values.shape)
