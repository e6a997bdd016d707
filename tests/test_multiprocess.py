"""Multi-host JAX for real: each stage run as 2 processes on this machine, against 1 process.

Each 2-process run launches `python -m w2s_jax.cli ...` twice, joined by `jax.distributed`
through a coordinator on a free 127.0.0.1 port (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES=2,
JAX_PROCESS_ID), each process with 1 simulated CPU device and gloo collectives. The baseline
is the same command run in this (pytest) process on a mesh of 2 of its devices: one process,
the same global mesh (data=2) and the same global batch. An audit hook in every child
(`sys.addaudithook`) logs each file it creates, replaces or deletes, so the tests can say
which process wrote what.

Tolerances. The batch is split over the 2 devices by rows, and each device's partial
sums (its rows' losses and gradients) come from the same compiled per-device program in
both layouts; only the cross-device sums differ, added over gloo or inside one process.
With 2 addends those are exact in either order, so the numbers should agree to the bit;
the tolerances bound what float32 allows if they were re-associated. Moving the terms of a
sum of n float32 numbers changes it by at most (n - 1) * 2**-24 * sum|x_i| (Higham,
Accuracy and Stability of Numerical Algorithms, 2002, sec. 4.2). Loss and KL are means of
a step's 8 non-negative per-position terms: at most 7 * 2**-24 = 4.2e-7 of the value, rtol
1e-6. A gradient entry sums the partials of a step's 4 rows (2 micro-batches x 2 rows):
at most 3 * 2**-24 * sum|x_i|; allowing the rows to cancel down to a twentieth
(sum|x_i| <= 20 |sum x_i|), 3.6e-6 of the entry and of the gradient norm: rtol 1e-5. An
AdamW step moves a weight by lr * m / (sqrt(v) + eps), whose relative change is at most
about twice the gradient's (m and sqrt(v) scale with it): over S <= 8 steps at lr 1e-3 the
adapters differ by at most 2 * 8 * 1e-3 * 1e-5 = 1.6e-7, atol 1e-6 (the classifiers' weights
likewise). Their logits then differ by at most about |hidden| * 1e-6 (|hidden| ~ 11 for 128
dims of unit scale), so class probabilities (softmax slope <= 1/2) get atol 1e-5. Token
ids, records, greedy outputs and class decisions compare exactly: an argmax moves only
when two logits tie within rounding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import w2s_jax

ASSETS = Path(w2s_jax.__file__).parent / "assets" / "toy_world"
EXPERT, AMATEUR = ASSETS / "expert", ASSETS / "amateur"
LIMIT_S = 240  # one launch, start to finish: every wait on a child is bounded by it
STEPS, LR = 8, 1e-3
LOSS_RTOL, GRAD_RTOL, WEIGHT_ATOL, PROB_ATOL = 1e-6, 1e-5, 1e-6, 1e-5  # see above
pytestmark = pytest.mark.slow  # about 170 s of CPU time in all

# `python -m w2s_jax.cli ARGS` with an audit hook that logs (to $W2S_TEST_WRITES) every path
# the process opens for writing, renames onto, truncates or deletes.
AUDITED_CLI = r"""
import os, runpy, sys
_log = os.open(os.environ["W2S_TEST_WRITES"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _note(path):
    if isinstance(path, (str, bytes, os.PathLike)):
        os.write(_log, (os.path.abspath(os.fsdecode(path)) + "\n").encode())

def _audit(event, args):
    if event == "open":
        path, mode, flags = args
        if (mode and any(c in mode for c in "wax+")) or (not mode and (flags or 0) & _WRITE):
            _note(path)
    elif event == "os.rename":  # os.rename and os.replace
        _note(args[1])
    elif event in ("os.remove", "os.truncate", "shutil.rmtree"):
        _note(args[0])

sys.addaudithook(_audit)
sys.argv = ["w2s", *sys.argv[1:]]
runpy.run_module("w2s_jax.cli", run_name="__main__", alter_sys=True)
"""


@dataclasses.dataclass
class Launch:
    """A finished run: each process's exit status, output and the files it wrote."""

    returncodes: list[int]
    logs: list[str]
    writes: list[set[Path]]

    def check(self, *expected: int) -> None:
        expected = list(expected) or [0] * len(self.returncodes)
        assert self.returncodes == expected, "\n".join(log[-3000:] for log in self.logs)

    def written_in(self, folder: Path, process: int) -> set[str]:
        """Paths (relative to `folder`) under `folder` that `process` wrote, but for the temp
        files of atomic writes (their final names are logged when they are renamed)."""
        folder = folder.absolute()
        return {
            str(p.relative_to(folder))
            for p in self.writes[process]
            if folder in p.parents and not (p.name.startswith(".") and p.name.endswith(".tmp"))
        }


class Run:
    """`w2s ARGV` as 2 processes of 1 CPU device each, started at once."""

    def __init__(self, work: Path, name: str, argv: list):
        command = [sys.executable, "-c", AUDITED_CLI, *map(str, argv)]
        with socket.socket() as probe:  # a free port for the coordinator
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.name, self.children, self.files, self.watcher = name, [], [], None
        self.deadline = time.monotonic() + LIMIT_S
        for index in range(2):
            log, writes = work / f"{name}.{index}.log", work / f"{name}.{index}.writes"
            env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")} | {
                "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                "JAX_PLATFORMS": "cpu",
                "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
                "JAX_COMPILATION_CACHE_DIR": str(work / "jax_cache"),  # shared by the runs
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(index),
                "W2S_TEST_WRITES": str(writes),
                "TOKENIZERS_PARALLELISM": "false",
            }
            with log.open("wb") as handle:
                child = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
            self.children.append(child)
            self.files.append((log, writes))

    def when(self, condition, action) -> None:
        """In the background: `action(children)` once `condition()` holds."""

        def watch():
            while not condition() and any(c.poll() is None for c in self.children):
                if time.monotonic() > self.deadline:
                    return
                time.sleep(0.01)
            if all(c.poll() is None for c in self.children):
                action(self.children)

        self.watcher = threading.Thread(target=watch, daemon=True)
        self.watcher.start()

    def finish(self) -> Launch:
        """Wait for both children; kill them on a timeout or an error."""
        try:
            codes = [c.wait(max(1.0, self.deadline - time.monotonic())) for c in self.children]
        finally:
            self.kill()
        if self.watcher is not None:
            self.watcher.join()
        return Launch(
            codes,
            [log.read_text(errors="replace") for log, _ in self.files],
            [
                {Path(line) for line in w.read_text().splitlines()} if w.exists() else set()
                for _, w in self.files
            ],
        )

    def kill(self) -> None:
        for child in self.children:  # a failed or hung run never outlives its test
            if child.poll() is None:
                child.kill()
                child.wait()


@contextlib.contextmanager
def running(*runs: Run):
    """Kill every child of `runs` when the block leaves early (a failed assertion)."""
    try:
        yield runs
    finally:
        for run in runs:
            run.kill()


def one_process(argv: list) -> None:
    """`w2s ARGV` in this process, every mesh over its first 2 devices (of the 8 that the
    tests simulate): the global mesh of the 2-process runs."""
    import jax

    from w2s_jax import sharding
    from w2s_jax.cli import main

    original = sharding.make_mesh

    def two_devices(spec=None, *, devices=None):
        return original(spec, devices=jax.devices()[:2] if devices is None else devices)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sharding, "make_mesh", two_devices)
        assert main([str(a) for a in argv]) == 0


def side_by_side(work: Path, stage: str, argv: list) -> Launch:
    """One stage as 2 processes (into work/<stage>-2) while this process runs it alone
    (into work/<stage>-1); returns the 2-process run, checked."""
    with running(Run(work, f"{stage}-2", [*argv, "--out", work / f"{stage}-2"])) as (run,):
        one_process([*argv, "--out", work / f"{stage}-1"])
        launch = run.finish()
    launch.check()
    return launch


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder for the runs, with 4 toy test questions."""
    from w2s_jax.data.arithmetic import write_split

    folder = tmp_path_factory.mktemp("multiprocess")
    write_split(folder / "questions.jsonl", "test", 4, seed=0)
    return folder


# --------------------------------------------------------------------- w2s sample


@pytest.fixture(scope="module")
def sampled(work):
    argv = ["sample", "--expert", EXPERT, "--amateur", AMATEUR, "--data", work / "questions.jsonl"]
    argv += ["--max-new-tokens", 8, "--batch-size", 4, "--no-select", "--dtype", "float32"]
    return side_by_side(work, "sample", argv + ["--layer-stack", "scan"])


def test_sample_processes_write_their_own_shards_and_equal_one_process(work, sampled):
    from w2s_jax.sample_store import read_samples

    out2, out1 = work / "sample-2", work / "sample-1"
    records = {r["id"]: r for r in read_samples(out2)}
    assert records == {r["id"]: r for r in read_samples(out1)} and len(records) == 4
    shards = {p.name for p in (out2 / "samples").glob("*.jsonl")}
    assert {name[:4] for name in shards} == {"p000", "p001"}  # each sampled its own half
    for process in (0, 1):
        written = sampled.written_in(out2, process)
        own = {f for f in written if f.startswith(f"samples/p{process:03d}-")}
        summary = {"manifest.json", "summary.json", "kl_histogram.png"}
        assert written - own == (summary if process == 0 else set())
        assert {f[8:] for f in own if f.endswith(".jsonl")} == {
            s for s in shards if s.startswith(f"p{process:03d}")
        }


# --------------------------------------------------------------------- w2s train


def saved_steps(out: Path) -> list[int]:
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def trained(work, sampled):
    """LoRA training as 2 processes, killed (-9) and resumed, then stopped by a SIGTERM to
    one process; the baseline runs all the steps in this process."""
    argv = ["train", "--expert", EXPERT, "--samples", work / "sample-1", "--steps", STEPS]
    argv += ["--lr", LR, "--batch-positions", 8, "--grad-accum", 2, "--save-every", 2]
    argv += ["--log-every", 1, "--dtype", "float32", "--layer-stack", "scan"]
    argv += ["--length-bucket", 128, "--no-progress"]  # one shape: one compilation
    out2 = work / "train-2"
    with running(Run(work, "train-2a", [*argv, "--out", out2])) as (first,):
        # 1) both processes killed hard once step 2 is saved (the step runs on)
        first.when(lambda: 2 in saved_steps(out2), lambda children: [c.kill() for c in children])
        every_step = ["--save-every", 1, "--keep-checkpoints", STEPS]  # free: same results
        one_process([*argv, "--out", work / "train-1", *every_step])
        killed = first.finish()
    killed.check(-signal.SIGKILL, -signal.SIGKILL)
    killed_at = saved_steps(out2)[-1]
    # 2) resumed; a SIGTERM (a preemption notice) reaches process 1 only, once a later step
    # is saved: both processes stop at the same step, save it and exit with 143
    with running(Run(work, "train-2b", [*argv, "--out", out2])) as (second,):
        second.when(
            lambda: saved_steps(out2)[-1] > killed_at,
            lambda children: children[1].send_signal(signal.SIGTERM),
        )
        stopped = second.finish()
    stopped.check(143, 143)
    stop_step = saved_steps(out2)[-1]
    assert 2 <= killed_at < stop_step < STEPS, (killed_at, stop_step)
    return killed, stopped, stop_step


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapters(out: Path, step: int) -> list:
    """The adapters of a run's checkpoint of `step`, as numpy arrays."""
    import jax
    from flax import nnx

    from w2s_jax.checkpointing import restore_params
    from w2s_jax.lora import LoRAConfig, apply_lora
    from w2s_jax.models import load_pretrained

    model = load_pretrained(EXPERT, dtype="float32")
    apply_lora(model, LoRAConfig(dropout=0.0))
    restored = restore_params(out, nnx.state(model, nnx.LoRAParam), step=step)
    return [np.asarray(x) for x in jax.tree.leaves(restored)]


def test_train_killed_resumed_and_stopped_equals_one_process(work, trained):
    from w2s_jax.checkpointing import read_meta

    _, _, stop_step = trained
    out2, out1 = work / "train-2", work / "train-1"
    two, one = metrics(out2), metrics(out1)
    assert [r["step"] for r in two] == list(range(1, stop_step + 1))
    for a, b in zip(two, one[:stop_step], strict=True):
        assert (a["lr"], a["agreement"]) == (b["lr"], b["agreement"])
        for key, rtol in (("loss", LOSS_RTOL), ("kl", LOSS_RTOL), ("grad_norm", GRAD_RTOL)):
            np.testing.assert_allclose(a[key], b[key], rtol=rtol, err_msg=f"{key} {a['step']}")
    assert read_meta(out2, step=stop_step) == read_meta(out1, step=stop_step)
    for a, b in zip(adapters(out2, stop_step), adapters(out1, stop_step), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=WEIGHT_ATOL)
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["stopped"] and summary["steps"] == stop_step


def test_train_process_1_writes_only_its_checkpoint_shards(work, trained):
    killed, stopped, _ = trained
    out2, out1 = work / "train-2", work / "train-1"
    for launch in (killed, stopped):
        for path in launch.written_in(out2, 1):  # Orbax: each process its own array metadata
            assert path.startswith("checkpoints/") and "/process_1" in path, path
        assert not any("/process_1" in p for p in launch.written_in(out2, 0))
    beside = {f for f in files(out1) if not f.startswith(("checkpoints/", "tensorboard/"))}
    assert {f for f in files(out2) if not f.startswith(("checkpoints/", "tensorboard/"))} == beside
    by_0 = killed.written_in(out2, 0) | stopped.written_in(out2, 0)
    assert {f for f in files(out2) if not f.startswith("checkpoints/")} <= by_0
    assert all(p.name.isdigit() for p in (out2 / "checkpoints").iterdir())  # no unfinished save


# --------------------------------------------------------------------- w2s eval


def test_eval_under_two_processes_equals_one_process(work, trained):
    argv = ["eval", "--model", EXPERT, "--lora", work / "train-2", "--data"]
    argv += [work / "questions.jsonl", "--max-new-tokens", 8, "--batch-size", 4]
    launch = side_by_side(work, "eval", [*argv, "--dtype", "float32", "--no-progress"])
    out2, out1 = work / "eval-2", work / "eval-1"
    assert files(out2) == files(out1)
    assert launch.written_in(out2, 1) == set()  # process 0 alone writes
    assert files(out2) <= launch.written_in(out2, 0)
    assert (out2 / "predictions.jsonl").read_bytes() == (out1 / "predictions.jsonl").read_bytes()


# --------------------------------------------------------------------- w2s weak-to-strong


def test_weak_to_strong_process_0_writes_and_results_equal_one_process(work):
    from w2s_jax.files import read_jsonl
    from w2s_jax.models.safetensors_io import SafetensorsFolder

    # one model on both sides, linear probes trained alike: the three classifiers share
    # their compiled step and prediction
    argv = ["weak-to-strong", "--weak", EXPERT, "--strong", EXPERT, "--losses", "xent"]
    argv += ["--train-items", 16, "--test-items", 8, "--mode", "head", "--weak-mode", "head"]
    argv += ["--epochs", 1, "--weak-epochs", 1, "--lr", 0.1, "--weak-learning-rate", 0.1]
    argv += ["--batch-size", 8]
    launch = side_by_side(work, "w2s", [*argv, "--length-bucket", 64, "--dtype", "float32"])
    out2, out1 = work / "w2s-2", work / "w2s-1"
    assert files(out2) == files(out1)
    assert launch.written_in(out2, 1) == set()
    assert files(out2) <= launch.written_in(out2, 0)
    seed2, seed1 = out2 / "seed-0", out1 / "seed-0"
    assert (seed2 / "split.json").read_bytes() == (seed1 / "split.json").read_bytes()
    labels = [[r for _, r in read_jsonl(s / "weak_labels.jsonl")] for s in (seed2, seed1)]
    assert [(r["id"], r["label"]) for r in labels[0]] == [(r["id"], r["label"]) for r in labels[1]]
    np.testing.assert_allclose(*([r["soft_label"] for r in x] for x in labels), atol=PROB_ATOL)
    for name in ("weak", "ceiling", "w2s-xent"):
        scores = [json.loads((s / "eval" / f"{name}.json").read_text()) for s in (seed2, seed1)]
        np.testing.assert_allclose(scores[0]["probs"], scores[1]["probs"], atol=PROB_ATOL)
        assert scores[0]["correct"] == scores[1]["correct"]
        tensors = [SafetensorsFolder(s / "models" / name) for s in (seed2, seed1)]
        assert sorted(tensors[0].entries) == sorted(tensors[1].entries)
        for key in tensors[1].entries:
            np.testing.assert_allclose(
                tensors[0].get(key), tensors[1].get(key), rtol=0, atol=WEIGHT_ATOL
            )
