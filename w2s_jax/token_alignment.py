"""Align an expert token sequence with the same text in another tokenizer's tokens.

Pure Python/NumPy, no model: LightReasoner's cross-tokenizer sampling uses it, and SALT
distillation across tokenizers can reuse it unchanged (teacher = expert ids here,
student = amateur): `align_completion` says, for every position of one tokenizer's
sequence, which column of the other tokenizer's sequence predicts the same text.

The rule (docs/CROSS_TOKENIZER.md). The expert completion's text is built from the
expert tokens' bytes (`vocab_map.token_bytes`), never by decoding and re-encoding
prefixes. Special tokens split it into segments; each segment is encoded ONCE with the
amateur tokenizer (with offsets), and the amateur's counterpart of each special token
(`VocabMap.expert_special_to_amateur`, by role or string) goes between them. Expert
position t predicts completion[t], which starts at byte offset b_t of the text. It is
aligned to amateur token j iff amateur token j starts exactly at b_t, the amateur
tokens before j spell exactly the text before b_t (so the amateur's prediction of
token j, from a teacher-forced pass over its own prompt + ids, sees the same text), and
token j spells the same bytes as completion[t] (both tokenizers cut the next token
alike, so both next-token distributions are over the same kind of step: without it,
an expert "Keeps" against an amateur "Ke|eps", or "1" against "123", would compare a
whole word with its first piece and read the segmentation as disagreement).
Unaligned (column -1): a boundary inside an amateur token or inside a multi-byte UTF-8
character, a next token cut differently by the two tokenizers, an expert token that
spells no text (empty, or special without an amateur counterpart), and every position
after the two texts diverge (an amateur unknown token, a normalizer that rewrote the
text, invalid UTF-8 from the expert).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from w2s_jax.vocab_map import VocabMap, tokenizer_json, walk_json


def plain_encoder(tokenizer):
    """A `tokenizers.Tokenizer` copy of `tokenizer` that encodes a text segment as text
    in the middle of a sequence: no post-processor (no special tokens added, offsets
    untrimmed), no space prepended (Metaspace or ByteLevel pre-tokenizer, Prepend normalizer)."""
    from tokenizers import Tokenizer

    spec = tokenizer_json(tokenizer)
    spec["post_processor"] = None
    for node in walk_json(spec.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
            node.pop("add_prefix_space", None)
        elif node.get("type") == "ByteLevel":
            node["add_prefix_space"] = False
    normalizer = spec.get("normalizer")
    if isinstance(normalizer, dict):
        if normalizer.get("type") == "Prepend":
            spec["normalizer"] = None
        elif normalizer.get("type") == "Sequence":
            normalizer["normalizers"] = [
                n for n in normalizer["normalizers"] if n.get("type") != "Prepend"
            ]
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


@dataclasses.dataclass(frozen=True)
class Alignment:
    """`amateur_ids`: the completion in amateur tokens; `columns` int32 [T]: per expert
    position, the index j into `amateur_ids` of the amateur token that predicts the same
    text boundary, or -1 (unaligned)."""

    amateur_ids: list[int]
    columns: np.ndarray


class _Builder:
    """Accumulates the amateur sequence segment by segment; tracks whether the amateur's
    tokens so far spell exactly the expert's text so far."""

    def __init__(self, encoder, amateur_bytes, length):
        self.encoder, self.amateur_bytes = encoder, amateur_bytes
        self.ids: list[int] = []
        self.columns = np.full(length, -1, np.int32)
        self.in_sync = True

    def add_segment(self, data: bytes, starts: list[tuple[int, int, bytes]]) -> None:
        """Encode one text segment; align the expert positions `starts` [(t, byte offset,
        the expert token's bytes)]."""
        if not data:
            return
        text = data.decode("utf-8", errors="replace")
        encoding = self.encoder.encode(text, add_special_tokens=False)
        char_to_byte = np.concatenate([[0], np.cumsum([len(c.encode()) for c in text])])
        boundaries, done = {}, 0  # done: bytes of `data` the amateur tokens spelled so far
        for token, (start, _) in zip(encoding.ids, encoding.offsets, strict=True):
            if self.in_sync:
                # Offsets count characters: a boundary inside a character never matches.
                if int(char_to_byte[start]) == done:
                    boundaries[done] = len(self.ids)
                spelled = self.amateur_bytes[token] if token < len(self.amateur_bytes) else None
                if spelled is None or data[done : done + len(spelled)] != spelled:
                    self.in_sync = False
                else:
                    done += len(spelled)
            self.ids.append(int(token))
        self.in_sync = self.in_sync and done == len(data)
        for t, offset, spelled in starts:
            j = boundaries.get(offset, -1)
            if j >= 0 and self.amateur_bytes[self.ids[j]] == spelled:  # the same next token
                self.columns[t] = j

    def add_special(self, t: int, amateur_id: int | None) -> None:
        """The expert's special token at position t: its amateur counterpart, if any."""
        if amateur_id is None:
            self.in_sync = False  # the amateur cannot see this token: the texts diverge
            return
        if self.in_sync:
            self.columns[t] = len(self.ids)
        self.ids.append(int(amateur_id))


def align_completion(completion_ids, vocab_map: VocabMap, encoder) -> Alignment:
    """Encode the expert completion's text with the amateur tokenizer and align it.

    `vocab_map`: the pair's map (its `expert_bytes` and `amateur_bytes` spell the tokens);
    `encoder`: `plain_encoder(amateur_tokenizer)`. See the module docstring for the rule.
    """
    completion = [int(x) for x in completion_ids]
    expert_bytes = vocab_map.expert_bytes
    builder = _Builder(encoder, vocab_map.amateur_bytes, len(completion))
    segment, starts = bytearray(), []
    for t, token in enumerate(completion):
        spelled = expert_bytes[token] if token < len(expert_bytes) else None
        if spelled is None:
            builder.add_segment(bytes(segment), starts)
            segment, starts = bytearray(), []
            builder.add_special(t, vocab_map.expert_special_to_amateur.get(token))
        elif spelled:
            starts.append((t, len(segment), spelled))
            segment += spelled
    builder.add_segment(bytes(segment), starts)
    return Alignment(builder.ids, builder.columns)
