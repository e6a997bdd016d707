"""The sample record schema: one JSON line of samples/*.jsonl, written and checked in one place."""

import json

import pytest

from w2s_jax.files import DataError
from w2s_jax.records import TOKEN_FIELDS, SampleRecord

GOOD = {
    "id": "q1",
    "prompt_ids": [1, 2],
    "completion_ids": [3, 4, 5, 6],
    "kl": [0.0, 0.5, 2.25, 0.125],
    "positions": [1, 2],
    "target_ids": [[4, 9], [5]],
    "target_weights": [[0.75, 0.25], [1.0]],
}


def test_json_round_trip_is_byte_identical():
    record = SampleRecord.from_json(GOOD, where="s.jsonl:1", vocab_size=10)
    assert record.to_json() == GOOD
    compact = dict(ensure_ascii=False, separators=(",", ":"))
    assert json.dumps(record.to_json(), **compact) == json.dumps(GOOD, **compact)
    assert list(record.to_json()) == list(GOOD)  # field order as written by `w2s sample`


def test_training_records_need_only_the_tokens():
    sft = SampleRecord.from_json(
        {"prompt_ids": [1], "completion_ids": [2]}, where="a:1", required=TOKEN_FIELDS
    )
    assert (sft.id, sft.kl, sft.positions) == (None, None, None)
    assert sft.to_json() == {"prompt_ids": [1], "completion_ids": [2]}
    assert SampleRecord.from_json(GOOD | {"id": 7}, where="a:1").id == "7"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kl": [0.0]}, "1 kl values for 4 completion tokens"),
        ({"kl": [0.0, "x", 1.0, 1.0]}, "field 'kl' must be a list of numbers"),
        ({"id": ["q"]}, "field 'id' must be a string, got list"),
        ({"completion_ids": [3, 4, 5, 10]}, r"'completion_ids' has value 10 outside \[0, 10\)"),
        ({"target_ids": [[4, 10], [5]]}, r"'target_ids\[0\]' has value 10 outside \[0, 10\)"),
        ({"target_ids": [[], [5]]}, r"target_weights\[0\] .* \(got 0 ids and 2 weights\)"),
        ({"target_weights": [[0.75, -0.25], [1.0]]}, r"finite, >= 0 and sum to \(0, 1\]"),
        ({"target_weights": [[0.75, float("nan")], [1.0]]}, "got sum nan"),
        ({"positions": [2, 2]}, "strictly increasing"),
        ({"positions": [1, 4]}, r"'positions' has value 4 outside \[0, 4\)"),
    ],
)
def test_bad_fields_name_the_file_and_line(change, message):
    with pytest.raises(DataError, match=message) as info:
        SampleRecord.from_json(GOOD | change, where="s.jsonl:3", vocab_size=10)
    assert str(info.value).startswith("s.jsonl:3: ")


def test_missing_fields_are_listed():
    partial = {k: v for k, v in GOOD.items() if k not in ("kl", "target_ids")}
    with pytest.raises(DataError, match="s.jsonl:2: fields 'kl', 'target_ids' are missing"):
        SampleRecord.from_json(partial, where="s.jsonl:2")
    # targets come all together, even where they are not required
    with pytest.raises(DataError, match="field 'target_ids' is missing"):
        SampleRecord.from_json(partial, where="s.jsonl:2", required=TOKEN_FIELDS)
