"""Memory of a dynamic amateur: one shared base (`model_source.load_pair`) vs two loads.

`w2s sample --expert RUN@900 --amateur RUN@300` (or `--amateur base`) gives two models
on one base folder. Shared, the base is loaded once and both models hold the same base
arrays, each with its own LoRA adapters; separate, each model loads the base on its own
(what two HF folders cost). Each (shape, pair, mode) loads in a fresh child process (no
generation) and reports the bytes of the distinct live device buffers
(`jax.live_arrays()`, deduplicated by buffer) and the peak RSS (ru_maxrss) less the RSS
before loading.

Shapes: the shipped toy expert (w2s_jax/assets/toy_world/expert) and Qwen2.5-Math-1.5B
with random weights (bf16, built once by benchmarks/real_scale_build.py into --cache).
The runs are `w2s train` checkpoint folders written here with random adapters of the
published LoRA shape (rank 8 on q_proj and v_proj) at steps 300 and 900; the memory of
a trained run is the same. Weights load in the checkpoint's dtype (bf16 for both).

    .venv/bin/python benchmarks/dynamic_amateur_memory.py          # toy and 1.5B
    .venv/bin/python benchmarks/dynamic_amateur_memory.py --shapes toy
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import machine_description

REPO = Path(__file__).resolve().parent.parent
TOY_EXPERT = REPO / "w2s_jax" / "assets" / "toy_world" / "expert"
STEPS = (300, 900)
PAIRS = {"two steps": ("{run}@900", "{run}@300"), "base": ("{run}@900", "base")}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--cache", default=str(Path.home() / ".cache" / "w2s_jax" / "real_scale"))
    add("--shapes", default="toy,1.5b", help="comma-separated: toy, 1.5b")
    add("--out", default="bench_out/dynamic_amateur_memory.json")
    add("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


def make_run(run: Path, base: Path) -> Path:
    """A `w2s train` run folder on `base`: checkpoints of random rank-8 q/v adapters at
    STEPS, recording the base's weights fingerprint, and train_config.json naming it."""
    import jax
    from flax import nnx

    from w2s_jax.checkpointing import TrainCheckpoints
    from w2s_jax.files import atomic_write_json
    from w2s_jax.fingerprint import weights_fingerprint_record
    from w2s_jax.lora import LoRAConfig, apply_lora
    from w2s_jax.models import ModelConfig, init_random

    if (run / "train_config.json").is_file():
        return run
    lora = LoRAConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
    config = ModelConfig.from_hf_json(base / "config.json")

    def adapted():
        model = init_random(config, seed=0)
        apply_lora(model, lora)
        return model

    template = nnx.state(nnx.eval_shape(adapted), nnx.LoRAParam)  # nothing materialized
    meta = {
        "lora": lora.to_dict(),
        "model_config": config.to_hf_dict(),
        "tokenizer": str(base),
        "init": "pretrained",
        "expert_weights_hashed": weights_fingerprint_record(base),
    }
    checkpoints = TrainCheckpoints(run, save_every=1, keep=len(STEPS))
    for step in STEPS:
        leaves, treedef = jax.tree.flatten(template)
        keys = jax.random.split(jax.random.key(step), len(leaves))
        drawn = [
            0.01 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
        ]
        params = jax.tree.unflatten(treedef, drawn)
        checkpoints.save(step, params, {"mu": params}, meta, force=True)
    checkpoints.close()
    atomic_write_json(run / "train_config.json", {"expert": str(base.resolve())})
    return run


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec: dict) -> dict:
    """Load one pair (shared or separate) and measure; run in a fresh process."""
    import gc
    import resource

    import jax
    from flax import nnx

    from w2s_jax.lora import load_lora_into
    from w2s_jax.model_source import load_pair, resolve_pair
    from w2s_jax.models import load_pretrained

    sources = resolve_pair(spec["expert"], spec["amateur"])
    jax.numpy.zeros(1).block_until_ready()  # the backend's own memory, before loading
    before = _rss_bytes()
    if spec["mode"] == "shared":
        models = load_pair(*sources)
    else:
        models = [load_pretrained(s.folder) for s in sources]
        for model, source in zip(models, sources, strict=True):
            if source.checkpoints is not None:
                load_lora_into(model, source.checkpoints, step=source.step)
    jax.block_until_ready([nnx.state(m) for m in models])
    gc.collect()
    buffers = {}
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            buffers[shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
    base_only = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    one_model = sum(x.nbytes for x in jax.tree.leaves(nnx.state(models[0], base_only)))
    adapters = [sum(x.nbytes for x in jax.tree.leaves(nnx.state(m, nnx.LoRAParam))) for m in models]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        **spec,
        "live_buffer_bytes": sum(buffers.values()),
        "live_buffers": len(buffers),
        "base_model_bytes": one_model,
        "adapter_bytes": adapters,
        "peak_rss_bytes": peak,
        "peak_rss_over_start_bytes": peak - before,
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.2f} MiB"


def main() -> None:
    args = parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    sys.path.insert(0, str(REPO))
    cache = Path(args.cache).expanduser()
    bases = {}
    for shape in args.shapes.split(","):
        if shape == "toy":
            bases[shape] = TOY_EXPERT
        elif shape == "1.5b":
            import real_scale_build

            bases[shape] = Path(
                real_scale_build.ensure_checkpoints(cache, None)["expert"]["folder"]
            )
        else:
            raise SystemExit(f"unknown shape {shape!r} (toy, 1.5b)")
    rows = []
    for shape, base in bases.items():
        run = make_run(cache.parent / "dynamic_amateur" / f"{shape}-run", base)
        for pair, (expert, amateur) in PAIRS.items():
            for mode in ("shared", "separate"):
                spec = {"shape": shape, "pair": pair, "mode": mode}
                spec |= {"expert": expert.format(run=run), "amateur": amateur.format(run=run)}
                done = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(spec)],
                    capture_output=True,
                    text=True,
                )
                lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if done.returncode or not lines:
                    raise SystemExit(f"{spec}: child failed\n{done.stderr[-3000:]}")
                rows.append(json.loads(lines[-1][len("RESULT ") :]))
                r = rows[-1]
                print(
                    f"{shape:5} {pair:9} {mode:8} live {_gib(r['live_buffer_bytes'])} "
                    f"peak RSS +{_gib(r['peak_rss_over_start_bytes'])}",
                    flush=True,
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_description(), "rows": rows}, indent=1))
    print(f"\n{machine_description()}\n")
    print("| shape | pair | mode | live device buffers | one base model | "
          "adapters (2 sets) | peak RSS over start |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['pair']} | {r['mode']} | {_gib(r['live_buffer_bytes'])} | "
            f"{_gib(r['base_model_bytes'])} | {_gib(sum(r['adapter_bytes']))} | "
            f"{_gib(r['peak_rss_over_start_bytes'])} |"
        )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
