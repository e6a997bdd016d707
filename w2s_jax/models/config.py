"""Model configuration read from (and written back to) a Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from w2s_jax.settings import DTYPES

# model_type -> HF architecture class name written on export.
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")
# How attention is computed (a run-time choice, never read from or written to config.json):
# see w2s_jax.models.attention.
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "splash")
# How the decoder layers run (run-time choices too): a Python loop over per-layer modules
# or one scan over stacked layer parameters; and which activations each layer recomputes
# in the backward pass (jax.checkpoint policies; "none": keep them all).
LAYER_STACKS = ("auto", "loop", "scan")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")

# HF keys interpreted by `from_hf_json`; every other key is kept in `extra` and written back.
_CONSUMED_KEYS = {
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "dtype",
    "torch_dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "transformers_version",
    "_name_or_path",
}


class ConfigError(ValueError):
    """A config.json this project cannot run; the message names the file and field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only LM hyper-parameters shared by Qwen2/Qwen2.5, Llama 3 and Qwen3.

    Frozen and hashable (it is static metadata of the NNX module). `dtype` is the
    compute dtype, `param_dtype` the storage dtype of the parameters (default: `dtype`).
    `attention`, `layer_stack`, `remat` and `param_dtype` are run-time choices: they are
    never read from or written to config.json. `extra` keeps the HF keys this project does not
    interpret (JSON-encoded) so that an export writes them back unchanged.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    dtype: str = "float32"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    extra: tuple[tuple[str, str], ...] = ()
    attention: str = "auto"
    layer_stack: str = "auto"
    remat: str = "none"
    param_dtype: str | None = None

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.rope_type!r} is not supported "
                f"(supported: {', '.join(ROPE_TYPES)})"
            )
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(
                f"attention {self.attention!r} is not supported "
                f"(supported: {', '.join(ATTENTION_IMPLS)})"
            )
        for name, allowed in (("layer_stack", LAYER_STACKS), ("remat", REMAT_POLICIES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name} {getattr(self, name)!r} is not supported "
                    f"(supported: {', '.join(allowed)})"
                )
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ConfigError(f"{name} {value!r} is not supported (supported: {DTYPES})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def weights_dtype(self) -> str:
        """The dtype parameters are stored in (`param_dtype`, by default the compute dtype)."""
        return self.param_dtype or self.dtype

    @property
    def num_params(self) -> int:
        """Number of parameters (embedding counted once when tied)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * (q + 2 * kv) + q * d
        attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias + 2 * hd * self.qk_norm
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_hidden_layers * layer + d + head

    @classmethod
    def from_hf_json(cls, path_or_dict: str | Path | dict) -> ModelConfig:
        """Read a HF config (a dict, a config.json path, or a model folder).

        Understands transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x
        (`rope_parameters`) layouts. Unsupported architectures or features raise
        `ConfigError` naming the file and field.
        """
        if isinstance(path_or_dict, dict):
            raw, where = path_or_dict, "config"
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file (expected a HF config.json)")
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc.msg})") from exc
            where = str(path)
        try:
            return _parse(raw, where)
        except KeyError as exc:
            raise ConfigError(f"{where}: required field {exc.args[0]!r} is missing") from exc

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers 5 `config.json` dict for this config."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope["low_freq_factor"] = self.rope_low_freq_factor
            rope["high_freq_factor"] = self.rope_high_freq_factor
            rope["original_max_position_embeddings"] = self.rope_original_max_position_embeddings
        eos: int | list[int] | None = list(self.eos_token_ids) or None
        if eos is not None and len(eos) == 1:
            eos = eos[0]
        out = {key: json.loads(value) for key, value in self.extra}
        out.update(
            architectures=[ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            dtype=self.dtype,
            bos_token_id=self.bos_token_id,
            eos_token_id=eos,
            pad_token_id=self.pad_token_id,
        )
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
        return out


def _parse(raw: dict, where: str) -> ModelConfig:
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    for arch in raw.get("architectures") or []:
        if not arch.endswith("ForCausalLM"):
            raise ConfigError(
                f"{where}: architectures {arch!r} is not a causal LM (expected *ForCausalLM)"
            )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (only 'silu')")
    _check_full_attention(raw, where)

    num_heads = raw["num_attention_heads"]
    kw: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        initializer_range=raw.get("initializer_range", 0.02),
        bos_token_id=raw.get("bos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
    )
    eos = raw.get("eos_token_id")
    kw["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ConfigError(f"{where}: dtype {dtype!r} is not supported (supported: {DTYPES})")
    kw["dtype"] = dtype
    if model_type == "qwen2":
        kw.update(qkv_bias=True)
    else:
        bias = bool(raw.get("attention_bias", False))
        kw.update(qkv_bias=bias, o_bias=bias, qk_norm=model_type == "qwen3")
        mlp_bias = bool(raw.get("mlp_bias", False))
        if mlp_bias and model_type != "llama":
            raise ConfigError(f"{where}: mlp_bias=true is only supported for llama")
        kw["mlp_bias"] = mlp_bias
    kw.update(_parse_rope(raw, where))
    kw["extra"] = tuple(
        sorted((k, json.dumps(v)) for k, v in raw.items() if k not in _CONSUMED_KEYS)
    )
    return ModelConfig(**kw)


def _check_full_attention(raw: dict, where: str) -> None:
    """Refuse sliding-window layers (not implemented), as HF would derive them."""
    layer_types = raw.get("layer_types")
    if layer_types is None and raw.get("use_sliding_window") and raw.get("sliding_window"):
        first = raw.get("max_window_layers", 0)
        layer_types = [
            "sliding_attention" if i >= first else "full_attention"
            for i in range(raw.get("num_hidden_layers", 0))
        ]
    bad = [i for i, t in enumerate(layer_types or []) if t != "full_attention"]
    if bad:
        raise ConfigError(
            f"{where}: sliding-window attention (use_sliding_window/layer_types, layers {bad[:4]}) "
            "is not supported"
        )


def _parse_rope(raw: dict, where: str) -> dict[str, Any]:
    """RoPE fields from 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`."""
    params = raw.get("rope_parameters")
    if params is None:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    field = "rope_parameters" if "rope_parameters" in raw else "rope_scaling"
    if not isinstance(params, dict) or "rope_theta" not in params and "rope_type" not in params:
        raise ConfigError(f"{where}: {field} must be a mapping with rope_theta/rope_type")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{where}: {field}.rope_type {rope_type!r} is not supported "
            f"(supported: {', '.join(ROPE_TYPES)})"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{where}: {field}.partial_rotary_factor != 1 is not supported")
    out: dict[str, Any] = {
        "rope_type": rope_type,
        "rope_theta": float(params.get("rope_theta", raw.get("rope_theta", 10000.0))),
    }
    try:
        if rope_type in ("linear", "llama3"):
            out["rope_factor"] = float(params["factor"])
        if rope_type == "llama3":
            out["rope_low_freq_factor"] = float(params["low_freq_factor"])
            out["rope_high_freq_factor"] = float(params["high_freq_factor"])
            out["rope_original_max_position_embeddings"] = int(
                params["original_max_position_embeddings"]
            )
    except KeyError as exc:
        raise ConfigError(
            f"{where}: {field} of type {rope_type!r} needs field {exc.args[0]!r}"
        ) from exc
    return out
