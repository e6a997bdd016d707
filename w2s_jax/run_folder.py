"""May this run resume in this output folder? One answer for every stage.

A stage records its settings (and fingerprints) in one JSON file of its `--out`
folder. A later run on the same folder resumes only if the recorded settings equal
its own, apart from the fields that may change on resume; otherwise it is refused
with the list of differences. The record is written atomically.
"""

from __future__ import annotations

import json
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
