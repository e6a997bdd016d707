"""One writer per run folder: a lock beside `--out`, held by real processes."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from w2s_jax import run_folder

# A child that takes the lock, says so in a file, then waits to be killed.
HOLDER = """
import sys, time
from pathlib import Path
from w2s_jax import run_folder
with run_folder.locked(sys.argv[1], command="w2s sample"):
    Path(sys.argv[2]).write_text("held")
    time.sleep(120)
"""


def _start_holder(out, ready):
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert child.poll() is None, "the lock holder died"
        assert time.monotonic() < deadline, "the lock holder never took the lock"
        time.sleep(0.05)
    return child


@pytest.fixture
def holder(tmp_path):
    """A live process of its own holding tmp_path/run."""
    child = _start_holder(tmp_path / "run", tmp_path / "ready")
    yield child
    child.kill()
    child.wait(timeout=30)


def test_a_second_process_is_refused_with_the_holders_pid_and_host(tmp_path, holder):
    with pytest.raises(run_folder.FolderInUse) as caught, run_folder.locked(tmp_path / "run"):
        pass
    message = str(caught.value)
    assert f"pid {holder.pid} on {socket.gethostname()}" in message
    assert "w2s sample" in message and str(tmp_path / "run") in message


def test_the_cli_refuses_a_held_out_with_one_error_line(tmp_path, holder):
    env = {**os.environ, "W2S_JAX_COMPILATION_CACHE": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "w2s_jax.cli", "import-gguf", "--gguf", "missing.gguf"]
        + ["--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"pid {holder.pid}" in lines[0]


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    child = _start_holder(tmp_path / "run", tmp_path / "ready")
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    stale = run_folder.lock_path(tmp_path / "run")
    assert stale.exists()  # kill -9 leaves the file; the kernel dropped the lock
    with run_folder.locked(tmp_path / "run"):
        assert str(os.getpid()) in stale.read_text()
    assert not stale.exists()


def test_each_process_of_a_launch_has_its_own_lock(tmp_path, holder, monkeypatch):
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    with run_folder.locked(tmp_path / "run") as path:
        assert path.name == ".run.w2s.p1.lock"


def test_folders_the_lock_created_are_removed_when_nothing_was_written(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with run_folder.locked(out):
        assert (tmp_path / "a" / "b").is_dir()
    assert not (tmp_path / "a").exists()
    with run_folder.locked(out):
        out.mkdir(parents=True)
        (out / "result.json").write_text("{}")
    assert (out / "result.json").exists() and not run_folder.lock_path(out).exists()


def test_an_out_folder_left_empty_by_a_refused_run_is_removed(tmp_path):
    out = tmp_path / "runs" / "run"
    with pytest.raises(ValueError, match="refused"), run_folder.locked(out):
        out.mkdir(parents=True)  # as a stage does before it finds a bad input
        raise ValueError("refused")
    assert not (tmp_path / "runs").exists()
    out.mkdir(parents=True)
    with run_folder.locked(out):  # an existing folder is the user's: kept, even empty
        pass
    assert out.is_dir()


def test_the_holder_removes_the_temp_files_of_a_killed_run(tmp_path):
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    left = [out / ".report.json.x1y2.tmp", out / "eval" / ".summary.json.ab.tmp"]
    for path in left:
        path.write_text("half")
    (out / ".model.k3.tmp").mkdir()  # an atomic folder's
    (out / ".model.k3.tmp" / "config.json").write_text("{}")
    kept = [out / "report.json", out / "samples" / ".p001-00003.jsonl.q9.tmp", out / "a.tmp"]
    for path in kept:
        path.parent.mkdir(exist_ok=True)
        path.write_text("mine")
    with run_folder.locked(out):
        pass
    assert not any(p.exists() for p in [*left, out / ".model.k3.tmp"])
    assert all(p.read_text() == "mine" for p in kept)
