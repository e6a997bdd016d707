"""How `w2s eval` decodes: greedy, sampling or contrastive, from the run's settings, and
the evaluation protocols (`--protocol`) that fix those settings.

`resolve` fills the defaults that depend on the chosen decoding and refuses settings
that do not apply to it; `mode_for` builds the `w2s_jax.decoding` mode of one batch,
each (question, sample) drawing with its own key (`row_keys`), so a sampled answer
depends on the seed, the question id and the sample index only, not on the batch it
ran in: a resumed run draws what an uninterrupted one would. `load_amateur` loads the
contrastive amateur after checking that it shares the expert's tokenizer.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from pathlib import Path

from w2s_jax import eval_engine
from w2s_jax.prompts import EVAL_SYSTEM_PROMPT

DECODINGS = ("greedy", "sampling", "contrastive")
# --cd-* settings -> fields of `decoding.Contrastive`, whose defaults they take
CD_FIELDS = {
    "cd_alpha": "alpha",
    "cd_beta": "beta",
    "cd_amateur_temperature": "amateur_temperature",
    "cd_form": "form",
}


# What each --protocol sets. qwen25-math: the Qwen2.5-Math toolkit's qwen25-math-cot as
# the LightReasoner paper ran it: its boxed system prompt in the chat template, greedy,
# 2,048 new tokens. Its stop words (<|im_end|>, <|endoftext|>) are the tokenizer's
# special end tokens, which `prompts.stop_ids` already stops on.
PROTOCOLS = {
    "qwen25-math": {
        "prompt_style": "chat",
        "system_prompt": EVAL_SYSTEM_PROMPT,
        "decoding": "greedy",
        "max_new_tokens": 2048,
    }
}


def apply_protocol(settings, defaults: dict) -> dict:
    """The fields `settings.protocol` sets; ValueError naming a flag given another value
    (a field still at its default in `defaults` takes the protocol's)."""
    if settings.protocol is None:
        return {}
    values = PROTOCOLS[settings.protocol]
    for name, value in values.items():
        given = getattr(settings, name)
        if given not in (value, defaults[name]):
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"--protocol {settings.protocol} sets {flag} {value!r}; got {given!r}")
    return values


def resolve(settings) -> dict:
    """The decoding fields of `settings` (an EvalSettings) with their defaults filled in;
    ValueError naming the flag for a combination that cannot work."""
    temperature = settings.temperature
    decoding = settings.decoding or ("sampling" if (temperature or 0) > 0 else "greedy")
    values = {"decoding": decoding}
    contrastive = decoding == "contrastive"
    given = [k for k in CD_FIELDS if getattr(settings, k) is not None]
    if not contrastive and (given or settings.amateur):
        flag = "--amateur" if settings.amateur else "--" + given[0].replace("_", "-")
        raise ValueError(f"{flag} applies to --decoding contrastive only")
    if contrastive:
        if not settings.amateur:
            raise ValueError("--decoding contrastive needs --amateur DIR")
        from w2s_jax.decoding import Contrastive

        defaults = {f.name: f.default for f in dataclasses.fields(Contrastive)}
        values |= {
            k: defaults[field] if getattr(settings, k) is None else getattr(settings, k)
            for k, field in CD_FIELDS.items()
        }
    if decoding == "greedy" and (temperature or settings.top_p is not None):
        raise ValueError("--temperature and --top-p apply to --decoding sampling or contrastive")
    if decoding == "sampling":
        temperature = 1.0 if temperature is None else temperature
        if temperature <= 0:
            raise ValueError("--decoding sampling needs --temperature > 0")
    values["temperature"] = float(temperature or 0.0)
    eval_engine.check_settings(settings, decoding)
    if settings.samples > 1 and values["temperature"] == 0:
        raise ValueError(
            f"--samples {settings.samples} needs sampled decoding (--temperature > 0): "
            "greedy answers would all be the same"
        )
    if settings.top_p is not None and values["temperature"] == 0:
        raise ValueError("--top-p applies to sampled decoding (--temperature > 0)")
    return values


def is_sampled(settings) -> bool:
    """Whether the run draws its answers (temperature > 0), so rows carry a sample index."""
    return settings.temperature > 0


def row_keys(seed: int, items: Sequence[tuple[str, int]]):
    """One PRNG key per (question id, sample index): fold_in(fold_in(key(seed), crc32(id)), i)."""
    import jax
    import jax.numpy as jnp

    ids = jnp.asarray([zlib.crc32(qid.encode()) for qid, _ in items], jnp.uint32)
    samples = jnp.asarray([j for _, j in items], jnp.uint32)
    base = jax.random.key(seed)
    fold = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(base, i), j))
    return fold(ids, samples)


def mode_for(settings, items: Sequence[tuple[str, int]]):
    """The decoding mode of one batch of (question id, sample index) rows."""
    from w2s_jax.decoding import Contrastive, Greedy, Sampling

    keys = row_keys(settings.seed, items) if is_sampled(settings) else None
    if settings.decoding == "contrastive":
        return Contrastive(
            **{field: getattr(settings, k) for k, field in CD_FIELDS.items()},
            temperature=settings.temperature,
            top_p=settings.top_p,
            row_keys=keys,
        )
    if settings.decoding == "sampling":
        return Sampling(settings.temperature, top_p=settings.top_p, row_keys=keys)
    return Greedy()


def load_amateur(settings, tokenizer, mesh):
    """The amateur model of a contrastive run, its padded vocabulary rows masked; ValueError
    unless its tokenizer maps ids to the same tokens as the expert's (`tokenizer`)."""
    from w2s_jax.fingerprint import same_tokenizer_files
    from w2s_jax.models import ModelConfig, load_pretrained, load_tokenizer
    from w2s_jax.sampling import check_shared_tokenizer
    from w2s_jax.settings import model_options

    folder = Path(settings.amateur)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"amateur {folder} is not a model folder (no config.json)")
    ModelConfig.from_hf_json(folder)
    if not same_tokenizer_files(settings.model, folder):
        try:
            amateur_tokenizer = load_tokenizer(folder)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"{folder}: cannot load its tokenizer ({exc})") from exc
        check_shared_tokenizer(tokenizer, amateur_tokenizer, settings.model, str(folder))
    model = load_pretrained(
        folder, mesh=mesh, allow_unused=settings.allow_unused_weights, **model_options(settings)
    )
    model.restrict_vocab(len(tokenizer))
    return model
