"""The persistent compilation cache: written by one `w2s sample` process, hit by the next,
turned off by the flag and by the environment variable."""

import json
import os
import subprocess
import sys

import pytest

from w2s_jax import compile_cache
from w2s_jax.files import atomic_write_jsonl

# Runs `w2s ARGV` and prints how many compiles asked the persistent cache and how many hit.
RUNNER = """
import json, sys
import jax.monitoring
counts = {}
def count(event, **kwargs):
    counts[event] = counts.get(event, 0) + 1
jax.monitoring.register_event_listener(count)
from w2s_jax.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc,
    "requests": counts.get("/jax/compilation_cache/compile_requests_use_cache", 0),
    "hits": counts.get("/jax/compilation_cache/cache_hits", 0)}))
"""


@pytest.fixture(scope="module")
def sample_argv(tmp_path_factory, tiny_qwen2_dir, tiny_qwen2_amateur_dir):
    """`w2s sample` arguments on the tiny pair, less --out."""
    data = tmp_path_factory.mktemp("questions") / "q.jsonl"
    questions = ["how many apples are in 3 boxes of 4", "what is 12 plus 5", "sum of 9 and 4"]
    atomic_write_jsonl(
        data, [{"id": f"q{i}", "question": q, "answer": "#### 1"} for i, q in enumerate(questions)]
    )
    models = ["--expert", tiny_qwen2_dir, "--amateur", tiny_qwen2_amateur_dir]
    return [*models, "--data", data, "--batch-size", "2", "--max-new-tokens", "8"]


def run_w2s(argv, cache_root, **env) -> dict:
    """`w2s ARGV` in a fresh process whose w2s_jax cache folder is `cache_root`; every
    compile is worth an entry there. Returns the runner's counts."""
    env = {
        **os.environ,
        "W2S_JAX_CACHE_DIR": str(cache_root),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        **env,
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, *map(str, argv)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["rc"] == 0
    return counts


def entries(cache_root) -> set[str]:
    folder = cache_root / "jax_compilation_cache"
    return {p.name for p in folder.glob("*-cache")} if folder.is_dir() else set()


def test_a_second_run_compiles_nothing(tmp_path, sample_argv):
    cache_root = tmp_path / "cache"
    first = run_w2s(["sample", *sample_argv, "--out", tmp_path / "a"], cache_root)
    written = entries(cache_root)
    assert first["requests"] > 0
    assert len(written) >= first["requests"] - first["hits"] > 0

    second = run_w2s(["sample", *sample_argv, "--out", tmp_path / "b"], cache_root)
    assert second["requests"] == first["requests"]
    assert second["hits"] == second["requests"]  # every program came from the cache
    assert entries(cache_root) == written  # and none was added
    for name in ("a", "b"):  # same samples from the cached programs
        assert (tmp_path / name / "summary.json").is_file()
    a = sorted((tmp_path / "a" / "samples").glob("*.jsonl"))
    b = sorted((tmp_path / "b" / "samples").glob("*.jsonl"))
    assert [p.read_text() for p in a] == [p.read_text() for p in b]


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_turned_off_writes_nothing(tmp_path, sample_argv, how):
    cache_root = tmp_path / "cache"
    argv = ["sample", *sample_argv, "--out", tmp_path / "out"]
    if how == "flag":
        counts = run_w2s(["--no-compilation-cache", *argv], cache_root)
    else:
        counts = run_w2s(argv, cache_root, W2S_JAX_COMPILATION_CACHE="0")
    assert counts["requests"] == counts["hits"] == 0
    assert not (cache_root / "jax_compilation_cache").exists()


def test_default_folder_follows_the_cache_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("W2S_JAX_CACHE_DIR", str(tmp_path / "w2s"))
    assert compile_cache.default_cache_dir() == tmp_path / "w2s" / "jax_compilation_cache"
    monkeypatch.delenv("W2S_JAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expected = tmp_path / "xdg" / "w2s_jax" / "jax_compilation_cache"
    assert compile_cache.default_cache_dir() == expected
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "w2s_jax" / "jax_compilation_cache"
    assert compile_cache.default_cache_dir() == expected


def test_enable_in_process_sets_jax_config_unless_off_or_unwritable(tmp_path, monkeypatch):
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache")
    names += ("jax_persistent_cache_min_compile_time_secs", "jax_compilation_cache_max_size")
    before = {name: getattr(jax.config, name) for name in names}
    try:
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
        assert compile_cache.enable_compilation_cache(tmp_path / "jit") == str(tmp_path / "jit")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jit")
        assert jax.config.jax_enable_compilation_cache
        minimum = compile_cache.MIN_COMPILE_SECONDS
        assert jax.config.jax_persistent_cache_min_compile_time_secs == minimum
        blocker = tmp_path / "a_file"
        blocker.write_text("")  # an unwritable cache only means no caching
        assert compile_cache.enable_compilation_cache(blocker / "jit") is None
        assert not jax.config.jax_enable_compilation_cache
        assert compile_cache.enable_compilation_cache(tmp_path / "jit") == str(tmp_path / "jit")
        monkeypatch.setenv(compile_cache.OFF_VARIABLE, "off")
        assert compile_cache.enable_compilation_cache(tmp_path / "jit") is None
        assert not jax.config.jax_enable_compilation_cache
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
