"""LightReasoner sampling stage: questions -> expert rollouts -> per-token KL -> targets.

Per batch: chat-formatted prompt ids -> the expert's greedy rollout
(`w2s_jax.generate`, which also returns the expert's hidden state behind every
token it chose) -> one teacher-forced pass of the amateur over prompt + rollout
-> at every rollout position, KL(πE‖πA) and the contrastive
target from the hidden states and LM heads (`divergence.fused_kl_and_target`,
padded vocabulary rows masked: `CausalLM.restrict_vocab`) -> `select_steps`. Token ids
end to end: nothing is decoded and re-encoded. The output folder is handled by
`w2s_jax.sample_store`; the command is `w2s sample`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from w2s_jax import divergence, sharding
from w2s_jax.fingerprint import tokenizer_mapping
from w2s_jax.generate import generate, left_pad, prefill, shared_prefix_length
from w2s_jax.records import SampleRecord

# --- tokenizers ---------------------------------------------------


def tokenizer_difference(first, second) -> str | None:
    """None if the two tokenizers map ids to the same tokens and share special tokens;
    else a description: sizes, the first differing ids, the differing special tokens."""
    a, b = tokenizer_mapping(first), tokenizer_mapping(second)
    if a == b and len(first) == len(second):
        return None
    parts = []
    if len(first) != len(second):
        parts.append(f"sizes {len(first)} vs {len(second)}")
    by_id_a = {i: t for t, i in a["vocab"].items()}
    by_id_b = {i: t for t, i in b["vocab"].items()}
    differing = [i for i in sorted(set(by_id_a) | set(by_id_b)) if by_id_a.get(i) != by_id_b.get(i)]
    if differing:
        shown = ", ".join(f"{i} ({by_id_a.get(i)!r} vs {by_id_b.get(i)!r})" for i in differing[:5])
        parts.append(f"{len(differing)} ids map to different tokens, first: {shown}")
    special = [
        f"{key} {a['special'].get(key)!r} vs {b['special'].get(key)!r}"
        for key in sorted(set(a["special"]) | set(b["special"]))
        if a["special"].get(key) != b["special"].get(key)
    ]
    if special:
        parts.append("special tokens differ: " + ", ".join(special))
    return "; ".join(parts) or "tokenizers differ"


def check_shared_tokenizer(expert_tokenizer, amateur_tokenizer, expert: str, amateur: str) -> None:
    """ValueError unless expert and amateur share the id -> token mapping and special tokens."""
    difference = tokenizer_difference(expert_tokenizer, amateur_tokenizer)
    if difference is not None:
        raise ValueError(
            f"expert {expert} and amateur {amateur} have different tokenizers "
            f"(expert vs amateur: {difference}); contrastive decoding compares next-token "
            "distributions id by id, so both models must share one tokenizer (`w2s sample` "
            "accepts an amateur of another tokenizer)"
        )


# --- the teacher-forced pass ----------------------------------------------------


def teacher_forced_inputs(prompt_bp, prompt_mask_bp, completion_bt, lengths_b):
    """Prompt + rollout minus its last token, [B, P + T - 1], and its attention mask.

    The hidden state at column P - 1 + t is the prefix prompt + completion[:t],
    which predicts completion[t].
    """
    t = completion_bt.shape[1]
    valid_bt = np.arange(t)[None, :] < np.asarray(lengths_b)[:, None]
    ids = np.concatenate([prompt_bp, completion_bt[:, : t - 1]], axis=1).astype(np.int32)
    mask = np.concatenate([prompt_mask_bp, valid_bt[:, : t - 1]], axis=1).astype(np.int32)
    return ids, mask, valid_bt


@functools.partial(
    jax.jit,
    static_argnames=(
        "expert_graph",
        "amateur_graph",
        "alpha",
        "top_k",
        "chunk_size",
        "vocab_size",
        "prefix_len",
    ),
)
def _score(
    expert_graph,
    expert_state,
    amateur_graph,
    amateur_state,
    expert_btd,
    ids_bs,
    mask_bs,
    valid_bt,
    beta,
    select,
    *,
    alpha,
    top_k,
    chunk_size,
    vocab_size,
    prefix_len,
):
    """KL, selection and targets at the rollout positions.

    expert_btd: the expert's hidden states from its rollout; the amateur's come from
    one teacher-forced pass over ids_bs, whose first `prefix_len` columns (shared by
    every row) run once. `beta` and `select` are traced, so the ablations reuse the
    compiled program.
    """
    t = valid_bt.shape[1]
    start = ids_bs.shape[1] - t  # column P - 1
    expert = nnx.merge(expert_graph, expert_state)
    amateur = nnx.merge(amateur_graph, amateur_state)
    amateur_bsd, _ = prefill(amateur, ids_bs, mask_bs, prefix_len=prefix_len)
    amateur_btd = amateur_bsd[:, start - prefix_len :]
    # Heads as stored (a tied embedding is [V, D]): a transposed view would be copied whole.
    expert_head, expert_layout = expert.lm_head_matrix()
    amateur_head, amateur_layout = amateur.lm_head_matrix()
    kl_bt, ids_btk, weights_btk, stats = divergence.fused_kl_and_target(
        expert_btd,
        expert_head,
        amateur_btd,
        amateur_head,
        alpha,
        top_k,
        chunk_size=min(chunk_size, t),
        vocab_size=vocab_size,
        expert_head_layout=expert_layout,
        amateur_head_layout=amateur_layout,
    )
    selected_bt = jnp.where(select, divergence.select_steps(kl_bt, beta, valid_bt), valid_bt)
    return {
        "kl": kl_bt,
        "selected": selected_bt,
        "target_ids": ids_btk,
        "target_weights": weights_btk,
        "plausible_size": stats["plausible_size"],
        "dropped_mass": stats["dropped_mass"],
    }


def batch_placer(mesh):
    """array -> device array: its rows over the mesh's batch axes, or on the first local
    device without a mesh (the scorers' host inputs)."""
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return lambda x: jax.device_put(x, device)
    return functools.partial(sharding.place_batch, mesh=mesh)


class Scorer:
    """Scores rollouts on one mesh: the expert's own hidden states from its rollout
    against one teacher-forced pass of the amateur."""

    def __init__(self, expert, amateur, *, config, mesh=None):
        """config: the sampling settings (alpha, beta, top_k, chunk_size, select are read).
        KL and targets cover the real token ids of the models (`CausalLM.restrict_vocab`)."""
        if expert.token_count != amateur.token_count:
            raise ValueError(
                f"expert and amateur cover {expert.token_count} and {amateur.token_count} token "
                "ids; restrict both to the shared tokenizer's size"
            )
        self.config = config
        self.vocab_size = expert.token_count
        self.mesh = mesh
        self._expert = nnx.split(expert)
        self._amateur = nnx.split(amateur)

    def __call__(
        self, prompt_bp, prompt_mask_bp, completion_bt, lengths_b, expert_btd, *, prefix_len=0
    ) -> dict:
        """Per-position KL, selection and targets as host arrays [B, T] / [B, T, k].

        `prompt_bp` is laid out by `left_pad` (mask 1 = real token; its first
        `prefix_len` columns shared by every row); `completion_bt` holds the rollouts,
        `lengths_b` their lengths (positions t >= length are padding), and `expert_btd`
        the expert's hidden state behind each rollout token
        (`GenerationResult.hidden_states`).
        """
        ids, mask, valid = teacher_forced_inputs(
            prompt_bp, prompt_mask_bp, completion_bt, lengths_b
        )
        place = batch_placer(self.mesh)
        out = _score(
            self._expert[0],
            self._expert[1],
            self._amateur[0],
            self._amateur[1],
            expert_btd,
            place(ids),
            place(mask),
            place(valid),
            np.float32(self.config.beta),
            np.bool_(self.config.select),
            alpha=self.config.alpha,
            top_k=self.config.top_k,
            chunk_size=self.config.chunk_size,
            vocab_size=self.vocab_size,
            prefix_len=prefix_len,
        )
        return {key: sharding.to_host(value) for key, value in out.items()}


def gather_rows(local_rows: list[list[int]]) -> list[list[int]]:
    """Every process's ragged id lists, in process order; the identity on one process.

    All processes must pass the same number of rows.
    """
    if jax.process_count() == 1:
        return local_rows
    lengths = np.array([len(r) for r in local_rows], np.int32)
    width = int(np.max(multihost_utils.process_allgather(lengths.max(initial=1))))
    padded = np.zeros((len(local_rows), width), np.int32)
    for i, row in enumerate(local_rows):
        padded[i, : len(row)] = row
    all_ids = multihost_utils.process_allgather(padded)  # [processes, rows, width]
    all_lengths = multihost_utils.process_allgather(lengths)
    return [
        all_ids[p, i, : all_lengths[p, i]].tolist()
        for p in range(all_ids.shape[0])
        for i in range(all_ids.shape[1])
    ]


def rollout_and_score(
    expert, scorer, prompts, *, max_new_tokens, eos_ids, pad_id, amateur_prompts=None
):
    """The expert's greedy rollouts of `prompts` and their scores, on host.

    `scorer`: a `Scorer`, or with `amateur_prompts` (each row's prompt in the amateur's
    own tokens) a `cross_scoring.CrossScorer` for an amateur of another tokenizer.
    Returns (completion [B, T] int32, lengths [B], scores from the scorer).
    """
    result = generate(
        expert,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
        return_hidden_states=True,
    )
    completion_bt = result.tokens.astype(np.int32)
    lengths_b = result.lengths.astype(np.int32)
    if amateur_prompts is not None:
        scores = scorer(amateur_prompts, completion_bt, lengths_b, result.hidden_states)
        return completion_bt, lengths_b, scores
    prefix_len = shared_prefix_length(prompts)
    prompt_bp, prompt_mask_bp = left_pad(prompts, pad_id, multiple=16, prefix_len=prefix_len)
    scores = scorer(
        prompt_bp,
        prompt_mask_bp,
        completion_bt,
        lengths_b,
        result.hidden_states,
        prefix_len=prefix_len,
    )
    return completion_bt, lengths_b, scores


# --- records ---------------------------------------------------------------------


def build_records(ids, prompts, completion_bt, lengths_b, scores, *, contrast: bool):
    """One `SampleRecord` per row, and the batch's sums for the stats sidecar.

    Targets keep the min(|plausible set|, k) heaviest tokens; with `contrast=False`
    the target is one-hot on the expert's own token. Scores of an amateur of another
    tokenizer (`cross_scoring.CrossScorer`: with `aligned` and `mapped_mass`) leave the
    KL of unaligned positions None (null in the record), and the stats add the mapped
    amateur mass of every aligned position.
    """
    records = []
    plausible_sum = dropped_sum = dropped_max = 0.0
    cross = "aligned" in scores
    mapped_mass = []
    for b, (qid, prompt) in enumerate(zip(ids, prompts, strict=True)):
        n = int(lengths_b[b])
        completion = [int(x) for x in completion_bt[b, :n]]
        positions = np.flatnonzero(scores["selected"][b, :n])
        if contrast:
            sizes = np.minimum(
                scores["plausible_size"][b, positions], scores["target_ids"].shape[-1]
            )
            target_ids = [
                scores["target_ids"][b, t, :m].tolist()
                for t, m in zip(positions, sizes, strict=True)
            ]
            target_weights = [
                [float(w) for w in scores["target_weights"][b, t, :m]]
                for t, m in zip(positions, sizes, strict=True)
            ]
            dropped = scores["dropped_mass"][b, positions].astype(np.float64)
            dropped_sum += float(dropped.sum())
            dropped_max = max(dropped_max, float(dropped.max(initial=0.0)))
        else:
            target_ids = [[completion[t]] for t in positions]
            target_weights = [[1.0] for _ in positions]
        plausible_sum += float(scores["plausible_size"][b, positions].sum())
        kl = [float(x) for x in scores["kl"][b, :n]]
        if cross:
            aligned = scores["aligned"][b, :n]
            kl = [x if ok else None for x, ok in zip(kl, aligned, strict=True)]
            mapped_mass += [float(x) for x in scores["mapped_mass"][b, :n][aligned]]
        records.append(
            SampleRecord(
                id=qid,
                prompt_ids=[int(x) for x in prompt],
                completion_ids=completion,
                kl=kl,
                positions=positions.tolist(),
                target_ids=target_ids,
                target_weights=target_weights,
            )
        )
    stats = {
        "plausible_size_sum": plausible_sum,
        "dropped_mass_sum": dropped_sum,
        "dropped_mass_max": dropped_max,
    }
    if cross:
        stats["mapped_mass"] = mapped_mass
    return records, stats
