"""Training data: sample records -> trajectories -> packed, length-bucketed steps (no model)."""

import json
import random
from collections import Counter

import numpy as np
import pytest

from w2s_jax.data.packing import (
    collate_step,
    find_sample_files,
    iter_steps,
    load_trajectories,
    samples_fingerprint,
)
from w2s_jax.files import DataError


def _record(rid, prompt, completion, positions, rng):
    ids, weights = [], []
    for _ in positions:
        k = rng.randint(1, 4)
        w = [rng.random() + 0.1 for _ in range(k)]  # unsorted: the loader sorts
        ids.append(rng.sample(range(3, 300), k))
        weights.append([x / sum(w) for x in w])
    return {
        "id": rid,
        "prompt_ids": prompt,
        "completion_ids": completion,
        "kl": [0.0] * len(completion),
        "positions": positions,
        "target_ids": ids,
        "target_weights": weights,
    }


def _write(folder, records, name="p000-00000.jsonl"):
    shard = folder / "samples" / name
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_text("".join(json.dumps(r) + "\n" for r in records))
    return shard


def _random_records(n, seed=0):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(1, 8))]
        completion = [rng.randrange(3, 300) for _ in range(rng.randint(1, 20))]
        positions = sorted(rng.sample(range(len(completion)), rng.randint(0, len(completion))))
        records.append(_record(f"q{i}", prompt, completion, positions, rng))
    return records


def test_trajectory_indices_and_cut(tmp_path):
    rng = random.Random(1)
    rec = _record("a", [10, 11, 12], [20, 21, 22, 23, 24, 25], [0, 2, 3], rng)
    _write(tmp_path, [rec, _record("empty", [5], [6, 7], [], rng)])
    (traj,), stats = load_trajectories(find_sample_files(tmp_path), vocab_size=320)
    # completion position t is predicted by the logits at prompt_len + t - 1
    np.testing.assert_array_equal(traj.logit_index, [2, 4, 5])
    # tokens after the last predicted one are never needed
    np.testing.assert_array_equal(traj.input_ids, [10, 11, 12, 20, 21, 22])
    assert traj.target_ids.shape == (3, max(len(i) for i in rec["target_ids"]))
    for j, (ids, w) in enumerate(zip(rec["target_ids"], rec["target_weights"], strict=True)):
        order = np.argsort(w)[::-1]  # stored heaviest first
        np.testing.assert_array_equal(traj.target_ids[j, : len(ids)], np.array(ids)[order])
        np.testing.assert_allclose(traj.target_weights[j, : len(w)], np.array(w)[order], rtol=1e-6)
        assert np.all(traj.target_weights[j, len(w) :] == 0)
    k = traj.target_ids.shape[1]
    assert stats == {"records": 2, "trajectories": 1, "positions": 3, "tokens": 6, "k": k}


def test_sft_targets_are_the_completion_tokens(tmp_path):
    _write(tmp_path, [{"prompt_ids": [1, 2], "completion_ids": [7, 8, 9]}])
    (traj,), _ = load_trajectories(find_sample_files(tmp_path), objective="sft")
    np.testing.assert_array_equal(traj.logit_index, [1, 2, 3])
    np.testing.assert_array_equal(traj.target_ids[:, 0], [7, 8, 9])
    np.testing.assert_array_equal(traj.target_weights[:, 0], [1, 1, 1])
    np.testing.assert_array_equal(traj.input_ids, [1, 2, 7, 8])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"positions": [0, 9]}, r"'positions' has value 9 outside \[0, 6\)"),
        ({"positions": [2, 1]}, "strictly increasing"),
        ({"prompt_ids": []}, "'prompt_ids' is empty"),
        ({"completion_ids": [1, 999, 2, 3, 4, 5]}, "value 999 outside"),
        ({"target_ids": [[1]]}, "2 positions but 1 target_ids"),
        ({"target_weights": [[0.5, 0.7], [1.0]]}, r"sum to \(0, 1\]"),
        ({"target_weights": [[1.0], [1.0]]}, "as long as target_ids"),
        ({"positions": None}, "'positions' must be a list of integers"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, change, message):
    good = {
        "id": "x",
        "prompt_ids": [1, 2],
        "completion_ids": [3, 4, 5, 6, 7, 8],
        "positions": [1, 3],
        "target_ids": [[4, 9], [6]],
        "target_weights": [[0.7, 0.3], [1.0]],
    }
    shard = _write(tmp_path, [good | {"id": "ok"}, good | change])
    with pytest.raises(DataError, match=message) as info:
        load_trajectories([shard], vocab_size=320)
    assert f"{shard}:2" in str(info.value)


def test_missing_and_empty_samples(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_sample_files(tmp_path / "nope")
    with pytest.raises(DataError, match="no samples"):
        find_sample_files(tmp_path)
    shard = _write(tmp_path, [])
    with pytest.raises(DataError, match="no records"):
        load_trajectories([shard])
    rng = random.Random(0)
    _write(tmp_path, [_record("a", [1], [2, 3], [], rng)])
    with pytest.raises(DataError, match="none of the 1 records"):
        load_trajectories([shard])
    _write(tmp_path, [{"id": "a", "prompt_ids": [1], "completion_ids": [2]}] * 2)
    with pytest.raises(DataError, match="id 'a' already used"):
        load_trajectories([shard], objective="sft")


def test_steps_cover_every_position_once_per_epoch(tmp_path):
    _write(tmp_path, _random_records(40))
    trajectories, stats = load_trajectories(find_sample_files(tmp_path))
    total, per_micro, accum = stats["positions"], 6, 3
    epochs = 3
    steps = iter_steps(trajectories, positions_per_step=per_micro * accum, micro_batches=accum)
    seen = Counter()
    n_steps = epochs * total // (per_micro * accum)
    for _ in range(n_steps):
        step = next(steps)
        assert len(step) == accum
        for micro in step:
            assert sum(s.stop - s.start for s in micro) == per_micro
            for s in micro:
                seen.update((s.trajectory, j) for j in range(s.start, s.stop))
    consumed = n_steps * per_micro * accum
    # whole epochs see each position `epochs` times; the partial one at most one more
    assert sum(seen.values()) == consumed
    assert set(seen) == {(i, j) for i, t in enumerate(trajectories) for j in range(t.num_positions)}
    assert max(seen.values()) <= epochs and min(seen.values()) >= epochs - 1


def test_steps_are_seeded_and_skippable(tmp_path):
    _write(tmp_path, _random_records(30))
    trajectories, _ = load_trajectories(find_sample_files(tmp_path))
    kw = dict(positions_per_step=8, micro_batches=2, bucket_window=5)
    a = iter_steps(trajectories, seed=3, **kw)
    first = [next(a) for _ in range(12)]
    b = iter_steps(trajectories, seed=3, start_step=7, **kw)
    assert [next(b) for _ in range(5)] == first[7:]
    c = iter_steps(trajectories, seed=4, **kw)
    assert [next(c) for _ in range(12)] != first
    with pytest.raises(ValueError, match="positive multiple"):
        next(iter_steps(trajectories, positions_per_step=7, micro_batches=2))


def test_length_buckets_group_similar_lengths(tmp_path):
    _write(tmp_path, _random_records(64, seed=2))
    trajectories, _ = load_trajectories(find_sample_files(tmp_path))
    lengths = np.array([len(t.input_ids) for t in trajectories])

    def spread(window):
        steps = iter_steps(
            trajectories, positions_per_step=16, micro_batches=1, bucket_window=window
        )
        return np.mean([np.ptp(lengths[[s.trajectory for s in next(steps)[0]]]) for _ in range(20)])

    assert spread(len(trajectories)) < spread(1)


def test_collate_step_layout(tmp_path):
    _write(tmp_path, _random_records(20, seed=5))
    trajectories, stats = load_trajectories(find_sample_files(tmp_path))
    step = next(iter_steps(trajectories, positions_per_step=12, micro_batches=2, seed=1))
    arrays = collate_step(
        trajectories, step, k=stats["k"], pad_id=0, length_bucket=8, row_multiple=2
    )
    a, r, t = arrays["input_ids"].shape
    assert a == 2 and r % 2 == 0 and r & (r - 1) == 0 and t % 8 == 0
    assert arrays["flat_index"].shape == (2, 6)
    assert arrays["target_ids"].shape == arrays["target_weights"].shape == (2, 6, stats["k"])
    for m, micro in enumerate(step):
        p = 0
        for row, seg in enumerate(micro):
            traj = trajectories[seg.trajectory]
            for j in range(seg.start, seg.stop):
                flat = arrays["flat_index"][m, p]
                assert divmod(flat, t) == (row, traj.logit_index[j])
                # the context row holds the trajectory's tokens up to the predicting position
                n = traj.logit_index[j] + 1
                np.testing.assert_array_equal(arrays["input_ids"][m, row, :n], traj.input_ids[:n])
                assert arrays["attention_mask"][m, row, :n].all()
                kk = traj.target_ids.shape[1]
                np.testing.assert_array_equal(arrays["target_ids"][m, p, :kk], traj.target_ids[j])
                np.testing.assert_array_equal(
                    arrays["target_weights"][m, p, :kk], traj.target_weights[j]
                )
                assert not arrays["target_weights"][m, p, kk:].any()
                p += 1
        assert arrays["attention_mask"][m, len(micro) :].sum() == 0


def test_samples_fingerprint_changes_with_content(tmp_path):
    shard = _write(tmp_path, _random_records(3))
    before = samples_fingerprint([shard])
    assert samples_fingerprint([shard]) == before
    shard.write_text(shard.read_text().replace('"q0"', '"q9"'))
    assert samples_fingerprint([shard]) != before
