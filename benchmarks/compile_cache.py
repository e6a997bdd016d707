"""Cold start of `w2s sample` with the persistent compilation cache off, empty and full.

The benchmark pair of benchmarks/sampling.py (~50M-parameter expert, ~10M amateur, same
questions and settings), one fresh `w2s sample` process per run, timed from launch to
exit (imports, loading, compiling, sampling, writing):
- off:   `w2s --no-compilation-cache sample` (every program compiled);
- empty: the cache on, in an empty folder (compiled, and written to the cache);
- full:  the cache on, in a folder a previous identical run filled (programs read back).
The three alternate, so all see the same machine; medians over --reps. The fingerprint
cache (W2S_JAX_CACHE_DIR) is warm for all of them; the compilation cache folder is
JAX_COMPILATION_CACHE_DIR.

    nice -n 10 .venv/bin/python benchmarks/compile_cache.py   # 10 runs: ~18 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampling import (  # noqa: E402
    AMATEUR,
    AMATEUR_INIT,
    EXPERT,
    EXPERT_INIT,
    make_embedding_and_head,
    make_model,
    make_questions,
    make_tokenizer,
)


def build_pair(work: Path, vocab: int, questions: int) -> list[str]:
    """The benchmark pair and questions in `work` (built once); `w2s sample` arguments."""
    expert, amateur = work / "expert", work / "amateur"
    if not (amateur / "config.json").is_file():
        tokenizer = make_tokenizer(work / "tokenizer", vocab)
        embedding, head = make_embedding_and_head(tokenizer)
        make_model(expert, work / "tokenizer", EXPERT, embedding, head, 0, EXPERT_INIT)
        make_model(amateur, work / "tokenizer", AMATEUR, embedding, head, 1, AMATEUR_INIT)
    from w2s_jax.files import atomic_write_jsonl

    data = work / "questions.jsonl"
    atomic_write_jsonl(data, make_questions(questions))
    return ["--expert", str(expert), "--amateur", str(amateur), "--data", str(data)]


def timed_run(argv: list[str], out: Path, cache: Path | None, env: dict) -> float:
    """Wall seconds of one `w2s [--no-compilation-cache] sample ARGV --out OUT` process."""
    shutil.rmtree(out, ignore_errors=True)
    flags = ["--no-compilation-cache"] if cache is None else []
    command = [sys.executable, "-m", "w2s_jax.cli", *flags, "sample", *argv, "--out", str(out)]
    env = {**env, "JAX_COMPILATION_CACHE_DIR": str(cache)} if cache else env
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"w2s sample failed:\n{done.stderr[-3000:]}")
    return seconds


def entries(cache: Path) -> tuple[int, int]:
    """(files, bytes) of the cache entries in `cache`."""
    files = list(cache.glob("*-cache"))
    return len(files), sum(f.stat().st_size for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "w2s_bench_sampling"))
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    argv = build_pair(work, args.vocab, args.questions)
    argv += ["--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens)]
    runs = work / "compile_cache_runs"
    shutil.rmtree(runs, ignore_errors=True)
    env = {**os.environ, "W2S_JAX_CACHE_DIR": str(runs / "w2s_cache")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)

    full = runs / "full_cache"
    timed_run(argv, runs / "out", full, env)  # fills the full cache, warms the fingerprints
    times = {"off": [], "empty": [], "full": []}
    for rep in range(args.reps):
        times["off"].append(timed_run(argv, runs / "out", None, env))
        times["empty"].append(timed_run(argv, runs / "out", runs / f"empty_{rep}", env))
        times["full"].append(timed_run(argv, runs / "out", full, env))
    files, size = entries(full)

    from common import machine_description

    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "machine": machine_description(),
        "questions": args.questions,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "seconds": times,
        "median_s": medians,
        "cache_entries": files,
        "cache_bytes": size,
        "speedup_full_vs_off": medians["off"] / medians["full"],
    }
    print(json.dumps(result, indent=2))
    print(
        f"\nw2s sample cold start, median of {args.reps}: cache off {medians['off']:.1f} s, "
        f"empty {medians['empty']:.1f} s, full {medians['full']:.1f} s "
        f"({medians['off'] / medians['full']:.2f}x; {files} entries, {size / 1e6:.1f} MB)"
    )


if __name__ == "__main__":
    main()
