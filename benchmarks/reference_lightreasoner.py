"""The published LightReasoner sampling algorithm, rebuilt in PyTorch + transformers.

A faithful re-implementation (not a copy) of the reference's sampling loop, used
as the baseline of benchmarks/sampling.py. Per question, like the original:
1. chat-format the question (system prompt + user turn), tokenize the text;
2. `expert.generate(max_new_tokens, output_scores=True)`; the expert's
   distribution at step t is softmax(scores[t]);
3. for every step t >= 1: decode completion[:t] to text, append it to the
   formatted prompt text, re-tokenize, and run the amateur on these prefixes in
   right-padded batches of 64, reading the logits at each prefix's last token;
4. truncate both distributions to the smaller vocabulary, KL with epsilon 1e-12,
   skip the step if KL < beta; else keep tokens with p_E >= alpha * max p_E and
   weight them by softmax(log p_E - log p_A) (the full plausible set).
It carries the reference's defects on purpose (re-tokenized prefixes, one amateur
pass per prefix, step 0 skipped): it is the baseline, not a method to use.
"""

from __future__ import annotations

import math
import time


def reference_sample_question(
    expert,
    amateur,
    tokenizer,
    question: str,
    *,
    system_prompt: str = "Please reason step by step.",
    alpha: float = 0.2,
    beta: float = 0.4,
    max_new_tokens: int = 128,
    batch_size: int = 64,
):
    """Run the reference algorithm on one question.

    Returns a dict: prompt_ids, completion_ids, rows (one per kept step, in the
    reference's JSONL shape), `all_steps` (for every step >= 1, the reference's `kl`)
    and what `add_diagnostics` needs (`prefixes`, `expert_logits`, `amateur_logits`).
    """
    import torch
    import torch.nn.functional as F

    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": question},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        generated = expert.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    prompt_len = inputs.input_ids.shape[1]
    completion = generated.sequences[0][prompt_len:].tolist()
    expert_logits = [score[0].float() for score in generated.scores]
    expert_probs = [F.softmax(logits, dim=-1) for logits in expert_logits]

    prefixes = []
    for step in range(1, len(completion)):
        prefix_text = text + tokenizer.decode(completion[:step])
        prefixes.append(tokenizer(prefix_text, return_tensors="pt").input_ids[0])
    amateur_logits = []
    with torch.no_grad():
        for start in range(0, len(prefixes), batch_size):
            chunk = prefixes[start : start + batch_size]
            padded = torch.nn.utils.rnn.pad_sequence(
                chunk, batch_first=True, padding_value=tokenizer.pad_token_id
            )
            mask = (padded != tokenizer.pad_token_id).long()
            logits = amateur(padded, attention_mask=mask).logits
            for row, ids in enumerate(chunk):
                amateur_logits.append(logits[row, len(ids) - 1].float())
    amateur_probs = [F.softmax(logits, dim=-1) for logits in amateur_logits]

    rows, all_steps = [], {}
    for step in range(1, len(completion)):
        p_e, p_a = expert_probs[step], amateur_probs[step - 1]
        size = min(p_e.shape[0], p_a.shape[0])
        p_e, p_a = p_e[:size], p_a[:size]
        mask = p_e >= alpha * p_e.max()
        kl = F.kl_div((p_a + 1e-12).log(), p_e + 1e-12, reduction="sum").item()
        all_steps[step] = {"kl": kl}
        if kl < beta:
            continue
        scores = (p_e + 1e-12).log() - (p_a + 1e-12).log()
        weights = torch.softmax(scores[mask], dim=-1)
        token_ids = torch.arange(size)[mask].tolist()
        rows.append(
            {
                "step": step,
                "prefix": tokenizer.decode(completion[:step]),
                "tokens": [tokenizer.decode([i]) for i in token_ids],
                "token_ids": token_ids,
                "weights": weights.tolist(),
                "kl_divergence": kl,
            }
        )
    return {
        "prompt_ids": inputs.input_ids[0].tolist(),
        "completion_ids": completion,
        "rows": rows,
        "all_steps": all_steps,
        "prefixes": prefixes,
        "expert_logits": expert_logits,
        "amateur_logits": amateur_logits,
    }


def add_diagnostics(result: dict, alpha: float = 0.2) -> dict:
    """Add to every step of `all_steps` what does not change the algorithm: `ids` (the
    re-tokenized prefix the amateur saw), `kl_exact` (the same two distributions, KL in
    float64 without the epsilon) and `min_plausible_amateur_prob` (how close the epsilon
    came to mattering for the weights). Run outside the timed region."""
    import torch.nn.functional as F

    prefixes = result.pop("prefixes")
    expert_logits, amateur_logits = result.pop("expert_logits"), result.pop("amateur_logits")
    for step, diag in result["all_steps"].items():
        size = min(expert_logits[step].shape[0], amateur_logits[step - 1].shape[0])
        log_e = F.log_softmax(expert_logits[step][:size].double(), dim=-1)
        log_a = F.log_softmax(amateur_logits[step - 1][:size].double(), dim=-1)
        plausible = log_e >= log_e.max() + math.log(alpha)
        diag["ids"] = prefixes[step - 1].tolist()
        diag["kl_exact"] = (log_e.exp() * (log_e - log_a)).sum().item()
        diag["min_plausible_amateur_prob"] = log_a[plausible].exp().min().item()
    return result


def reference_sample(expert, amateur, tokenizer, questions, **options):
    """The reference loop over questions (one at a time); returns (results with
    diagnostics, seconds each; the diagnostics are not timed)."""
    results, seconds = [], []
    for question in questions:
        start = time.perf_counter()
        result = reference_sample_question(expert, amateur, tokenizer, question, **options)
        seconds.append(time.perf_counter() - start)
        results.append(add_diagnostics(result, options.get("alpha", 0.2)))
    return results, seconds
