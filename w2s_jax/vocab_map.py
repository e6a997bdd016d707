"""Per-token byte strings of a Hugging Face tokenizer, and the expert <- amateur vocabulary map.

`token_bytes` gives every id the bytes it spells: ByteLevel BPE (GPT-2, Qwen, Llama 3;
the bytes_to_unicode alphabet inverted, "Ġ" a space) or SentencePiece-style Metaspace
("▁" a space, "<0xNN>" byte-fallback tokens that byte). The kind is read from the
tokenizer.json (model, decoder, pre-tokenizer, normalizer). Special and added tokens
spell no text: their bytes are None.

`build_vocab_map` maps every amateur id to the expert id with the same bytes:

- duplicate byte strings: on the expert side the lowest id with those bytes is the
  canonical one (the others stay unmapped); on the amateur side every id with those
  bytes maps onto it, so their probabilities add up;
- special/added tokens are mapped by ROLE (end of turn, eos, bos, pad, unk, in that
  order of precedence), then by identical token string.

The map is `amateur_to_expert` (int32 [Va], expert id or -1) and `expert_mapped`
(bool [Ve], some amateur id lands there). Coverage: the share of expert ids mapped, of
amateur ids mapped, and of expert token occurrences in given sequences (the encoded
questions) that are mapped; `check_coverage` refuses a pair below a threshold.
See docs/CROSS_TOKENIZER.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Iterable

import numpy as np

from w2s_jax.prompts import chat_end_of_turn, special_token_ids

ROLES = ("end_of_turn", "eos", "bos", "pad", "unk")
# How the scoring treats probability on ids without a counterpart in the map
# (`w2s_jax.divergence.cross_vocab`; defined here, free of JAX, for the settings).
UNMAPPED_MASS_MODES = ("renormalize", "residual")
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPACE_MARK = "\u2581"  # "▁"


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode (printable stand-ins for the 256 bytes)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def walk_json(node):
    """Every dict inside a tokenizer.json component (Sequence members included)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk_json(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_json(value)


def tokenizer_json(tokenizer) -> dict:
    """The parsed tokenizer.json of a fast (`tokenizers`-backed) HF tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; cross-tokenizer scoring "
            "reads the tokenizer.json of a `tokenizers`-backed tokenizer"
        )
    return json.loads(backend.to_str())


def tokenizer_kind(spec: dict) -> str:
    """ "byte_level" or "metaspace", from a parsed tokenizer.json; ValueError otherwise."""
    parts = [spec.get(key) for key in ("pre_tokenizer", "decoder", "normalizer")]
    nodes = [n for part in parts for n in walk_json(part)]
    types = {n.get("type") for n in nodes}
    if "ByteLevel" in types:
        return "byte_level"
    replaces_space = any(
        n.get("type") == "Replace" and SPACE_MARK in json.dumps(n, ensure_ascii=False)
        for n in nodes
    )
    if "Metaspace" in types or replaces_space:
        return "metaspace"
    model = spec.get("model", {}).get("type")
    raise ValueError(
        f"cannot read token bytes of a {model} tokenizer without a ByteLevel or Metaspace "
        f"pre-tokenizer/decoder (found {sorted(t for t in types if t)}); cross-tokenizer "
        "scoring supports byte-level BPE and SentencePiece-style tokenizers"
    )


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each id spells, for ids 0 .. len(tokenizer) - 1; None for special/added
    tokens (and any token that spells no bytes the tokenizer's alphabet can express)."""
    spec = tokenizer_json(tokenizer)
    kind = tokenizer_kind(spec)
    byte_fallback = bool(spec.get("model", {}).get("byte_fallback"))
    special = set(special_token_ids(tokenizer).values())
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    to_byte = _unicode_to_byte()
    out: list[bytes | None] = []
    for i, token in enumerate(tokens):
        if byte_fallback and token is not None and (match := _BYTE_FALLBACK.match(token)):
            out.append(bytes([int(match.group(1), 16)]))  # even where declared special
        elif i in special or token is None:
            out.append(None)
        elif kind == "byte_level":
            out.append(
                bytes(to_byte[c] for c in token) if all(c in to_byte for c in token) else None
            )
        else:
            out.append(token.replace(SPACE_MARK, " ").encode("utf-8"))
    return out


def role_ids(tokenizer) -> dict[str, int]:
    """{role: id} of the special tokens by role (end_of_turn, eos, bos, pad, unk)."""
    found = {}
    end = chat_end_of_turn(tokenizer)
    if end is not None:
        found["end_of_turn"] = int(tokenizer.convert_tokens_to_ids(end))
    for role in ROLES[1:]:
        value = getattr(tokenizer, f"{role}_token_id", None)
        if value is not None:
            found[role] = int(value)
    found.setdefault("end_of_turn", found.get("eos"))
    return {role: i for role, i in found.items() if i is not None}


@dataclasses.dataclass(frozen=True)
class VocabMap:
    """The expert <- amateur vocabulary map (see the module docstring for the rules).

    `expert_special_to_amateur`: for each expert special/added id with an amateur
    counterpart (by role or string), that amateur id; the alignment inserts it where
    the expert's rollout holds the special token. `expert_bytes`/`amateur_bytes`: each
    side's `token_bytes`, which the map was built from (the alignment reads them too).
    """

    amateur_to_expert: np.ndarray  # int32 [Va]: expert id or -1
    expert_mapped: np.ndarray  # bool [Ve]
    expert_special_to_amateur: dict[int, int]
    expert_bytes: list
    amateur_bytes: list

    def coverage(self, sequences: Iterable[Iterable[int]] = ()) -> dict:
        """Shares mapped: expert ids, amateur ids, and expert token occurrences in
        `sequences` (None when they hold no token)."""
        counts = np.zeros(len(self.expert_mapped), np.int64)
        for seq in sequences:
            np.add.at(counts, np.asarray(list(seq), np.int64), 1)
        total = int(counts.sum())
        occurrences = float(counts[self.expert_mapped].sum() / total) if total else None
        return {
            "expert_ids": float(self.expert_mapped.mean()),
            "amateur_ids": float((self.amateur_to_expert >= 0).mean()),
            "token_occurrences": occurrences,
        }


def build_vocab_map(expert_tokenizer, amateur_tokenizer) -> VocabMap:
    """The map from the two tokenizers' byte strings and special-token roles."""
    expert_bytes = token_bytes(expert_tokenizer)
    amateur_bytes = token_bytes(amateur_tokenizer)
    canonical: dict[bytes, int] = {}
    for i, b in enumerate(expert_bytes):
        if b is not None:
            canonical.setdefault(b, i)  # the lowest id with these bytes
    a2e = np.array([canonical.get(b, -1) if b is not None else -1 for b in amateur_bytes], np.int32)
    e2a: dict[int, int] = {}
    expert_roles, amateur_roles = role_ids(expert_tokenizer), role_ids(amateur_tokenizer)
    pairs = [
        (expert_roles[r], amateur_roles[r])
        for r in ROLES
        if r in expert_roles and r in amateur_roles
    ]
    expert_strings = special_token_ids(expert_tokenizer)
    for token, a in special_token_ids(amateur_tokenizer).items():
        if token in expert_strings:
            pairs.append((expert_strings[token], a))
    for e, a in pairs:
        if expert_bytes[e] is None and amateur_bytes[a] is None and a2e[a] < 0 and e not in e2a:
            a2e[a] = e
            e2a[e] = a
    expert_mapped = np.zeros(len(expert_bytes), bool)
    expert_mapped[a2e[a2e >= 0]] = True
    return VocabMap(a2e, expert_mapped, e2a, expert_bytes, amateur_bytes)


def check_coverage(coverage: dict, threshold: float, *, expert: str, amateur: str) -> None:
    """ValueError when the token-occurrence coverage is below `threshold`, naming it."""
    measured = coverage["token_occurrences"]
    if measured is None:
        raise ValueError(f"no question tokens to measure the vocabulary map of {amateur} on")
    if measured < threshold:
        raise ValueError(
            f"amateur {amateur}'s vocabulary map covers {measured:.1%} of the expert "
            f"{expert}'s question tokens ({coverage['expert_ids']:.1%} of expert ids, "
            f"{coverage['amateur_ids']:.1%} of amateur ids), below --min-vocab-coverage "
            f"{threshold:.1%}; nothing was written"
        )
