"""Stage settings declared once: default, check, help text and resume rule per field.

Every stage takes one frozen dataclass whose fields are made with `setting(...)`.
From that one declaration come the command's flags (`add_arguments`, hence the
`--config` keys), the settings object built from parsed flags (`from_namespace`),
the range checks with errors naming the flag and the value (`check`), and the
record a run folder keeps (`record`; fields marked `free` may change on resume).
No JAX import here, so `w2s --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

Check = Callable[[Any], str | None]  # value -> what is wrong with it, or None

DTYPES = ("float32", "bfloat16", "float16")  # parameter/compute dtypes the models support
AUTO_DTYPE = "auto"  # bfloat16 on GPU/TPU, float32 on CPU (w2s_jax.models.dtypes)


def setting(
    default: Any,
    help: str,  # noqa: A002 (argparse's name)
    *,
    flags: Sequence[str] = (),
    check: Check | None = None,
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
    free: bool = False,
    parse: Callable[[str], Any] | None = None,
    repeat: bool = False,
    many: bool = False,
    metavar: str | None = None,
    required: bool = False,
) -> Any:
    """A settings field.

    flags: the flag names (default `--field-name`); a bool field whose default is True
    is switched off by its flag (e.g. `--no-select`). check: returns an error text for a
    bad value. choices: allowed values (checked too), or a function returning them, called
    when a value is checked (lists that live beside the model, whose package imports JAX).
    free: may change when a run resumes (batch size, progress bars, ...). parse: str ->
    value for flags (default: from the default's type; tuples are comma-separated).
    repeat: the flag may be given several times, each value appended. many: the flag
    takes one or more values (nargs="+"). required: must be given (as a flag or in
    --config; checked by `check`, not by argparse, so a config file can supply it).
    """
    metadata = {
        "help": help,
        "flags": tuple(flags),
        "check": check,
        "choices": choices if choices is None or callable(choices) else tuple(choices),
        "free": free,
        "parse": parse,
        "repeat": repeat,
        "many": many,
        "metavar": metavar,
        "required": required,
    }
    return dataclasses.field(default=default, metadata=metadata)


# --- fields several stages declare ------------------------------------------------


def compute_dtype_setting(note: str = "") -> Any:
    """`--dtype`: the compute dtype, `auto` by default (w2s_jax.models.dtypes)."""
    return setting(
        AUTO_DTYPE,
        "Compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), "
        f"{', '.join(DTYPES[:-1])} or {DTYPES[-1]}.{note}",
        choices=(AUTO_DTYPE, *DTYPES),
    )


def param_dtype_setting(default_note: str = "the compute dtype") -> Any:
    """`--param-dtype`: the parameters' storage dtype (models.dtypes.resolve_param_dtype)."""
    return setting(
        None,
        "Dtype the parameters are stored in (they compute in --dtype): "
        f"{', '.join(DTYPES)} (default: {default_note}).",
        choices=DTYPES,
        parse=str,
    )


def _model_choices(name: str) -> Callable[[], tuple]:
    """The allowed values `w2s_jax.models.config.<name>`, read when a value is checked."""

    def choices() -> tuple:
        from w2s_jax.models import config

        return tuple(getattr(config, name))

    return choices


def attention_setting() -> Any:
    """`--attention`: how attention is computed (ModelConfig.ATTENTION_IMPLS); free on resume."""
    return setting(
        "auto",
        "Attention implementation, one of w2s_jax.models.config.ATTENTION_IMPLS: auto (the "
        "platform's fused kernel where it applies) or another listed there. Equal results "
        "within rounding, so a resumed run may change it.",
        choices=_model_choices("ATTENTION_IMPLS"),
        free=True,
    )


def layer_stack_setting() -> Any:
    """`--layer-stack`: a loop over the decoder layers or one scan (ModelConfig.LAYER_STACKS)."""
    return setting(
        "auto",
        "How the decoder layers run, one of w2s_jax.models.config.LAYER_STACKS: loop (a Python "
        "loop, one compiled copy per layer), scan (one scan over stacked layers, faster "
        "compiles) or auto (the backend's default). Same results; a resumed run may change it.",
        choices=_model_choices("LAYER_STACKS"),
        free=True,
    )


def remat_setting(default: str | None = "none", shown_default: str = "") -> Any:
    """`--remat`: what each decoder layer recomputes in the backward pass (REMAT_POLICIES);
    `default` None lets a preset fill it (`shown_default` says which)."""
    return setting(
        default,
        "Activations each decoder layer recomputes in the backward pass (jax.checkpoint "
        "policy), one of w2s_jax.models.config.REMAT_POLICIES: none keeps them all, full "
        "recomputes everything. Less memory, same results; a resumed run may change it"
        + (f" (default: {shown_default})." if shown_default else "."),
        choices=_model_choices("REMAT_POLICIES"),
        free=True,
    )


# The run-time model choices a stage's settings may carry (fields named as ModelConfig's).
MODEL_CHOICES = ("attention", "layer_stack", "remat")


def model_options(settings, *, master_weights: bool = False) -> dict:
    """`load_pretrained` keyword arguments from a stage's settings: the compute dtype and the
    parameters' storage dtype, resolved (`master_weights`: every parameter trains, see
    w2s_jax.models.dtypes), and the `MODEL_CHOICES` it declares."""
    from w2s_jax.models.dtypes import default_param_dtype, resolve_dtype

    dtype = resolve_dtype(settings.dtype)
    param_dtype = getattr(settings, "param_dtype", None)
    if param_dtype is None:
        param_dtype = default_param_dtype(dtype, master_weights=master_weights)
    options = {"dtype": dtype, "param_dtype": param_dtype}
    return options | {k: getattr(settings, k) for k in MODEL_CHOICES if hasattr(settings, k)}


def stop_ids_setting(what: str) -> Any:
    """`--eos-id ID` (repeatable): stop ids the user adds to the tokenizer's own."""
    return setting(
        (),
        f"Another token id that ends {what} (repeatable), beside the tokenizer's special "
        "end tokens and the configs' eos_token_id.",
        flags=("--eos-id",),
        parse=int,
        repeat=True,
        metavar="ID",
    )


def allow_unused_weights_setting() -> Any:
    """`--allow-unused-weights`: accept checkpoint tensors the config does not use."""
    return setting(
        False,
        "Load checkpoints that hold tensors the config does not use (otherwise an error "
        "naming them).",
    )


# --- checks ---------------------------------------------------------------------------


def at_least(low: int | float) -> Check:
    """An integer (no bool) >= `low`, or None where the default is None."""

    def check(value):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            return f"must be an integer >= {low}"
        return None

    return check


def number_in(low: float, high: float, *, open_low: bool = False) -> Check:
    """A finite number in [low, high] (or (low, high] with `open_low`)."""

    def check(value):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value) and value <= high
        ok = ok and (value > low if open_low else value >= low)
        if not ok and math.isinf(high):
            return f"must be a finite number {'>' if open_low else '>='} {low}"
        if not ok:
            return f"must lie in {'(' if open_low else '['}{low}, {high}]"
        return None

    return check


def comma_list(text: str | Sequence[str]) -> tuple[str, ...]:
    """ "q_proj, v_proj" (or a list) -> ("q_proj", "v_proj")."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(str(item).strip() for item in items if str(item).strip())


# --- declaration -> flags, settings, record ----------------------------------------


def flag_names(field: dataclasses.Field) -> tuple[str, ...]:
    """The flags of a field: declared ones, else `--field-name`."""
    return field.metadata.get("flags") or ("--" + field.name.replace("_", "-"),)


def _parser_of(field: dataclasses.Field) -> Callable[[str], Any] | None:
    meta = field.metadata
    if meta.get("parse"):
        return meta["parse"]
    default = field.default
    if isinstance(default, tuple):
        return comma_list
    if isinstance(default, bool) or default is None:
        return None
    return type(default)


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip: Sequence[str] = ()) -> None:
    """Add one flag per field of settings class `cls` (defaults shown in --help)."""
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        meta, default = field.metadata, field.default
        help_text = meta.get("help") or ""
        if default not in (None, False, True, ()) and "%(default)" not in help_text:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text += f" (default: {shown})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": field.name, "help": help_text}
        if isinstance(default, bool):
            kwargs["action"] = "store_false" if default else "store_true"
        else:
            parse = _parser_of(field)
            if parse is not None:
                kwargs["type"] = parse
            if meta.get("repeat"):
                kwargs["action"] = "append"
            if meta.get("many"):
                kwargs["nargs"] = "+"
                kwargs["type"] = meta.get("parse") or str
            choices = meta.get("choices")
            if choices is not None and not callable(choices) and not isinstance(default, tuple):
                kwargs["choices"] = choices
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        kwargs["default"] = [] if meta.get("repeat") else default
        parser.add_argument(*flag_names(field), **kwargs)


def from_namespace(cls, args: argparse.Namespace, **overrides):
    """`cls` from parsed flags (fields without a flag keep their defaults)."""
    fields = dataclasses.fields(cls)
    values = {f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)}
    for field in fields:
        many = field.metadata.get("repeat") or field.metadata.get("many")
        if many and field.name in values and values[field.name] is not None:
            values[field.name] = tuple(values[field.name])
    return cls(**{**values, **overrides})


def check(settings) -> None:
    """ValueError naming the first field (by its flag) whose value is out of range."""
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        meta = field.metadata
        if meta.get("required") and value in (None, ""):
            raise ValueError(f"{flag_names(field)[0]} is required (as a flag or in --config)")
        if value is None:
            continue
        problem = None
        choices = meta.get("choices")
        if callable(choices):
            choices = choices()
        if choices is not None:
            values = value if isinstance(value, tuple) else (value,)
            if any(v not in choices for v in values):
                problem = f"must be one of {', '.join(map(str, choices))}"
        if problem is None and _non_finite(value):
            problem = "must be a finite number"
        if problem is None and meta.get("check") is not None:
            problem = meta["check"](value)
        if problem:
            raise ValueError(f"{flag_names(field)[0]} {problem}, got {value!r}")


def _non_finite(value) -> bool:
    """A float (or a tuple holding one) that is NaN or infinite: never a setting's value."""
    values = value if isinstance(value, tuple) else (value,)
    return any(isinstance(v, float) and not math.isfinite(v) for v in values)


def free_fields(cls) -> tuple[str, ...]:
    """Fields that may change when a run resumes."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("free"))


def record(settings) -> dict:
    """The settings as JSON values (tuples as lists)."""
    return {f.name: _jsonable(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def default_of(cls, name: str):
    """The declared default of field `name` of `cls` (to share it, not copy it)."""
    return {f.name: f.default for f in dataclasses.fields(cls)}[name]
