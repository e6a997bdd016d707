"""Shape buckets: the bucket rule, and the number of distinct compiled programs that `w2s
sample` and `w2s eval` meet on a GSM8K-like run, counted from the shapes `generate` builds
(and checked against the jitted functions' own caches on a tiny model)."""

import numpy as np
import pytest

from w2s_jax import generate as gen
from w2s_jax.shape_buckets import bucket_width, widths

TEMPLATE = 45  # Qwen2.5's chat template with its system prompt and an instruction, in tokens


def gsm8k_like_prompts(n: int = 1319, seed: int = 0) -> list[list[int]]:
    """Synthetic stand-ins for GSM8K's 1,319 test questions in Qwen2.5's chat template:
    one shared 45-token template, then the question: log-normal length (median 65 tokens,
    sigma 0.38) clipped to 15..205, so prompts run 60..250 tokens, median ~110; first
    words Zipf-distributed (a few are common, as "A" and "John" are)."""
    rng = np.random.default_rng(seed)
    own = np.clip(np.round(rng.lognormal(np.log(65), 0.38, n)), 15, 205).astype(int)
    first_words = rng.zipf(1.6, n) % 400 + 1000
    template = list(range(100, 100 + TEMPLATE))
    return [
        template + [int(word)] + rng.integers(2000, 30000, k - 1).tolist()
        for word, k in zip(first_words, own, strict=True)
    ]


def sample_batches(prompts, size=8):
    """`w2s sample`'s batches: data order, the last one filled up with its first prompt."""
    batches = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    batches[-1] += [batches[-1][0]] * (size - len(batches[-1]))
    return batches


def eval_batches(prompts, size=16):
    """`w2s eval`'s batches: longest first, the last one short."""
    order = sorted(prompts, key=lambda p: -len(p))
    return [order[i : i + size] for i in range(0, len(order), size)]


def programs(batches, *, groups=4, multiple=16, new_tokens=8):
    """The distinct static signatures of generate's jitted functions over `batches`:
    {function name: set of signatures} (groups=1: a model sharded over a mesh)."""
    seen = {"prefix": set(), "prefill": set(), "start": set(), "decode": set()}
    for batch in batches:
        prefix = gen.shared_prefix_length(batch)
        ids, _ = gen.left_pad(batch, 0, multiple, prefix_len=prefix)
        p = ids.shape[1]
        rows = gen.length_groups(batch, count=groups, prefix_len=prefix, width=p, multiple=multiple)
        shapes = tuple((len(r), prefix + w) for r, w in rows)
        in_order = np.array_equal(np.concatenate([r for r, _ in rows]), np.arange(len(batch)))
        seen["prefix"] |= {prefix} if prefix else set()
        seen["prefill"] |= {(n, w, prefix) for n, w in shapes}
        seen["start"].add((shapes, p, prefix, p + new_tokens, in_order))
        seen["decode"].add((len(batch), p))
    return seen


def counts(batches, **kwargs) -> dict[str, int]:
    return {name: len(found) for name, found in programs(batches, **kwargs).items()}


@pytest.mark.parametrize("multiple", [1, 8, 16, 24])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_bucket_width_pads_little_into_few_widths(multiple, steps):
    found = [bucket_width(n, multiple, steps) for n in range(1, 5000)]
    assert all(b >= n and b % multiple == 0 for n, b in enumerate(found, start=1))
    assert all(b - n < max(multiple, b / steps) for n, b in enumerate(found, start=1))
    assert found == sorted(found)
    assert sorted(set(found)) == widths(4999, multiple, steps)
    doublings = np.log2(4999 / (2 * steps * multiple))
    assert len(set(found)) <= 2 * steps + steps * (doublings + 1)


def test_widths_of_gsm8k_prompts():
    assert widths(256, 16) == [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    assert {bucket_width(n, 16) for n in range(60, 251)} == {
        64, 80, 96, 112, 128, 160, 192, 224, 256
    }  # fmt: skip


def multiples_only(length, multiple=1, steps=None):
    """No buckets: every multiple of `multiple` is a width."""
    return -(-length // multiple) * multiple


def test_program_counts_of_a_gsm8k_run(monkeypatch):
    """The numbers in the docs: distinct programs per generate function for 1,319
    GSM8K-like prompts, with the buckets and with every multiple of 16 a width."""
    prompts = gsm8k_like_prompts()
    lengths = [len(p) for p in prompts]
    assert (min(lengths), int(np.median(lengths)), max(lengths)) == (60, 109, 250)
    stages = {"sample": sample_batches(prompts), "eval": eval_batches(prompts)}

    def every_count():
        return {
            (stage, groups): counts(batches, groups=groups)
            for stage, batches in stages.items()
            for groups in (4, 1)
        }

    after = every_count()
    monkeypatch.setattr(gen, "bucket_width", multiples_only)
    assert every_count() == {
        ("sample", 4): {"prefix": 1, "prefill": 20, "start": 90, "decode": 10},
        ("sample", 1): {"prefix": 1, "prefill": 10, "start": 10, "decode": 10},
        ("eval", 4): {"prefix": 1, "prefill": 16, "start": 11, "decode": 11},
        ("eval", 1): {"prefix": 1, "prefill": 11, "start": 11, "decode": 11},
    }
    assert after == {
        ("sample", 4): {"prefix": 1, "prefill": 11, "start": 23, "decode": 6},
        ("sample", 1): {"prefix": 1, "prefill": 7, "start": 7, "decode": 6},
        ("eval", 4): {"prefix": 1, "prefill": 12, "start": 10, "decode": 9},
        ("eval", 1): {"prefix": 1, "prefill": 10, "start": 10, "decode": 9},
    }


def test_counted_programs_are_the_compiled_ones(tiny_qwen2_dir):
    """The signatures `programs` counts are exactly the programs jax compiles."""
    from w2s_jax.models import load_pretrained

    model = load_pretrained(tiny_qwen2_dir, dtype="float32")
    rng = np.random.default_rng(1)
    template = [5, 6, 7]
    batches = [
        [template + rng.integers(10, 200, n).tolist() for n in lengths]
        for lengths in ([4, 30, 9, 12], [2, 5, 3, 40], [14, 18, 20, 17], [33, 3, 60, 7])
    ]
    jitted = {
        "prefix": gen._prefix_cache,
        "prefill": gen._prefill_rows,
        "start": gen._start_decoding,
        "decode": gen._decode,
    }
    for function in jitted.values():
        function.clear_cache()
    for batch in batches:
        gen.generate(model, batch, max_new_tokens=8, eos_ids=[1])
    compiled = {name: function._cache_size() for name, function in jitted.items()}
    assert compiled == counts(batches, new_tokens=8)
    assert compiled["decode"] < len(batches)  # buckets shared some
