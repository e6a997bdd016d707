"""LightReasoner's four stages at the real model sizes: seconds, memory and FLOP/s.

Seeded random checkpoints of the Qwen2.5-Math-1.5B (expert) and Qwen2.5-0.5B (amateur)
shapes and a tokenizer of Qwen's size (real_scale_build.py, built once into --cache,
outside the repository) go through the real commands, in-process, each stage in a child
process of its own (its peak RSS is its own): `w2s sample` (expert rollout, amateur
pass, KL/targets), `w2s train` (LoRA rank 8 on q/v, published defaults), `w2s export`
(merge, write in the base's bf16) and `w2s eval` (greedy generation, grading). sample
and eval run twice: cold, then warm into a fresh folder. A probe wraps the library's
functions where the commands find them: load_pretrained, the export's restore, merge
and write, and each jitted function (timed with a sync, abstract arguments kept), which
is afterwards lowered and compiled again with the caches cleared: its compile seconds
and XLA's memory analysis. FLOPs: 2 * params * tokens per forward; a LoRA step
4 * (params - head) * tokens + 4 * head * selected positions (forward + activation
gradients: frozen weights get no weight gradient, the head runs at selected positions
only), against float32 and bfloat16 matmuls measured in the same run.

    .venv/bin/python benchmarks/real_scale.py --layers 2   # development size, minutes
    .venv/bin/python benchmarks/real_scale.py              # 28 + 24 layers
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_scale_build as build  # noqa: E402

STAGES = ("sample", "train", "export", "eval")
GENERATE_JITS = ("_prefix_cache", "_prefill_rows", "_start_decoding", "_decode")
GiB = 2**30


def log(message: str) -> None:
    print(f"[real_scale {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--cache", default=str(Path.home() / ".cache" / "w2s_jax" / "real_scale"))
    add("--layers", type=int, default=None, help="Override both models' layer counts.")
    add("--dtype", default="auto", help="Compute dtype of the commands (auto, float32, bfloat16).")
    add("--questions", type=int, default=8)
    add("--batch-size", type=int, default=8)
    add("--max-new-tokens", type=int, default=128, help="Rollout and eval length.")
    add("--train-steps", type=int, default=8, help="Optimizer steps (new shapes compile).")
    add("--out", default="bench_out/real_scale.json")
    add("--stage", help=argparse.SUPPRESS)
    add("--result", help=argparse.SUPPRESS)
    return parser.parse_args()


# ------------------------------------------------------------------ child side: probing


def _abstract(tree):
    """jax.Arrays -> ShapeDtypeStruct with their sharding (donated buffers die); rest kept."""
    import jax

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


def _describe(tree) -> tuple[int, list]:
    """(bytes of its abstract arrays, its signature: their shapes and dtypes, ints, strings)."""
    import jax

    leaves = jax.tree.leaves(tree)
    arrays = [x for x in leaves if isinstance(x, jax.ShapeDtypeStruct)]
    nbytes = sum(math.prod(x.shape) * getattr(x.dtype, "itemsize", 0) for x in arrays)
    statics = [x for x in leaves if isinstance(x, int | str)]
    return nbytes, [(x.shape, str(x.dtype)) for x in arrays] + statics


class Probe:
    """Wraps functions where the commands find them: the wall seconds of every call (synced),
    per run; for jitted ones also each call's abstract arguments and whether its signature
    (shapes, dtypes, static ints and strings) is new, i.e. whether the call compiled."""

    def __init__(self):
        self.run, self.calls, self.jitted = 0, [], {}

    def wrap(self, module, name: str, *, jitted: bool = False):
        """Replace `module.name`, and every loaded module's import of that same object."""
        original = getattr(module, name)
        wrapped = self.wrap_fn(original, name, jitted)
        for other in list(sys.modules.values()):
            if getattr(other, "__dict__", {}).get(name) is original:
                setattr(other, name, wrapped)

    def wrap_fn(self, fn, label: str, jitted: bool):
        import jax

        def wrapper(*args, **kwargs):
            call = {"label": label, "run": self.run, "fresh": False}
            if jitted:
                self.jitted[label] = fn
                call["args"] = _abstract((args, kwargs))
                call["signature"] = _describe(call["args"])[1]
                call["fresh"] = call["signature"] not in [c["signature"] for c in self.of(label)]
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args, **kwargs))
            self.calls.append(call | {"s": time.perf_counter() - start})
            return out

        return wrapper

    def of(self, label: str, run: int | None = None) -> list[dict]:
        return [c for c in self.calls if c["label"] == label and run in (None, c["run"])]

    def seconds(self, label: str, run: int | None = None) -> float:
        return sum(c["s"] for c in self.of(label, run))

    def analyse(self) -> dict:
        """Per jitted function: calls, compiled shapes, first and steady (median of calls that
        did not compile) seconds; lower and compile seconds with the caches cleared and XLA's
        memory analysis, for the call with the largest arguments."""
        import jax

        out = {}
        for label, fn in self.jitted.items():
            calls = self.of(label)
            args, kwargs = max(calls, key=lambda c: _describe(c["args"])[0])["args"]
            jax.clear_caches()
            start = time.perf_counter()
            lowered = fn.lower(*args, **kwargs)
            lowered_at = time.perf_counter()
            memory = lowered.compile().memory_analysis()
            steady = [c["s"] for c in calls if not c["fresh"]]
            out[label] = {
                "calls": len(calls),
                "shapes": sum(c["fresh"] for c in calls),
                "first_s": calls[0]["s"],
                "steady_s": statistics.median(steady) if steady else None,
                "lower_s": lowered_at - start,
                "compile_s": time.perf_counter() - lowered_at,
            }
            for kind in ("temp", "argument", "output", "alias"):
                out[label][f"{kind}_bytes"] = getattr(memory, f"{kind}_size_in_bytes", None)
        return out


def _run_command(module, argv: list, probe: Probe) -> float:
    """One in-process run of a `w2s` command; returns its wall seconds."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    log(f"  w2s {module.__name__.rsplit('.', 1)[1]} {' '.join(map(str, argv))}")
    start = time.perf_counter()
    status = module.run(parser.parse_args([str(a) for a in argv]))
    if status not in (0, None):
        raise RuntimeError(f"{module.__name__} exited with {status}")
    probe.run += 1
    return time.perf_counter() - start


def _read_jsonl(path: Path) -> list[dict]:
    from w2s_jax.files import read_jsonl

    return [record for _, record in read_jsonl(path)]


def _generation(command, work: Path, name: str, argv: list, probe: Probe, count) -> dict:
    """A cold and a warm run of `command` (into NAME, NAME_warm) with `generate` probed.
    `count(warm folder)` -> (generated lengths, prompt tokens). The warm run's seconds in
    `generate`, per decode step (the longest row sets the steps) and tokens/s."""
    import w2s_jax.generate
    import w2s_jax.models

    probe.wrap(w2s_jax.models, "load_pretrained")
    for jitted in GENERATE_JITS:
        probe.wrap(w2s_jax.generate, jitted, jitted=True)
    cold = _run_command(command, [*argv, "--out", work / name], probe)
    warm = _run_command(command, [*argv, "--out", work / f"{name}_warm"], probe)
    seconds = sum(probe.seconds(jitted, 1) for jitted in GENERATE_JITS)
    lengths, prompt_tokens = count(work / f"{name}_warm")
    return {
        "load_s": probe.seconds("load_pretrained", 0),
        "first_run_s": cold,
        "warm_run_s": warm,
        "generate_s": seconds,
        "decode_s_per_step": probe.seconds("_decode", 1) / max(max(lengths) - 1, 1),
        "generated_tokens": sum(lengths),
        "prompt_tokens": prompt_tokens,
        "tokens_per_s": sum(lengths) / seconds,
    }


def stage_sample(args, work: Path, models: dict, itemsize: int) -> dict:
    import w2s_jax.sampling
    from w2s_jax.commands import sample as command

    probe = Probe()
    probe.wrap(w2s_jax.sampling, "_score", jitted=True)
    argv = ["--expert", models["expert"]["folder"], "--amateur", models["amateur"]["folder"]]
    argv += ["--data", work / "questions.jsonl", "--dtype", args.dtype]
    argv += ["--batch-size", args.batch_size, "--max-new-tokens", args.max_new_tokens]
    records = []

    def count(folder: Path):
        records.extend(r for shard in folder.glob("samples/*.jsonl") for r in _read_jsonl(shard))
        lengths = [len(r["completion_ids"]) for r in records]
        return lengths, sum(len(r["prompt_ids"]) for r in records)

    result = _generation(command, work, "samples", argv, probe, count)
    score = probe.seconds("_score", 1)
    params = models["expert"]["params"] + models["amateur"]["params"]
    flops = 2 * params * (result["prompt_tokens"] + result["generated_tokens"])
    cache = probe.of("_decode")[0]["args"][0][2]  # the expert's KV cache, as _decode got it
    rows, slots = probe.of("_score")[0]["args"][0][5].shape  # the amateur's teacher-forced ids
    a = models["amateur"]["shape"]
    head_dim = a["hidden_size"] // a["num_attention_heads"]
    amateur_kv = 2 * a["num_hidden_layers"] * a["num_key_value_heads"] * head_dim * rows * slots
    return result | {
        "score_s": score,
        "flop_per_s": flops / (result["generate_s"] + score),
        "kv_cache_bytes": _describe(cache)[0] + amateur_kv * itemsize,
        "weights_bytes": params * itemsize,
        "selected_positions": sum(len(r["positions"]) for r in records),
        "jit": probe.analyse(),
    }


def stage_train(args, work: Path, models: dict, itemsize: int) -> dict:
    import w2s_jax.models
    import w2s_jax.train
    from w2s_jax.commands import train as command

    probe = Probe()
    probe.wrap(w2s_jax.models, "load_pretrained")
    compile_step = w2s_jax.train.compile_step

    def probed_compile_step(*a, **kw):
        step_fn, *rest = compile_step(*a, **kw)
        return (probe.wrap_fn(step_fn, "train_step", jitted=True), *rest)

    w2s_jax.train.compile_step = probed_compile_step
    argv = ["--expert", models["expert"]["folder"], "--samples", work / "samples"]
    argv += ["--out", work / "train", "--steps", args.train_steps, "--dtype", args.dtype]
    wall = _run_command(command, [*argv, "--log-every", 1, "--save-every", args.train_steps], probe)
    shape, params = models["expert"]["shape"], models["expert"]["params"]
    head = shape["hidden_size"] * shape["vocab_size"]
    steps = probe.of("train_step")
    steady = [c for c in steps if not c["fresh"]] or steps[1:]
    tokens, flops = [], 0
    for call in steady:  # padded tokens computed; the head only at the selected positions
        batch = call["args"][0][2]
        tokens.append(math.prod(batch["input_ids"].shape))
        positions = math.prod(batch["target_ids"].shape[:2])
        flops += 4 * (params - head) * tokens[-1] + 4 * head * positions
    return {
        "load_s": probe.seconds("load_pretrained"),
        "first_run_s": wall,
        "step_s": statistics.median(c["s"] for c in steady),
        "first_step_s": steps[0]["s"],
        "tokens_per_step": statistics.median(tokens),
        "positions_per_step": positions,
        "flop_per_s": flops / sum(c["s"] for c in steady),
        "weights_bytes": params * itemsize,
        "losses": [r["loss"] for r in _read_jsonl(work / "train" / "metrics.jsonl")],
        "jit": probe.analyse(),
    }


def stage_export(args, work: Path, models: dict, itemsize: int) -> dict:
    import w2s_jax.lora
    import w2s_jax.models
    from w2s_jax.commands import export as command

    probe = Probe()
    for module, name in ((w2s_jax.models, "load_pretrained"), (w2s_jax.models, "save_pretrained")):
        probe.wrap(module, name)
    for name in ("load_lora_into", "merge_lora"):
        probe.wrap(w2s_jax.lora, name)
    argv = ["--expert", models["expert"]["folder"], "--lora", work / "train"]
    wall = _run_command(command, [*argv, "--out", work / "exported"], probe)
    return {
        "load_s": probe.seconds("load_pretrained"),
        "first_run_s": wall,
        "restore_s": probe.seconds("load_lora_into"),
        "merge_s": probe.seconds("merge_lora"),
        "write_s": probe.seconds("save_pretrained"),
        "written_bytes": sum(f.stat().st_size for f in (work / "exported").glob("*.safetensors")),
        "jit": {},
    }


def stage_eval(args, work: Path, models: dict, itemsize: int) -> dict:
    from w2s_jax.commands import eval as command
    from w2s_jax.models import load_tokenizer
    from w2s_jax.prompts import EVAL_SYSTEM_PROMPT, prompt_ids

    probe = Probe()
    argv = ["--model", work / "exported", "--data", work / "questions.jsonl", "--dtype", args.dtype]
    argv += ["--batch-size", args.batch_size, "--max-new-tokens", args.max_new_tokens]

    def count(folder: Path):
        rows, tokenizer = _read_jsonl(folder / "predictions.jsonl"), load_tokenizer(argv[1])
        chat = dict(style="chat", system_prompt=EVAL_SYSTEM_PROMPT)
        prompts = [prompt_ids(tokenizer, r["question"], **chat) for r in rows]
        return [r["num_tokens"] for r in rows], sum(map(len, prompts))

    result = _generation(command, work, "eval", [*argv, "--no-progress"], probe, count)
    flops = 2 * models["expert"]["params"] * (result["prompt_tokens"] + result["generated_tokens"])
    summary = json.loads((work / "eval_warm" / "summary.json").read_text())
    return result | {
        "flop_per_s": flops / result["generate_s"],
        "accuracy": summary["accuracy_text"],
        "jit": probe.analyse(),
    }


def stage_peak() -> dict:
    """Machine description and measured matmul FLOP/s in float32 and bfloat16."""
    import jax
    import jax.numpy as jnp
    from common import machine_description, median_seconds

    n = 4096 if jax.default_backend() == "cpu" else 8192
    dot, peaks = jax.jit(jnp.dot), {}
    for name in ("float32", "bfloat16"):
        a = jax.random.normal(jax.random.key(0), (n, n), name)
        peaks[name] = 2 * n**3 / median_seconds(lambda a=a: dot(a, a).block_until_ready(), 3)
        log(f"matmul peak {name} ({n}^3): {peaks[name] / 1e9:.0f} GFLOP/s")
    return {"machine": machine_description(), "matmul_n": n, "matmul_flop_per_s": peaks}


def run_stage(args) -> None:
    """Child process: one stage; its result (with peak RSS and device memory) to --result."""
    if args.stage == "build":
        result = build.ensure_checkpoints(Path(args.cache), args.layers)
    elif args.stage == "peak":
        result = stage_peak()
    else:
        import jax

        work = Path(args.cache) / "runs" / _tag(args)
        models = json.loads((work / "models.json").read_text())
        backend = jax.default_backend()
        dtype = {"cpu": "float32"}.get(backend, "bfloat16") if args.dtype == "auto" else args.dtype
        stage = globals()[f"stage_{args.stage}"]
        result = stage(args, work, models, 4 if dtype == "float32" else 2)
        stats = jax.devices()[0].memory_stats() or {}
        result |= {"backend": backend, "compute_dtype": dtype}
        result["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(args.result).write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------- parent side: driving


def _tag(args) -> str:
    return f"{args.layers or 'all'}layers-{args.dtype}"


def run_child(stage: str, work: Path) -> dict:
    """This script with --stage STAGE in a fresh process; its result, or {"error": ...}."""
    result = work / f"{stage}.result.json"
    result.unlink(missing_ok=True)
    start = time.perf_counter()
    command = [sys.executable, __file__, *sys.argv[1:], "--stage", stage, "--result", result]
    status = subprocess.run([str(c) for c in command]).returncode
    if status != 0 or not result.is_file():
        return {"error": f"exit status {status}", "wall_s": time.perf_counter() - start}
    return json.loads(result.read_text()) | {"wall_s": time.perf_counter() - start}


def check_targets(stages: dict) -> list[dict]:
    """The issue's memory targets (defined on the CPU at --dtype auto)."""
    targets = []
    for name, stage, margin, what in (
        ("sampling", "sample", 1, "weights (both models) + {kv} GiB KV cache + 1 GiB"),
        ("LoRA train", "train", 2, "expert weights + 2 GiB"),
    ):
        r = stages.get(stage, {})
        if "peak_rss_bytes" in r:
            limit = 1.3 * r["weights_bytes"] + r.get("kv_cache_bytes", 0) + margin * GiB
            what = what.format(kv=_gib(r.get("kv_cache_bytes")))
            text = f"{name} peak RSS {_gib(r['peak_rss_bytes'])} GiB <= 1.3 x "
            text += f"{_gib(r['weights_bytes'])} GiB {what} = {_gib(limit)} GiB"
            targets.append({"name": stage, "ok": r["peak_rss_bytes"] <= limit, "text": text})
    return targets


def _gib(value) -> str:
    return "—" if value is None else f"{value / GiB:.2f}"


def _steady(stage: str, r: dict) -> str:
    if stage == "train":
        tokens, first = r["tokens_per_step"], r["first_step_s"]
        return f"{r['step_s']:.2f} s/step ({tokens:.0f} tokens; first step {first:.1f} s)"
    if stage == "export":
        return f"restore {r['restore_s']:.1f}, merge {r['merge_s']:.1f}, write {r['write_s']:.1f} s"
    return f"{r['decode_s_per_step'] * 1e3:.0f} ms/decode step, {r['tokens_per_s']:.0f} tokens/s"


def markdown(report: dict) -> str:
    """The stage table, then one row per jitted function."""
    peaks = report["peak"].get("matmul_flop_per_s", {})
    lines = [
        "| stage | load s | lower+compile s | first run s | steady | peak RSS GiB | "
        "device peak GiB | GFLOP/s (% of matmul peak) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    jit_lines = [
        "| stage | jitted function | calls (shapes) | lower+compile s | first call s | "
        "steady call s | XLA temp / argument / output GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage, r in report["stages"].items():
        if "error" in r:
            lines.append(f"| {stage} | failed: {r['error']} |" + " |" * 6)
            continue
        rate = "—"
        if "flop_per_s" in r:
            share = 100 * r["flop_per_s"] / peaks[r["compute_dtype"]]
            rate = f"{r['flop_per_s'] / 1e9:.1f} ({share:.0f}%)"
        compile_s = sum(j["lower_s"] + j["compile_s"] for j in r["jit"].values())
        compile_s = f"{compile_s:.1f}" if r["jit"] else "—"
        cells = [stage, f"{r['load_s']:.1f}", compile_s, f"{r['first_run_s']:.1f}"]
        cells += [_steady(stage, r), _gib(r["peak_rss_bytes"]), _gib(r["device_peak_bytes"]), rate]
        lines.append("| " + " | ".join(cells) + " |")
        for name, j in r["jit"].items():
            steady = "—" if j["steady_s"] is None else f"{j['steady_s']:.2f}"
            memory = " / ".join(_gib(j[f"{k}_bytes"]) for k in ("temp", "argument", "output"))
            cells = [stage, name, f"{j['calls']} ({j['shapes']})"]
            cells += [f"{j['lower_s'] + j['compile_s']:.1f}", f"{j['first_s']:.2f}", steady, memory]
            jit_lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + jit_lines)


def main() -> None:
    args = parse_args()
    if args.stage:
        return run_stage(args)
    started, cache = time.perf_counter(), Path(args.cache).expanduser().resolve()
    work = cache / "runs" / _tag(args)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log(f"checkpoints in {cache} (built once; minutes at full size)")
    models = run_child("build", work)
    if "error" in models:
        raise SystemExit(f"building the checkpoints failed: {models['error']}")
    (work / "models.json").write_text(json.dumps(models, indent=1))
    for role in ("expert", "amateur"):
        m = models[role]
        log(
            f"{role}: {m['params'] / 1e6:.1f}M parameters, {m['shape']['num_hidden_layers']} layers"
        )
    log(f"tokenizer: {models['tokenizer']}")
    from w2s_jax.data.arithmetic import write_split

    write_split(work / "questions.jsonl", "test", args.questions, seed=0)
    report = {"command": " ".join(sys.argv), "settings": vars(args), "models": models}
    report |= {"peak": run_child("peak", work), "stages": {}}
    for stage in STAGES:
        log(f"stage {stage}: starting (a child process)")
        result = report["stages"][stage] = run_child(stage, work)
        rss, status = _gib(result.get("peak_rss_bytes")), result.get("error", "done")
        log(f"stage {stage}: {status} in {result['wall_s']:.0f} s, peak RSS {rss} GiB")
        if "error" in result:
            break
    report |= {"targets": check_targets(report["stages"]), "wall_s": time.perf_counter() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nmachine: {report['peak'].get('machine')}\ntokenizer: {models['tokenizer']}")
    print(f"dtype {args.dtype}; {args.questions} questions, batch {args.batch_size}, ", end="")
    print(f"{args.max_new_tokens} new tokens\n")
    print(markdown(report))
    backend = report["stages"].get("sample", {}).get("backend")
    note = (
        "" if args.dtype == "auto" and backend == "cpu" else " (defined on the CPU at --dtype auto)"
    )
    print(f"\ntargets{note}")
    for target in report["targets"]:
        print(f"  {'PASS' if target['ok'] else 'FAIL'} {target['text']}")
    print(f"\nwall {report['wall_s']:.0f} s; JSON -> {out}")


if __name__ == "__main__":
    main()
