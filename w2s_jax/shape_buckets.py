"""Shape buckets: the few prompt widths batches are padded to, so that a run compiles few
programs.

Every distinct array shape is a compiled program (prefill, decoding loop, scoring), so
`w2s_jax.generate.left_pad` pads prompts to a bucket, not to their longest length: a
multiple of `multiple` up to 8 multiples, then at most STEPS_PER_DOUBLING widths per
doubling (with multiple 16: 16, 32, ..., 128, 160, 192, 224, 256, 320, ...), so padding
adds under 1/STEPS_PER_DOUBLING of the length and prompts of 60 to 250 tokens meet at
most 9 widths. The length groups of one batch (`w2s_jax.generate.length_groups`) take
one bucket per doubling (steps=1), as their widths combine into one program's shapes.
tests/test_shape_buckets.py counts the programs of a GSM8K-sized run.
"""

from __future__ import annotations

STEPS_PER_DOUBLING = 4


def bucket_width(length: int, multiple: int = 1, steps: int = STEPS_PER_DOUBLING) -> int:
    """The smallest bucket >= `length`: a multiple of `multiple`; above 2 * steps
    multiples, a multiple of 2^k multiples, so at most `steps` buckets per doubling."""
    units = -(-length // multiple)
    step = max(1, (1 << max(units - 1, 0).bit_length()) // (2 * steps))
    return -(-units // step) * step * multiple


def widths(limit: int, multiple: int = 1, steps: int = STEPS_PER_DOUBLING) -> list[int]:
    """Every bucket up to bucket_width(limit): the widths a run can meet."""
    found = [bucket_width(1, multiple, steps)]
    while found[-1] < limit:
        found.append(bucket_width(found[-1] + 1, multiple, steps))
    return found
