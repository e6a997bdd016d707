"""`w2s score` (SALT_DS scores) against transformers logits; KD-phase data selection."""

import json

import numpy as np
import pytest
from test_train import write_samples

from w2s_jax.cli import main
from w2s_jax.data.kd_selection import phased_steps, read_scores, top_share
from w2s_jax.data.packing import find_sample_files, iter_steps, load_trajectories
from w2s_jax.files import read_jsonl
from w2s_jax.run_folder import SettingsChanged
from w2s_jax.stages.score import ScoreSettings, score

TOKENS = 300


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tiny_qwen2_dir):
    return write_samples(tmp_path_factory.mktemp("score_samples"), tiny_qwen2_dir, n=5, seed=2)


def _reference(model_dir, samples, top_k):
    """Per record id: salt_ds, mean_loss, topk_hit_rate from float64 torch logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).double().eval()
    out = {}
    for _, record in read_jsonl(find_sample_files(samples)[0]):
        prompt, completion = record["prompt_ids"], record["completion_ids"]
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            z = model(input_ids=ids).logits[0].numpy()[:, :TOKENS]
        z = z[len(prompt) - 1 : -1]  # the logits that predict each completion token
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        target = np.asarray(completion)
        loss = -logp[np.arange(len(target)), target]
        hit = (z > z[np.arange(len(target)), target][:, None]).sum(-1) < top_k
        out[record["id"]] = {
            "salt_ds": float(np.median(loss[hit])) if hit.any() else None,
            "mean_loss": float(loss.mean()),
            "topk_hit_rate": float(hit.mean()),
        }
    return out


@pytest.mark.parametrize("top_k", [10, 120])
def test_scores_equal_a_numpy_computation_from_transformers_logits(
    tmp_path, tiny_qwen2_dir, samples, top_k
):
    settings = ScoreSettings(
        model=str(tiny_qwen2_dir),
        data=str(samples),
        out=str(tmp_path / "s"),
        top_k=top_k,
        batch_size=2,
        chunk_size=5,
        dtype="float32",
        length_bucket=16,
        progress=False,
    )
    summary = score(settings)
    want = _reference(tiny_qwen2_dir, samples, top_k)
    got = {r["id"]: r for _, r in read_jsonl(tmp_path / "s" / "shards" / "000000.jsonl")}
    assert summary["records"] == len(want) == len(got) == 5
    for rid, ref in want.items():
        for key in ("mean_loss", "topk_hit_rate"):
            np.testing.assert_allclose(got[rid][key], ref[key], rtol=1e-5)
        if ref["salt_ds"] is None:
            assert got[rid]["salt_ds"] is None
        else:
            np.testing.assert_allclose(got[rid]["salt_ds"], ref["salt_ds"], rtol=1e-5)
    assert sum(r["salt_ds"] is not None for r in want.values()) >= (1 if top_k == 10 else 5)


def test_score_resumes_shard_by_shard_and_refuses_other_settings(tmp_path, tiny_qwen2_dir, samples):
    argv = ["score", "--model", tiny_qwen2_dir, "--data", samples, "--out", tmp_path / "s"]
    argv += ["--shard-size", "2", "--dtype", "float32", "--no-progress"]
    assert main([str(a) for a in argv]) == 0
    shards = sorted((tmp_path / "s" / "shards").glob("*.jsonl"))
    assert [p.name for p in shards] == ["000000.jsonl", "000001.jsonl", "000002.jsonl"]
    before = shards[1].read_bytes()
    shards[1].unlink()
    assert main([str(a) for a in [*argv, "--batch-size", "1"]]) == 0  # a free setting
    assert shards[1].read_bytes() == before
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["records"] == 5
    with pytest.raises(SettingsChanged, match="top_k: 10 -> 3"):
        score(
            ScoreSettings(
                model=str(tiny_qwen2_dir),
                data=str(samples),
                out=str(tmp_path / "s"),
                top_k=3,
                shard_size=2,
                dtype="float32",
            )
        )


def test_kd_phase_draws_from_the_top_scored_records_then_from_all(tmp_path, samples):
    trajectories, _ = load_trajectories(find_sample_files(samples), objective="sft")
    scores = {t.id: float(i) for i, t in enumerate(trajectories)}
    scores[trajectories[0].id] = float("nan")
    subset = top_share(trajectories, scores, 0.4)
    assert subset == [3, 4]
    stream = dict(positions_per_step=6, micro_batches=2, seed=1)
    stream_steps = phased_steps(trajectories, subset, kd_steps=5, **stream)
    steps = [(i, next(stream_steps)) for i in range(8)]
    used = [{s.trajectory for micro in step for s in micro} for _, step in steps]
    assert all(u <= {3, 4} for u in used[:5])
    full = iter_steps(trajectories, **stream)
    assert [step for _, step in steps[5:]] == [next(full) for _ in range(3)]
    resumed = phased_steps(trajectories, subset, kd_steps=5, start_step=3, **stream)
    assert [next(resumed) for _ in range(5)] == [step for _, step in steps[3:8]]


def test_training_with_kd_data_selection(tmp_path, tiny_qwen2_dir, tiny_qwen2_amateur_dir, samples):
    argv = ["score", "--model", tiny_qwen2_amateur_dir, "--data", samples, "--out", tmp_path / "s"]
    assert main([str(a) for a in [*argv, "--top-k", "100", "--no-progress"]]) == 0
    scores, _ = read_scores(tmp_path / "s")
    assert len(scores) == 5
    argv = ["train", "--samples", samples, "--expert", tiny_qwen2_dir, "--out", tmp_path / "t"]
    argv += ["--objective", "salt", "--teacher", tiny_qwen2_amateur_dir, "--kd-steps", "2"]
    argv += ["--steps", "3", "--batch-positions", "4", "--length-bucket", "32", "--no-progress"]
    argv += ["--kd-data-selection", "top=40%", "--kd-scores", tmp_path / "s", "--dtype", "float32"]
    assert main([str(a) for a in argv]) == 0
    log = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["step"] == 3
    with pytest.raises(SystemExit, match="--kd-data-selection must be top=P%"):
        main([str(a) for a in [*argv[:-4], "--kd-data-selection", "40", "--kd-scores", "x"]])
