"""May this run resume in this output folder, and is it the folder's only writer?

A stage records its settings (and fingerprints) in one JSON file of its `--out`
folder. A later run on the same folder resumes only if the recorded settings equal
its own, apart from the fields that may change on resume; otherwise it is refused
with the list of differences. The record is written atomically. `locked` makes
each run the only writer of its folder while it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from w2s_jax.files import DataError, atomic_write_json


class SettingsChanged(ValueError):
    """The output folder holds a run made with different settings."""


def settings_difference(
    recorded: dict, requested: dict, *, ignore: Iterable[str] = ()
) -> list[str]:
    """`key: recorded -> requested` for every setting that differs, keys in `ignore` skipped."""
    ignore = set(ignore)
    return [
        f"{key}: {recorded.get(key)!r} -> {requested.get(key)!r}"
        for key in sorted((set(recorded) | set(requested)) - ignore)
        if recorded.get(key) != requested.get(key)
    ]


def read_record(path: Path) -> dict:
    """The JSON object in `path`; DataError naming the file when it is not one."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def claim(
    path: str | Path,
    document: dict,
    *,
    settings_key: str | None = None,
    ignore: Iterable[str] = (),
    what: str = "a run",
    write: bool = True,
    has_results: bool = True,
) -> bool:
    """Refuse `path`'s folder if it records other settings; else record `document`.

    `settings_key`: where the settings sit in the document (None: the whole document).
    `ignore`: settings that may differ. `has_results`: whether the folder holds any
    result yet; a record without results (a start that failed) never blocks a
    corrected re-run, it is replaced. Returns True when a record was already there
    (a resumed run). With `write=False` (other processes of a multi-host run) nothing
    is written. Raises SettingsChanged listing the differences.
    """
    path = Path(path)
    diff = None
    if path.exists():
        recorded = read_record(path)
        if settings_key is not None:
            recorded, requested = recorded.get(settings_key, {}), document[settings_key]
        else:
            requested = document
        diff = settings_difference(recorded, requested, ignore=ignore)
    if diff is None or (diff and not has_results):
        if write:
            atomic_write_json(path, document)
        return False
    if diff:
        raise SettingsChanged(
            f"{path.parent} holds {what} made with different settings; use another --out or "
            "the original settings. Differences (recorded -> requested): " + "; ".join(diff)
        )
    return True


class FolderInUse(OSError):
    """Another live process holds the run folder's lock."""


# Launch variables that number the processes of a multi-process run (JAX's explicit
# launch, TPU VMs, SLURM, Open MPI); the first one set is this process's index.
_PROCESS_ID_VARIABLES = ("JAX_PROCESS_ID", "TPU_WORKER_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")


def launch_process_index() -> int:
    """This process's index in a multi-process launch (0 when launched alone)."""
    for name in _PROCESS_ID_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def lock_path(out: str | Path, process_index: int = 0) -> Path:
    """The lock file of run folder `out`: a hidden file beside it (never inside, so that
    the folder's files and fingerprints are the run's alone, and a stage may still
    create `out` atomically). Each process of a multi-process run has its own."""
    out = Path(out).absolute()
    suffix = "" if process_index == 0 else f".p{process_index}"
    return out.parent / f".{out.name}.w2s{suffix}.lock"


def _describe_holder(path: Path) -> str:
    """`pid N on HOST (w2s CMD, since TIME)` from a lock file, or what is known of it."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict) or "pid" not in holder:
        return "a process that is still starting"
    return (
        f"pid {holder['pid']} on {holder.get('host', '?')} "
        f"({holder.get('command', 'w2s')}, since {holder.get('since', '?')})"
    )


def _missing_parents(folder: Path) -> list[Path]:
    """The ancestors of `folder` that do not exist yet, nearest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


@contextlib.contextmanager
def locked(out: str | Path, *, command: str = "w2s", process_index: int | None = None):
    """Hold run folder `out` for this process alone while the block runs.

    An exclusive `flock` on a lock file beside `out`; a second process asking for the
    same folder (and the same process index) gets FolderInUse naming the holder's pid
    and host. The kernel drops the lock when its holder dies, so a lock left by a
    killed run never blocks a re-run. On exit the lock file is removed; so are `out` and
    the parent folders that did not exist before, when still empty (a run refused before
    writing anything leaves nothing behind; process 0 alone tidies `out`). Once the lock
    is held, process 0 deletes the temp files a killed run left (`remove_stale_temp_files`).
    """
    index = launch_process_index() if process_index is None else process_index
    path = lock_path(out, index)
    created = _missing_parents(path.parent)
    if index == 0 and not Path(out).exists():
        created.insert(0, Path(out).absolute())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = _acquire(path, out)
    except FolderInUse:
        raise
    except OSError as exc:  # name the folder the user gave, not the lock file
        raise OSError(exc.errno, f"cannot write {out}/: {exc.strerror}") from None
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            handle.truncate(0)
            handle.write(json.dumps(holder))
            handle.flush()
        except OSError as exc:  # a full disk: name the folder the user gave
            raise OSError(exc.errno, f"cannot write {out}/: {exc.strerror}") from None
        if index == 0:
            remove_stale_temp_files(out)
        yield path
    finally:
        path.unlink(missing_ok=True)  # before the lock goes, so no one locks a dead file
        handle.close()
        for folder in created:
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                folder.rmdir()


# Temp files of `files.atomic_writer` (".NAME.RANDOM.tmp", files or folders); those of a
# process's sample shards (".pNNN-...") are that process's to remove.
_STALE_TEMP = re.compile(r"^\.(?!p\d{3}-).+\.tmp$")


def remove_stale_temp_files(out: str | Path) -> list[Path]:
    """Delete the atomic writers' temp files and folders that a killed run left under
    `out`; returns them. Only for the holder of `out`'s lock: no one else writes there."""
    out = Path(out)
    if not out.is_dir():
        return []
    stale = [p for p in out.rglob(".*.tmp") if _STALE_TEMP.match(p.name)]
    for path in sorted(stale, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def _acquire(path: Path, out: str | Path):
    """An open handle on `path` holding its exclusive flock; FolderInUse if taken."""
    while True:
        handle = open(path, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FolderInUse(
                f"{out} is in use by another run: {_describe_holder(path)}; wait for it to "
                f"finish or use another --out (lock file {path})"
            ) from None
        try:
            same_file = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return handle
        handle.close()  # its holder removed the file as we locked it: take the new one
