"""Scanned layer stack vs the per-layer loop: compile time, memory per remat policy, step time.

1. Compile seconds (trace + lower, then XLA compile) of prefill, one decode step and a LoRA
   train step at the Qwen2.5-Math-1.5B and Qwen2.5-7B shapes, from shapes alone
   (`jax.jit(f).lower(ShapeDtypeStructs).compile()`, no weights), loop and scan side by
   side in one process, the two layouts interleaved in each repetition, medians.
2. XLA's memory analysis (`compiled.memory_analysis()`) of a LoRA step and a full
   fine-tuning step (AdamW) at the 1.5B shape for each remat policy and layout.
3. Steady seconds per call of the same three programs at a small shape (or the 1.5B
   shape with 4 of its layers) with random weights (equal in both layouts), the layouts
   interleaved, medians after a warm-up.

The train step is next-token cross-entropy over every position of a [B, T] batch through
the full logits, AdamW on the trainable parameters (LoRA rank 8 on q_proj and v_proj, or
every parameter), parameters and optimizer state donated. The persistent compilation cache
is off and JAX's caches are cleared before every compile.

    nice -n 10 .venv/bin/python benchmarks/compile_time.py                 # everything
    nice -n 10 .venv/bin/python benchmarks/compile_time.py --shapes 1.5b --no-memory
    nice -n 10 .venv/bin/python benchmarks/compile_time.py --shapes "" --no-memory \
        --steady-shape 1.5b-4l --steady-prompt 256 --steady-reps 5   # step times only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_description, median_seconds  # noqa: E402

LAYOUTS = ("loop", "scan")
PROGRAMS = ("prefill", "decode", "lora_step")
DONATED = {"prefill": (), "decode": (1,), "lora_step": (0, 1)}
REMATS = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
GiB = 2**30
# (hidden, layers, heads, kv heads, intermediate, vocab, tied)
SHAPES = {
    "1.5b": (1536, 28, 12, 2, 8960, 151936, True),  # Qwen2.5-Math-1.5B
    "7b": (3584, 28, 28, 4, 18944, 152064, False),  # Qwen2.5-7B
    "small": (256, 8, 4, 2, 768, 4096, True),  # steady-step comparison on the CPU
    "1.5b-4l": (1536, 4, 12, 2, 8960, 151936, True),  # the 1.5B shape, 4 of its 28 layers
}


def log(message: str) -> None:
    print(f"[compile_time {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--shapes", default="1.5b,7b", help="Comma-separated shapes to compile (1.5b, 7b).")
    add("--programs", default=",".join(PROGRAMS))
    add("--reps", type=int, default=3, help="Compiles per program and layout (median).")
    add("--batch", type=int, default=8, help="Rows of prefill, decode and the train step.")
    add("--prompt", type=int, default=256, help="Prompt width (prefill) and decode slots / 2.")
    add("--train-len", type=int, default=512, help="Train step sequence length.")
    add("--dtype", default="float32")
    add("--no-memory", action="store_true", help="Skip the remat memory analysis.")
    add("--no-steady", action="store_true", help="Skip the small-shape step times.")
    add("--steady-reps", type=int, default=15)
    add("--steady-shape", default="small", help="Shape of the step times (small, 1.5b-4l).")
    add("--steady-prompt", type=int, default=64, help="Step times' prompt width (slots / 3).")
    add("--out", default="bench_out/compile_time.json")
    return parser.parse_args()


def model_config(shape: str, *, layer_stack: str, remat: str = "none", dtype: str = "float32"):
    from w2s_jax.models import ModelConfig

    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    return ModelConfig(
        model_type="qwen2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        tie_word_embeddings=tied,
        qkv_bias=True,
        dtype=dtype,
        layer_stack=layer_stack,
        remat=remat,
    )


def build(config, lora_rank: int, seed: int | None = None):
    """The model (abstract when `seed` is None) with LoRA adapters when `lora_rank`."""
    from flax import nnx

    from w2s_jax.lora import LoRAConfig, apply_lora
    from w2s_jax.models import CausalLM

    def make():
        model = CausalLM(config, rngs=nnx.Rngs(0 if seed is None else seed))
        apply_lora(model, LoRAConfig(rank=lora_rank, dropout=0.0))
        return model

    return nnx.eval_shape(make) if seed is None else make()


def programs(model, args, lora_rank: int = 8):
    """name -> (function, its arguments) for prefill, one decode step and a train step."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from w2s_jax.generate import prefill
    from w2s_jax.lora import LoRAConfig, trainable_filter

    b, p, t = args.batch, args.prompt, args.train_len
    ids = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    graphdef, state = nnx.split(model)
    cache = jax.eval_shape(lambda: model.init_cache(b, 3 * p))

    def run_prefill(state, ids_bp, mask_bp):
        return prefill(nnx.merge(graphdef, state), ids_bp, mask_bp)

    def decode_step(state, cache, ids_b1, slot):
        m = nnx.merge(graphdef, state)
        mask_b1s = jnp.arange(3 * p)[None, None] <= slot
        positions_b1 = jnp.full(ids_b1.shape, slot)
        hidden, cache = m.forward(
            ids_b1, positions_b1, jnp.broadcast_to(mask_b1s, (b, 1, 3 * p)), cache, slot
        )
        return m.logits(hidden[:, 0]), cache

    g, params, rest = nnx.split(model, trainable_filter(LoRAConfig(rank=lora_rank)), ...)
    tx = optax.adamw(1e-4)

    def train_step(params, opt_state, rest, ids_bt):
        def loss_fn(params):
            m = nnx.merge(g, params, rest, copy=True)
            logits = m(ids_bt)[:, :-1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids_bt[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = jax.eval_shape(tx.init, params)
    return {
        "prefill": (jax.jit(run_prefill), (state, ids(b, p), ids(b, p))),
        "decode": (
            jax.jit(decode_step, donate_argnums=1),
            (state, cache, ids(b, 1), jax.ShapeDtypeStruct((), jnp.int32)),
        ),
        "lora_step": (
            jax.jit(train_step, donate_argnums=(0, 1)),
            (params, opt_state, rest, ids(b, t)),
        ),
    }


def compile_seconds(fn, arguments) -> tuple[float, float, object]:
    """(trace + lower seconds, compile seconds, compiled) with JAX's caches cleared first."""
    import jax

    jax.clear_caches()
    start = time.perf_counter()
    lowered = fn.lower(*jax.tree.map(_abstract, arguments))
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at, compiled


def _abstract(x):
    import jax

    return jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x


def measure_compile(args) -> list[dict]:
    rows = []
    for shape in filter(None, args.shapes.split(",")):
        for program in args.programs.split(","):
            times = {layout: [] for layout in LAYOUTS}
            for _ in range(args.reps):
                for layout in LAYOUTS:  # interleaved: machine load hits both alike
                    config = model_config(shape, layer_stack=layout, dtype=args.dtype)
                    fn, arguments = programs(build(config, 8), args)[program]
                    lower_s, compile_s, _ = compile_seconds(fn, arguments)
                    times[layout].append((lower_s, compile_s))
                    log(f"{shape} {program} {layout}: {lower_s:.1f} s + {compile_s:.1f} s")
            row = {"shape": shape, "program": program}
            for layout in LAYOUTS:
                row[f"{layout}_lower_s"] = statistics.median(t[0] for t in times[layout])
                row[f"{layout}_compile_s"] = statistics.median(t[1] for t in times[layout])
                row[f"{layout}_total_s"] = statistics.median(sum(t) for t in times[layout])
            row["ratio"] = row["loop_total_s"] / row["scan_total_s"]
            rows.append(row)
    return rows


def measure_memory(args) -> list[dict]:
    """XLA's memory analysis of the LoRA and full fine-tuning steps at the 1.5B shape."""
    rows = []
    for kind, rank in (("lora", 8), ("full", 0)):
        for remat in REMATS:
            for layout in LAYOUTS:
                config = model_config("1.5b", layer_stack=layout, remat=remat, dtype=args.dtype)
                fn, arguments = programs(build(config, rank), args, lora_rank=rank)["lora_step"]
                _, compile_s, compiled = compile_seconds(fn, arguments)
                m = compiled.memory_analysis()
                peak = (
                    m.argument_size_in_bytes
                    + m.output_size_in_bytes
                    + m.temp_size_in_bytes
                    - m.alias_size_in_bytes
                )
                row = {
                    "step": kind,
                    "remat": remat,
                    "layout": layout,
                    "temp_gib": m.temp_size_in_bytes / GiB,
                    "arguments_gib": m.argument_size_in_bytes / GiB,
                    "peak_gib": peak / GiB,
                    "compile_s": compile_s,
                }
                log(f"memory {row}")
                rows.append(row)
    return rows


def measure_steady(args) -> list[dict]:
    """Seconds per call at `--steady-shape`, both layouts with equal random weights."""
    import jax
    from flax import nnx

    from w2s_jax.models.stacking import stack_layers

    small = argparse.Namespace(
        **{**vars(args), "batch": 8, "prompt": args.steady_prompt, "train_len": 128}
    )
    models = {}
    for layout in LAYOUTS:
        config = model_config(args.steady_shape, layer_stack=layout, dtype="float32")
        models[layout] = build(config, 8, 0)
    nnx.update(models["scan"], stack_layers(nnx.state(models["loop"], nnx.Param)))
    rows = []
    key = jax.random.key(0)
    for program in PROGRAMS:
        calls = {}
        for layout in LAYOUTS:
            fn, arguments = programs(models[layout], small)[program]
            calls[layout] = _call(fn, [_concrete(a, key) for a in arguments], DONATED[program])
            for _ in range(2):  # compile and warm up
                calls[layout]()
        times = {layout: [] for layout in LAYOUTS}
        for _ in range(args.steady_reps):  # interleaved: machine load hits both alike
            for layout in LAYOUTS:
                times[layout].append(median_seconds(calls[layout], 1, warmup=0))
        row = {"program": program}
        row.update({f"{layout}_ms": 1e3 * statistics.median(times[layout]) for layout in LAYOUTS})
        row["scan_over_loop"] = row["scan_ms"] / row["loop_ms"]
        log(f"steady {row}")
        rows.append(row)
    return rows


def _call(fn, arguments: list, donated: tuple[int, ...]):
    """A call of `fn` on fresh copies of its donated arguments, waiting for the result."""
    import jax

    def call():
        fresh = [
            jax.tree.map(lambda x: x.copy(), a) if i in donated else a
            for i, a in enumerate(arguments)
        ]
        return jax.block_until_ready(fn(*fresh))

    return call


def _concrete(tree, key):
    """Arrays for the abstract leaves of `tree` (token ids in [0, 100), zeros elsewhere)."""
    import jax
    import jax.numpy as jnp

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            if x.dtype == jnp.int32:
                return jax.random.randint(key, x.shape, 0, 100) if x.shape else jnp.int32(64)
            return jnp.zeros(x.shape, x.dtype)
        return x

    return jax.tree.map(leaf, tree)


def main() -> None:
    args = parse_args()
    import jax

    jax.config.update("jax_enable_compilation_cache", False)
    result = {"machine": machine_description(), "args": vars(args)}
    log(result["machine"])
    if not args.no_steady:
        result["steady"] = measure_steady(args)
    result["compile"] = measure_compile(args)
    if not args.no_memory:
        result["memory"] = measure_memory(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out}")
    for row in result["compile"]:
        log(
            f"{row['shape']} {row['program']}: loop {row['loop_total_s']:.1f} s, "
            f"scan {row['scan_total_s']:.1f} s ({row['ratio']:.1f}x)"
        )


if __name__ == "__main__":
    main()
