"""`w2s sample` end to end on tiny random Qwen2 checkpoints, against independent references.

References: HF transformers (PyTorch) run on each prefix alone, as the published
code does, and a float64 numpy implementation of docs/METHOD.md §1 on those logits.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tolerances import decoder_bound

from w2s_jax import sample_store
from w2s_jax.cli import main
from w2s_jax.files import atomic_write_json, atomic_write_jsonl, read_jsonl
from w2s_jax.prompts import SAMPLE_SYSTEM_PROMPT

QUESTIONS = [
    "how many apples does Tom have if he has 3 boxes of 4 apples",
    "what is the total cost of 3 books and 4 pens",
    "the students have 12 pens and 5 books, how many more pens",
    "each ticket costs 7 coins, what is the price of 6 tickets",
    "if a has 9 oranges and gives 4, then how many",
    "sum of 1234 and 4321",
]
ALPHA, BETA, TOP_K, NEW_TOKENS = 0.2, 2.0, 16, 16
BASE = ["--batch-size", "4", "--max-new-tokens", str(NEW_TOKENS), "--mesh", "data=4,tensor=2"]
BASE += ["--alpha", str(ALPHA), "--beta", str(BETA), "--top-k", str(TOP_K)]


def run_sample(argv: list[str]) -> int:
    """`w2s sample ARGV` through the command line (errors: SystemExit("error: ..."))."""
    return main(["sample", *[str(a) for a in argv]])


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("questions") / "q.jsonl"
    atomic_write_jsonl(
        path, [{"id": f"q{i}", "question": q, "answer": "#### 1"} for i, q in enumerate(QUESTIONS)]
    )
    return path


@pytest.fixture(scope="module")
def models(tiny_qwen2_dir, tiny_qwen2_amateur_dir):
    return ["--expert", tiny_qwen2_dir, "--amateur", tiny_qwen2_amateur_dir]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, models, questions_file):
    """An uninterrupted run: 6 questions in batches of 4 (the second one partial)."""
    out = tmp_path_factory.mktemp("full") / "out"
    ref = out.parent / "ref.jsonl"
    argv = [*models, "--data", questions_file, "--out", out, *BASE, "--export-reference", ref]
    assert run_sample(argv) == 0
    return out


@pytest.fixture(scope="module")
def records(full_run):
    return {r["id"]: r for r in sample_store.read_samples(full_run)}


@pytest.fixture(scope="module")
def prefix_logits(records, tiny_qwen2_dir, tiny_qwen2_amateur_dir, tiny_tokenizer_dir):
    """Float64 log-probs of expert and amateur on every prefix prompt + completion[:t],
    each prefix run alone through HF PyTorch, cut to the tokenizer's size, and both raw
    logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir)))
    expert = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir)).eval()
    amateur = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_amateur_dir)).eval()
    out = {}
    with torch.no_grad():
        for qid, record in records.items():
            prompt, completion = record["prompt_ids"], record["completion_ids"]
            rows = []
            for t in range(len(completion)):
                ids = torch.tensor([prompt + completion[:t]])
                e, a = expert(ids).logits[0, -1].double(), amateur(ids).logits[0, -1].double()
                rows.append(
                    (
                        torch.log_softmax(e[:vocab], -1).numpy(),
                        torch.log_softmax(a[:vocab], -1).numpy(),
                        e.numpy(),
                        a.numpy(),
                    )
                )
            out[qid] = rows
    return out, vocab


def logits_bound(record, raw_e, raw_a):
    """Float32 bound on |w2s_jax - transformers| logits at one position: the expert's
    (2 layers, hidden 64, intermediate 128) plus the amateur's (1 layer, hidden 32,
    intermediate 64), over the record's prompt + completion, each at its logits' scale."""
    positions = len(record["prompt_ids"]) + len(record["completion_ids"])
    expert = decoder_bound(raw_e, layers=2, hidden=64, intermediate=128, positions=positions)
    return expert + decoder_bound(raw_a, layers=1, hidden=32, intermediate=64, positions=positions)


def kl_bound(record, logp_e, logp_a, raw_e, raw_a):
    """A log-prob moves by at most twice its logits' error (its own and the normaliser's,
    a p-weighted mean of them), so KL = sum p (log p - log q) moves by at most
    2 * (logit error) * (1 + sum p |log p - log q|)."""
    spread = np.sum(np.exp(logp_e) * np.abs(logp_e - logp_a))
    return 2 * logits_bound(record, raw_e, raw_a) * (1 + spread)


def weights_bound(record, raw_e, raw_a):
    """Target weights (at most 1): the scores log pE - log pA move by at most twice the
    logits' error, and a softmax's outputs by at most twice its inputs' (relative)."""
    return 4 * logits_bound(record, raw_e, raw_a)


def test_rollouts_are_greedy_and_single_pass_kl_equals_per_prefix_kl(records, prefix_logits):
    logits, vocab = prefix_logits
    assert sorted(records) == [f"q{i}" for i in range(len(QUESTIONS))]
    checked = 0
    for qid, record in records.items():
        completion = record["completion_ids"]
        assert 1 <= len(completion) <= NEW_TOKENS and max(completion) < vocab
        for t, (logp_e, logp_a, raw_e, raw_a) in enumerate(logits[qid]):
            kl = float(np.sum(np.exp(logp_e) * (logp_e - logp_a)))
            bound = kl_bound(record, logp_e, logp_a, raw_e, raw_a)
            assert abs(record["kl"][t] - kl) < bound, (qid, t, record["kl"][t], kl, bound)
            top2 = np.sort(raw_e[:vocab])[-2:]
            if top2[1] - top2[0] > 1e-4:  # the expert's greedy token (no near-tie)
                assert completion[t] == int(np.argmax(raw_e[:vocab]))
                checked += 1
    assert checked > 0.9 * sum(len(r["completion_ids"]) for r in records.values())


def numpy_target(logp_e, logp_a, alpha, k):
    """docs/METHOD.md §1 in float64: plausible set, softmax(log πE − log πA), top-k renormalized.

    Returns (ids, weights, dropped mass) or None when the set or the order is ambiguous.
    """
    margin = logp_e - logp_e.max() - math.log(alpha)
    if np.any(np.abs(margin) < 1e-6):
        return None
    plausible = np.flatnonzero(margin >= 0)
    score = logp_e[plausible] - logp_a[plausible]
    weights = np.exp(score - score.max())
    weights /= weights.sum()
    order = np.argsort(-weights, kind="stable")
    sorted_w = weights[order]
    if np.any(np.abs(np.diff(sorted_w[: k + 1])) < 1e-7):
        return None
    kept = sorted_w[:k]
    return plausible[order[:k]], kept / kept.sum(), 1.0 - kept.sum()


def test_selected_positions_and_targets_equal_numpy(full_run, records, prefix_logits):
    logits, _ = prefix_logits
    compared = dropped_total = selected_total = 0
    for qid, record in records.items():
        kls = [float(np.sum(np.exp(e) * (e - a))) for e, a, *_ in logits[qid]]
        expected = [t for t, kl in enumerate(kls) if kl > BETA]
        assert all(abs(kl - BETA) > 1e-5 for kl in kls)  # no ambiguous threshold case
        assert record["positions"] == expected
        for t, ids, weights in zip(
            record["positions"], record["target_ids"], record["target_weights"], strict=True
        ):
            e, a, raw_e, raw_a = logits[qid][t]
            reference = numpy_target(e, a, ALPHA, TOP_K)
            selected_total += 1
            if reference is None:
                continue
            ref_ids, ref_weights, dropped = reference
            assert ids == ref_ids.tolist()
            bound = weights_bound(record, raw_e, raw_a)  # a wrong score or set: O(0.1)
            np.testing.assert_allclose(weights, ref_weights, atol=bound, rtol=0)
            assert abs(sum(weights) - 1.0) < 1e-5  # 16 float32 weights normalised: <= 4e-6
            dropped_total += dropped
            compared += 1
    assert compared > 0.9 * selected_total
    positions = sum(len(r["kl"]) for r in records.values())
    assert 0 < selected_total < positions  # β splits the positions: both branches tested

    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["selected"] == selected_total and summary["positions"] == positions
    assert summary["max_dropped_mass"] > 0  # the top-k bound was exercised
    if compared == selected_total:
        assert summary["mean_dropped_mass"] == pytest.approx(dropped_total / compared, abs=1e-6)


def test_outputs_manifest_and_reference_export(full_run, records, tiny_qwen2_dir):
    from w2s_jax import fingerprint
    from w2s_jax.models import load_tokenizer

    manifest = sample_store.read_manifest(full_run)
    tokenizer = load_tokenizer(tiny_qwen2_dir)
    assert manifest["expert_weights_fingerprint"] == fingerprint.weights_fingerprint(tiny_qwen2_dir)
    assert manifest["tokenizer_fingerprint"] == fingerprint.tokenizer_fingerprint(tokenizer)
    assert manifest["settings"]["beta"] == BETA and manifest["vocab_size"] == len(tokenizer)
    assert manifest["prompt_example"] == (  # sampling's default system prompt, not eval's
        f"<|im_start|>system\n{SAMPLE_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (full_run / "kl_histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in sample_store.shard_paths(full_run)] == [
        "p000-00000.jsonl",
        "p000-00001.jsonl",
    ]
    rows = [json.loads(line) for line in (full_run.parent / "ref.jsonl").read_text().splitlines()]
    assert len(rows) == sum(len(r["positions"]) for r in records.values())
    first = rows[0]
    record = records[first["prompt_id"]]
    assert first["step"] == record["positions"][0]
    assert first["token_ids"] == record["target_ids"][0]
    assert first["prefix"] == tokenizer.decode(record["completion_ids"][: first["step"]])


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_after_kill_gives_identical_dataset(
    tmp_path, models, questions_file, full_run, monkeypatch, capsys
):
    """Killed while writing the second batch (sidecar written, shard only a temp file)."""
    out = tmp_path / "out"
    real_write = sample_store.write_shard
    calls = []

    def write_then_die(out_dir, records, stats, *, process_index):
        calls.append(len(records))
        if len(calls) == 1:
            return real_write(out_dir, records, stats, process_index=process_index)
        shard = out_dir / "samples" / "p000-00001.jsonl"
        atomic_write_json(shard.with_name("p000-00001.stats.json"), {"partial": 1})
        (shard.parent / ".p000-00001.jsonl.abc.tmp").write_text('{"id": "q4", "prompt')
        raise KeyboardInterrupt("simulated SIGKILL")

    monkeypatch.setattr(sample_store, "write_shard", write_then_die)
    argv = [*models, "--data", questions_file, "--out", out, *BASE]
    with pytest.raises(KeyboardInterrupt):
        run_sample(argv)
    assert sample_store.finished_ids(out) == {"q0", "q1", "q2", "q3"}
    monkeypatch.setattr(sample_store, "write_shard", real_write)
    capsys.readouterr()
    assert run_sample(argv) == 0
    assert "resuming" in capsys.readouterr().out

    resumed, full = _snapshot(out / "samples"), _snapshot(full_run / "samples")
    assert sorted(resumed) == sorted(full)  # no temp file left, no extra shard
    for name in full:
        if name.suffix == ".jsonl":
            assert resumed[name] == full[name], name
        else:  # stats sidecars: identical except the timing
            old, new = json.loads(full[name]), json.loads(resumed[name])
            assert {k: v for k, v in old.items() if k != "wall_time_s"} == {
                k: v for k, v in new.items() if k != "wall_time_s"
            }
    # A third run finds nothing to do and leaves the samples as they are.
    assert run_sample(argv) == 0
    assert _snapshot(out / "samples") == resumed


def test_ablation_switches(tmp_path, models, questions_file, records):
    out = tmp_path / "no_select"
    assert run_sample([*models, "--data", questions_file, "--out", out, *BASE, "--no-select"]) == 0
    for record in sample_store.read_samples(out):
        full = records[record["id"]]
        assert record["completion_ids"] == full["completion_ids"]
        assert record["positions"] == list(range(len(record["completion_ids"])))
        by_position = dict(zip(full["positions"], full["target_ids"], strict=True))
        for t, ids in zip(record["positions"], record["target_ids"], strict=True):
            assert t not in by_position or ids == by_position[t]

    out = tmp_path / "no_contrast"
    assert (
        run_sample([*models, "--data", questions_file, "--out", out, *BASE, "--no-contrast"]) == 0
    )
    for record in sample_store.read_samples(out):
        full = records[record["id"]]
        assert record["positions"] == full["positions"]
        assert record["target_ids"] == [[record["completion_ids"][t]] for t in record["positions"]]
        assert record["target_weights"] == [[1.0]] * len(record["positions"])


def test_changed_settings_are_refused(full_run, models, questions_file):
    before = _snapshot(full_run)
    argv = [*models, "--data", questions_file, "--out", full_run, *BASE, "--beta", "1.0"]
    with pytest.raises(SystemExit, match=r"different settings.*beta: 2.0 -> 1.0"):
        run_sample(argv)
    assert _snapshot(full_run) == before


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("malformed", r"q\.jsonl:2: not valid JSON"),
        ("empty_question", r"q\.jsonl:2: field 'question' is missing or empty"),
        ("alpha", r"--alpha must lie in \(0.0, 1.0\], got 1.5"),
        ("beta", r"--beta must be a finite number >= 0.0, got -0.5"),
        ("missing_model", r"expert model folder .*nowhere does not exist"),
    ],
)
def test_bad_input_is_refused_before_any_output(case, message, tmp_path, models, tiny_qwen2_dir):
    data = tmp_path / "q.jsonl"
    second = {"malformed": '{"question": "x"\n', "empty_question": '{"question": "  "}\n'}
    data.write_text('{"question": "fine"}\n' + second.get(case, '{"question": "ok"}\n'))
    argv = [*models, "--data", data, "--out", tmp_path / "out", *BASE]
    extra = {
        "alpha": ["--alpha", "1.5"],
        "beta": ["--beta", "-0.5"],
        "missing_model": ["--expert", tmp_path / "nowhere"],
    }
    with pytest.raises(SystemExit, match=message):
        run_sample(argv + extra.get(case, []))
    assert not (tmp_path / "out").exists()


def test_config_file_through_the_cli(tmp_path, full_run, models, questions_file, capsys):
    """`w2s sample --config FILE` with flags overriding: here a finished run, resumed."""
    from w2s_jax import cli

    config = tmp_path / "sample.toml"
    config.write_text(
        f'expert = "{models[1]}"\namateur = "{models[3]}"\ndata = "{questions_file}"\n'
        f"alpha = {ALPHA}\nbeta = 0.9\ntop_k = {TOP_K}\nmax_new_tokens = {NEW_TOKENS}\n"
        'batch_size = 4\nmesh = "data=4,tensor=2"\n'
    )
    before = _snapshot(full_run / "samples")
    assert (
        cli.main(["sample", "--config", str(config), "--out", str(full_run), "--beta", "2.0"]) == 0
    )
    assert "resuming" in capsys.readouterr().out
    assert _snapshot(full_run / "samples") == before


def test_sigkill_mid_run_then_resume_gives_identical_dataset(
    tmp_path, models, questions_file, full_run
):
    """A real `w2s sample` process, SIGKILLed as soon as its first shard lands."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    argv = [*models, "--data", questions_file, "--out", out, *BASE]
    command = [sys.executable, "-m", "w2s_jax.cli", "sample", *map(str, argv)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not sample_store.shard_paths(out) and process.poll() is None:
        assert time.monotonic() < deadline, "no shard within 120 s"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert len(sample_store.shard_paths(out)) == 1  # killed with the second batch in flight

    assert run_sample(argv) == 0
    resumed, full = _snapshot(out / "samples"), _snapshot(full_run / "samples")
    assert sorted(resumed) == sorted(full)
    assert all(resumed[name] == full[name] for name in full if name.suffix == ".jsonl")


def test_two_processes_split_the_questions_and_match_one_process(
    tmp_path, models, records, prefix_logits
):
    """Multi-host JAX for real: two `w2s sample` processes on this machine (2 CPU devices
    each) joined by jax.distributed; each writes only its own shards, and together they
    hold exactly the single-process dataset."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    questions = tmp_path / "q.jsonl"  # 5 questions: the processes get 3 and 2
    atomic_write_jsonl(
        questions, [{"id": f"q{i}", "question": q} for i, q in enumerate(QUESTIONS[:5])]
    )
    out = tmp_path / "out"
    argv = [*models, "--data", questions, "--out", out, "--batch-size", "4"]
    argv += ["--max-new-tokens", NEW_TOKENS, "--alpha", ALPHA, "--beta", BETA, "--top-k", TOP_K]
    command = [sys.executable, "-m", "w2s_jax.cli", "sample", *map(str, argv)]
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
        "JAX_NUM_PROCESSES": "2",
    }
    processes = [
        subprocess.Popen(
            command,
            env=env | {"JAX_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "5 questions" in logs[0]  # process 0 writes the summary of both
    by_process = {}
    for shard in sample_store.shard_paths(out):
        ids = by_process.setdefault(shard.name[:4], set())
        ids.update(record["id"] for _, record in read_jsonl(shard))
    assert by_process == {"p000": {"q0", "q2", "q4"}, "p001": {"q1", "q3"}}
    two = {r["id"]: r for r in sample_store.read_samples(out)}
    assert sorted(two) == [f"q{i}" for i in range(5)]
    logits, _ = prefix_logits
    for qid, record in two.items():
        single = records[qid]
        for key in ("prompt_ids", "completion_ids", "positions", "target_ids"):
            assert record[key] == single[key], (qid, key)
        # other meshes: the same float32 sums in another order, bounded as against transformers
        for t, (logp_e, logp_a, raw_e, raw_a) in enumerate(logits[qid]):
            bound = kl_bound(single, logp_e, logp_a, raw_e, raw_a)
            assert abs(record["kl"][t] - single["kl"][t]) < bound, (qid, t)
        for t, mine, theirs in zip(
            single["positions"], record["target_weights"], single["target_weights"], strict=True
        ):
            bound = weights_bound(single, *logits[qid][t][2:])
            np.testing.assert_allclose(mine, theirs, atol=bound, rtol=0)
