"""Atomic writes and checked JSONL question sources."""

import json

import pytest

from w2s_jax.data.sources import load_questions
from w2s_jax.files import (
    DataError,
    atomic_save_figure,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_writer,
    read_jsonl,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    atomic_write_jsonl(path, [{"x": 1}])

    def bad():
        yield {"x": 2}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write_jsonl(path, bad())
    assert [r for _, r in read_jsonl(path)] == [{"x": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "a"}\n\n{"question": \n')
    with pytest.raises(DataError, match=r"q\.jsonl:3"):
        list(read_jsonl(path))
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"q\.jsonl:1: expected a JSON object"):
        list(read_jsonl(path))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(read_jsonl(tmp_path / "missing.jsonl"))


def test_load_questions_fields_ids_and_errors(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"question": "1+1?", "answer": "so 2\\n#### 2"}\n{"id": "b", "question": "2+2?"}\n'
    )
    qs = load_questions(str(path))
    assert [(q.id, q.question, q.answer) for q in qs] == [
        ("line-1", "1+1?", "so 2\n#### 2"),
        ("b", "2+2?", None),
    ]
    assert len(load_questions(str(path), max_questions=1)) == 1
    with pytest.raises(DataError, match=r"q\.jsonl:2: field 'answer'"):
        load_questions(str(path), require_answer=True)
    path.write_text('{"question": "  "}\n')
    with pytest.raises(DataError, match=r"q\.jsonl:1: field 'question' is missing or empty"):
        load_questions(str(path))
    path.write_text('{"id": 1, "question": "a"}\n{"id": 1, "question": "b"}\n')
    with pytest.raises(DataError, match="already used on line 1"):
        load_questions(str(path))


def test_atomic_writer_failure_mid_stream_keeps_old_file(tmp_path):
    path = tmp_path / "weights.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError), atomic_writer(path) as handle:
        handle.write(b"new partial")
        raise RuntimeError("crash while streaming")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_atomic_save_figure_writes_png(tmp_path):
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    atomic_save_figure(fig, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_atomic_write_gives_plain_file_permissions(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        path = tmp_path / "out.json"
        atomic_write_json(path, {"a": 1})
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)
        atomic_write_json(path, {"a": 2})
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


def test_atomic_folder_appears_whole_or_not_at_all(tmp_path):
    from w2s_jax.files import atomic_folder

    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("crash half way")
    assert list(tmp_path.iterdir()) == []  # no folder, no temp folder
    with atomic_folder(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (tmp_path / "model" / "config.json").read_text() == "{}"
    assert (tmp_path / "model").stat().st_mode & 0o755 == 0o755  # not mkdtemp's private 0o700
