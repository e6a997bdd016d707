"""Sampling with an amateur of another tokenizer: the rollout's text scored by the amateur on
its own tokens, aligned back to the expert's positions, over the expert's vocabulary.

Per batch (docs/CROSS_TOKENIZER.md): each expert rollout stays in expert ids; its text
is encoded once with the amateur's tokenizer and aligned (`w2s_jax.token_alignment`);
the amateur runs one teacher-forced pass over its own prompt (the question in the
amateur's chat template) + those ids, left-padded as a batch; its hidden states are
gathered at the aligned columns; `divergence.fused_cross_kl_and_target` gives the KL
and the targets over the expert's vocabulary through the vocabulary map
(`w2s_jax.vocab_map`). Unaligned positions, and positions without a target, are
invalid: never selected, no target, and their KL is not a number (null in the record).
Same-tokenizer pairs never come here (`sampling.Scorer`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from w2s_jax import divergence, sharding
from w2s_jax.generate import left_pad, prefill, shared_prefix_length
from w2s_jax.sampling import batch_placer, teacher_forced_inputs
from w2s_jax.shape_buckets import bucket_width
from w2s_jax.token_alignment import align_completion, plain_encoder
from w2s_jax.vocab_map import VocabMap, build_vocab_map


@dataclasses.dataclass
class TokenizerPair:
    """The two tokenizers of a cross-tokenizer pair and what aligning them needs."""

    amateur_tokenizer: object
    vocab_map: VocabMap
    encoder: object  # token_alignment.plain_encoder of the amateur's tokenizer

    @classmethod
    def build(cls, expert_tokenizer, amateur_tokenizer) -> TokenizerPair:
        """Map and encoder of the pair (ValueError for an unsupported kind)."""
        return cls(
            amateur_tokenizer,
            build_vocab_map(expert_tokenizer, amateur_tokenizer),
            plain_encoder(amateur_tokenizer),
        )

    def align(self, completion_ids):
        """`token_alignment.Alignment` of one expert completion."""
        return align_completion(completion_ids, self.vocab_map, self.encoder)

    @property
    def amateur_pad_id(self) -> int:
        tok = self.amateur_tokenizer
        for value in (tok.pad_token_id, tok.eos_token_id, 0):
            if value is not None:
                return int(value)
        return 0


@dataclasses.dataclass
class CrossPlan:
    """What `w2s sample` checked and needs for an amateur of another tokenizer: the pair,
    each question's prompt in the amateur's own tokens and chat template, and the
    manifest's `cross_tokenizer` block (mode, map coverage, amateur tokenizer)."""

    pair: TokenizerPair
    amateur_prompts: list
    manifest_block: dict

    @property
    def amateur_vocab_size(self) -> int:
        return len(self.pair.vocab_map.amateur_bytes)


def plan_cross(
    expert_tokenizer, amateur_tokenizer, questions, *, settings, expert: str, amateur: str
) -> CrossPlan:
    """Build the map, measure its coverage on the questions (encoded by the expert's
    tokenizer) and refuse a pair below `settings.min_vocab_coverage` (ValueError with the
    measured coverage); format every question with the amateur's own template."""
    from w2s_jax.fingerprint import tokenizer_fingerprint
    from w2s_jax.prompts import prompt_example, prompt_ids
    from w2s_jax.vocab_map import check_coverage

    try:
        pair = TokenizerPair.build(expert_tokenizer, amateur_tokenizer)
    except ValueError as exc:
        raise ValueError(f"expert {expert} / amateur {amateur}: {exc}") from exc
    encoded = (
        expert_tokenizer(q.question, add_special_tokens=False)["input_ids"] for q in questions
    )
    coverage = pair.vocab_map.coverage(encoded)
    check_coverage(coverage, settings.min_vocab_coverage, expert=expert, amateur=amateur)
    style = dict(style=settings.prompt_style, system_prompt=settings.system_prompt)
    try:
        prompts = [prompt_ids(amateur_tokenizer, q.question, **style) for q in questions]
        example = prompt_example(amateur_tokenizer, **style)
    except ValueError as exc:
        raise ValueError(f"amateur {amateur}'s tokenizer: {exc}") from exc
    block = {
        "unmapped_mass": settings.unmapped_mass,
        "coverage": coverage,
        "amateur_tokenizer_fingerprint": tokenizer_fingerprint(amateur_tokenizer),
        "amateur_vocab_size": len(amateur_tokenizer),
        "amateur_prompt_example": example,
    }
    return CrossPlan(pair, prompts, block)


def aligned_inputs(pair: TokenizerPair, amateur_prompts, completion_bt, lengths_b):
    """The amateur's teacher-forced batch and, per expert position, the column to read.

    Returns (ids [B, S], mask [B, S], columns [B, T] int32 (column of `ids` whose hidden
    state predicts the aligned amateur token; 0 where unaligned), aligned [B, T] bool,
    prefix_len). Rows are the amateur prompt (left-padded, `left_pad`) + the completion's
    amateur ids (right-padded to a bucket width), minus the last column.
    """
    rows = [pair.align(completion_bt[b, : int(n)]) for b, n in enumerate(lengths_b)]
    pad = pair.amateur_pad_id
    width = bucket_width(max(max(len(r.amateur_ids) for r in rows), 1), 16)
    amateur_bt = np.full((len(rows), width), pad, np.int32)
    for b, r in enumerate(rows):
        amateur_bt[b, : len(r.amateur_ids)] = r.amateur_ids
    prefix_len = shared_prefix_length(amateur_prompts)
    prompt_bp, prompt_mask = left_pad(amateur_prompts, pad, multiple=16, prefix_len=prefix_len)
    ids, mask, _ = teacher_forced_inputs(
        prompt_bp, prompt_mask, amateur_bt, [len(r.amateur_ids) for r in rows]
    )
    t = completion_bt.shape[1]
    local = np.full((len(rows), t), -1, np.int32)
    for b, r in enumerate(rows):
        local[b, : len(r.columns)] = r.columns
    aligned = local >= 0
    columns = np.where(aligned, prompt_bp.shape[1] - 1 + local, 0).astype(np.int32)
    return ids, mask, columns, aligned, prefix_len


@functools.partial(
    jax.jit,
    static_argnames=(
        "expert_graph",
        "amateur_graph",
        "alpha",
        "top_k",
        "chunk_size",
        "sizes",
        "mode",
        "prefix_len",
    ),
)
def _cross_score(
    expert_graph,
    expert_state,
    amateur_graph,
    amateur_state,
    expert_btd,
    ids_bs,
    mask_bs,
    columns_bt,
    valid_bt,
    amateur_to_expert,
    expert_mapped,
    beta,
    select,
    *,
    alpha,
    top_k,
    chunk_size,
    sizes,
    mode,
    prefix_len,
):
    """KL, selection and targets at the aligned rollout positions (see the module doc)."""
    expert = nnx.merge(expert_graph, expert_state)
    amateur = nnx.merge(amateur_graph, amateur_state)
    amateur_bsd, _ = prefill(amateur, ids_bs, mask_bs, prefix_len=prefix_len)
    amateur_btd = jnp.take_along_axis(amateur_bsd, (columns_bt - prefix_len)[..., None], axis=1)
    expert_head, expert_layout = expert.lm_head_matrix()
    amateur_head, amateur_layout = amateur.lm_head_matrix()
    kl_bt, ids_btk, weights_btk, stats = divergence.fused_cross_kl_and_target(
        expert_btd,
        expert_head,
        amateur_btd,
        amateur_head,
        amateur_to_expert,
        expert_mapped,
        alpha,
        top_k,
        mode=mode,
        chunk_size=min(chunk_size, valid_bt.shape[1]),
        expert_vocab_size=sizes[0],
        amateur_vocab_size=sizes[1],
        expert_head_layout=expert_layout,
        amateur_head_layout=amateur_layout,
    )
    valid_bt = valid_bt & stats["has_target"]
    selected_bt = jnp.where(select, divergence.select_steps(kl_bt, beta, valid_bt), valid_bt)
    return {
        "kl": kl_bt,
        "selected": selected_bt,
        "valid": valid_bt,
        "target_ids": ids_btk,
        "target_weights": weights_btk,
        "plausible_size": stats["plausible_size"],
        "dropped_mass": stats["dropped_mass"],
        "mapped_mass": stats["mapped_mass"],
    }


class CrossScorer:
    """Scores expert rollouts against an amateur with another tokenizer, on one mesh."""

    def __init__(self, expert, amateur, pair: TokenizerPair, *, config, mesh=None):
        """config: the sampling settings (alpha, beta, top_k, chunk_size, select,
        unmapped_mass are read). `expert`/`amateur` are restricted to their tokenizers'
        real ids (`CausalLM.restrict_vocab`)."""
        a2e = pair.vocab_map.amateur_to_expert
        if expert.token_count != len(pair.vocab_map.expert_mapped):
            raise ValueError(
                f"the expert covers {expert.token_count} ids, its tokenizer "
                f"{len(pair.vocab_map.expert_mapped)}"
            )
        if amateur.token_count != len(a2e):
            raise ValueError(
                f"the amateur covers {amateur.token_count} ids, its tokenizer {len(a2e)}"
            )
        self.pair, self.config = pair, config
        self._expert, self._amateur = nnx.split(expert), nnx.split(amateur)
        self._sizes = (expert.token_count, amateur.token_count)
        the_map = (a2e, pair.vocab_map.expert_mapped)
        if mesh is None:
            self._map = jax.device_put(the_map, jax.local_devices()[0])
        else:
            self._map = sharding.replicate(the_map, mesh)
        self._place = batch_placer(mesh)

    def __call__(self, amateur_prompts, completion_bt, lengths_b, expert_btd) -> dict:
        """Host arrays [B, T] / [B, T, k] as `Scorer` gives, plus `aligned`, `valid` (aligned
        with a target) and `mapped_mass`; `kl` is NaN where a position is not aligned.

        `amateur_prompts`: each row's prompt in the amateur's tokens; `completion_bt`,
        `lengths_b`, `expert_btd`: the expert's rollouts, lengths and hidden states.
        """
        ids, mask, columns, aligned, prefix_len = aligned_inputs(
            self.pair, amateur_prompts, completion_bt, lengths_b
        )
        out = _cross_score(
            self._expert[0],
            self._expert[1],
            self._amateur[0],
            self._amateur[1],
            expert_btd,
            self._place(ids),
            self._place(mask),
            self._place(columns),
            self._place(aligned),
            *self._map,
            np.float32(self.config.beta),
            np.bool_(self.config.select),
            alpha=self.config.alpha,
            top_k=self.config.top_k,
            chunk_size=self.config.chunk_size,
            sizes=self._sizes,
            mode=self.config.unmapped_mass,
            prefix_len=prefix_len,
        )
        host = {key: sharding.to_host(value) for key, value in out.items()}
        host["aligned"] = aligned
        host["kl"] = np.where(aligned, host["kl"], np.nan).astype(np.float32)
        return host
