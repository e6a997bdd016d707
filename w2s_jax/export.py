"""The export stage: a `w2s train` checkpoint as a Hugging Face folder and a PEFT adapter.

`export` folds LoRA adapters into the base model and writes OUT: config.json,
safetensors in the chosen dtype, the tokenizer, generation_config.json, the
adapters in PEFT's format in OUT/adapter/ (float32, loadable with
`peft.PeftModel.from_pretrained(base, OUT/adapter)`), and OUT/export_report.json.

Update kept. Casting W + ΔW to bfloat16 can round a small update away. For each
adapted matrix, with W the base kernel in the written dtype (the stored weights,
cast once; unchanged when that is their own dtype) and ΔW = scaling * A @ B in
float32, the written weights carry the realised update R = cast(W + ΔW) - W.
The report gives, per matrix and pooled over all of them (null for a zero update):
  kept = <R, ΔW> / ||ΔW||²_F: the share of ΔW that survives (1 exact, 0 all lost);
  error = ||R - ΔW||_F / ||ΔW||_F: how far the written update is from ΔW (0 exact);
  norm_ratio = ||R||_F / ||ΔW||_F. Rounding adds noise of its own, so this one
  overstates what survives (an update at ~1/10 of the rounding step: norm_ratio
  ~0.6, kept ~0.3, error ~0.9); `kept` is the figure warned on.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np

from w2s_jax.files import atomic_write_bytes, atomic_write_json
from w2s_jax.settings import DTYPES, allow_unused_weights_setting, check, setting

ADAPTER_DIR = "adapter"
REPORT_FILE = "export_report.json"
GENERATION_CONFIG = "generation_config.json"
KEPT_WARNING = 0.5  # below this overall share the merged weights are not the trained model
_DEFINITION = (
    "W: base kernel in the written dtype; dW = scaling * A @ B (float32); R = cast(W + dW) - W; "
    "kept = <R, dW> / ||dW||^2; error = ||R - dW|| / ||dW||; norm_ratio = ||R|| / ||dW|| "
    "(Frobenius norms; 'overall' pools the sums over matrices)"
)


@dataclasses.dataclass(frozen=True)
class UpdateKept:
    """How much of the LoRA update the written weights carry (see the module doc).

    matrices: HF weight name -> {"kept", "error", "norm_ratio", "update_norm", "weight_norm"}.
    """

    kept: float | None
    error: float | None
    norm_ratio: float | None
    matrices: dict[str, dict[str, float | None]]


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export` wrote: checkpoint used ("DIR/STEP"), folder, weight dtype, adapter
    folder (None for full fine-tuning), update report (None for full fine-tuning) and
    where generation_config.json came from."""

    checkpoint: str
    out: Path
    dtype: str
    adapter: Path | None
    update: UpdateKept | None
    generation_config: str

    @property
    def update_lost(self) -> bool:
        """True when the merged weights keep less than `KEPT_WARNING` of the update."""
        kept = self.update.kept if self.update else None
        return kept is not None and kept < KEPT_WARNING


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """What to export: a `w2s train` checkpoint, its base model, where and in which dtype."""

    lora: str | None = setting(
        None, "A `w2s train` output or checkpoint folder.", metavar="CKPT", required=True
    )
    out: str | None = setting(None, "Folder for the merged HF model.", metavar="DIR", required=True)
    expert: str | None = setting(
        None, "The base HF model folder the adapters were trained on.", metavar="DIR"
    )
    step: int | None = setting(None, "Checkpoint step (default: the latest).", parse=int)
    dtype: str | None = setting(
        None,
        "Merged weights' dtype: float32, bfloat16 or float16 (default: the base model's).",
        choices=DTYPES,
    )
    tokenizer: str | None = setting(
        None, "Tokenizer to copy (default: the one training used).", metavar="DIR"
    )
    force: bool = setting(
        False, "Merge the adapters even into a base other than the one they were trained on."
    )
    allow_unused_weights: bool = allow_unused_weights_setting()

    def __post_init__(self):
        check(self)


def export(settings: ExportSettings) -> ExportResult:
    """Merge checkpoint `settings.lora` into `settings.expert` (or a fresh model for
    random-init runs); save to `settings.out`.

    Adapters are folded in float32; weights are written in `settings.dtype` (default:
    the base model's). LoRA checkpoints also get OUT/adapter/ (PEFT) and an update-kept
    report; full fine-tuning checkpoints (rank 0) get neither.
    """
    from flax import nnx

    from w2s_jax.checkpointing import locate_checkpoint, read_meta
    from w2s_jax.lora import LoRAConfig, check_adapter_base, load_lora_into, merge_lora
    from w2s_jax.models import (
        ModelConfig,
        init_random,
        load_pretrained,
        load_tokenizer,
        save_pretrained,
    )

    expert, lora, out, dtype = settings.expert, settings.lora, settings.out, settings.dtype
    directory, step = locate_checkpoint(lora, settings.step)
    directory = directory.absolute()  # the report names it for readers in any folder
    meta = read_meta(directory, step=step)
    lora_config = LoRAConfig.from_dict(meta["lora"])
    config = lambda: ModelConfig.from_hf_json(meta["model_config"])
    if expert is None and lora_config.rank == 0:  # every parameter is in the checkpoint
        model = nnx.eval_shape(lambda: init_random(config(), seed=0, dtype=dtype))
    elif expert is not None:
        check_adapter_base(f"{directory}/{step}", expert, force=settings.force)
        model = load_pretrained(  # per-layer modules: the report and PEFT files are per layer
            expert, dtype=dtype, allow_unused=settings.allow_unused_weights, layer_stack="loop"
        )
    elif meta.get("init") == "random":  # LoRA on a scratch model: rebuild its seeded base
        model = init_random(config(), seed=meta.get("seed", 0), dtype=dtype)
    else:
        raise ValueError(f"{lora} holds LoRA adapters: --expert (their base model) is required")
    load_lora_into(model, directory, step=step)
    adapters = _adapters(model)
    update = _update_kept(adapters) if adapters else None
    tensors = _peft_tensors(adapters)
    merge_lora(model)

    out = Path(out)
    tokenizer_source = settings.tokenizer or meta.get("tokenizer") or expert
    loaded = load_tokenizer(tokenizer_source) if tokenizer_source else None
    save_pretrained(model, out, tokenizer=loaded)
    generation = _write_generation_config(out, expert, tokenizer_source, loaded, model.config)
    adapter = out / ADAPTER_DIR
    if tensors:
        _write_peft_adapter(adapter, tensors, lora_config, expert)
    else:
        if (adapter / "adapter_config.json").is_file():  # from an earlier LoRA export here
            shutil.rmtree(adapter)
        adapter = None
    result = ExportResult(
        f"{directory}/{step}", out, model.config.dtype, adapter, update, generation
    )
    atomic_write_json(
        out / REPORT_FILE,
        {
            "checkpoint": result.checkpoint,
            "expert": None if expert is None else str(Path(expert).absolute()),
            "dtype": result.dtype,
            "adapter": None if adapter is None else ADAPTER_DIR,
            "generation_config": generation,
            "update_kept": None
            if update is None
            else {"definition": _DEFINITION, **dataclasses.asdict(update)},
        },
    )
    return result


def _adapters(model) -> list[tuple[str, object]]:
    """(HF module name, ScaledLoRA) of every adapter, named after its kernel's HF weight."""
    from flax import nnx

    from w2s_jax.lora import ScaledLoRA
    from w2s_jax.models.weight_map import path_to_hf

    found = []
    for path, module in nnx.iter_modules(model):
        if isinstance(module, ScaledLoRA):
            name, _ = path_to_hf("/".join(map(str, path)) + "/kernel")
            found.append((name.removesuffix(".weight"), module))
    return found


def _measures(sums: np.ndarray) -> dict[str, float | None]:
    """kept, error, norm_ratio from [<dW,dW>, <R,dW>, <R,R>, <R-dW,R-dW>] (None if dW = 0)."""
    update, along, realised, difference = (float(x) for x in sums)
    if update == 0:
        return {"kept": None, "error": None, "norm_ratio": None}
    return {
        "kept": along / update,
        "error": math.sqrt(difference / update),
        "norm_ratio": math.sqrt(realised / update),
    }


def _update_kept(adapters) -> UpdateKept:
    """The update-kept report of the adapters, one matrix at a time (before merging)."""
    import jax.numpy as jnp

    matrices, totals = {}, np.zeros(4)
    for name, module in adapters:
        kernel = module.base_module.kernel[...].astype(jnp.float32)
        delta = module.delta_kernel()
        realised = module.merged_kernel().astype(jnp.float32) - kernel
        sums = np.array(
            [jnp.vdot(x, y) for x, y in ((delta, delta), (realised, delta), (realised, realised))]
            + [jnp.sum((realised - delta) ** 2)],
            np.float64,
        )
        totals += sums
        matrices[f"{name}.weight"] = {
            **_measures(sums),
            "update_norm": math.sqrt(sums[0]),
            "weight_norm": float(jnp.linalg.norm(kernel)),
        }
    return UpdateKept(**_measures(totals), matrices=matrices)


def _peft_tensors(adapters) -> dict[str, np.ndarray]:
    """PEFT's adapter tensors: lora_A.weight [r, in] and lora_B.weight [out, r], float32."""
    tensors = {}
    for name, module in adapters:
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = np.asarray(module.lora_a[...], np.float32).T
        tensors[f"{prefix}.lora_B.weight"] = np.asarray(module.lora_b[...], np.float32).T
    return tensors


def _write_peft_adapter(folder: Path, tensors: dict[str, np.ndarray], config, expert) -> None:
    """adapter_model.safetensors + adapter_config.json, as `peft` saves a LoRA adapter."""
    from w2s_jax.models.safetensors_io import write_safetensors

    specs = [(key, value.shape, np.dtype(np.float32)) for key, value in tensors.items()]
    write_safetensors(folder / "adapter_model.safetensors", specs, tensors.__getitem__)
    modules = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in tensors}
    atomic_write_json(
        folder / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": None if expert is None else str(expert),
            "r": config.rank,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "target_modules": sorted(modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "use_dora": False,
            "inference_mode": True,
        },
    )


def _write_generation_config(out: Path, expert, tokenizer_source, tokenizer, config) -> str:
    """Copy the expert's generation_config.json, else write one that stops at the model's
    end tokens. Returns where it came from.

    The written one has eos_token_id = `prompts.stop_ids` (e.g. <|im_end|> for a chat
    model; the config's alone without a tokenizer) and the tokenizer's bos/pad ids.
    """
    target = out / GENERATION_CONFIG
    if expert is not None and (Path(expert) / GENERATION_CONFIG).is_file():
        atomic_write_bytes(target, (Path(expert) / GENERATION_CONFIG).read_bytes())
        return f"copied from {expert}"
    values = {"eos_token_id": list(config.eos_token_ids)}
    if tokenizer is not None:
        from w2s_jax.prompts import stop_ids

        base = expert or tokenizer_source
        values["eos_token_id"] = stop_ids(tokenizer, base, config.eos_token_ids)
        values["bos_token_id"] = tokenizer.bos_token_id
        values["pad_token_id"] = tokenizer.pad_token_id
    atomic_write_json(
        target, {key: value for key, value in values.items() if value not in (None, [])}
    )
    return "written"
