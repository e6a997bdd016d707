"""w2s_jax.generate vs transformers generate (greedy, KV cache) on the same random weights.

A ~64M-parameter Qwen2-shaped model is made locally with `init_random`, exported with
`save_pretrained` and loaded by transformers, so both sides run identical float32
weights. Prints median tokens/s of each side, their ratio, and the achieved FLOP/s
of a forward pass and of decoding against a measured float32 matmul peak.

    .venv/bin/python benchmarks/generate.py            # batch 16, prompt ~100, 128 new tokens
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import machine_description, matmul_peak, median_seconds
from flax import nnx
from transformers import AutoModelForCausalLM

from w2s_jax.generate import generate, left_pad
from w2s_jax.models import ModelConfig, init_random, save_pretrained

CONFIG = {
    "model_type": "qwen2",
    "vocab_size": 32768,
    "hidden_size": 640,
    "intermediate_size": 1728,
    "num_hidden_layers": 10,
    "num_attention_heads": 10,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}


def memory_bandwidth(n_bytes=2**28, reps=5):
    """Measured read bandwidth (bytes/s): a jitted sum over a 256 MiB float32 array."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return n_bytes / median_seconds(lambda: total(x).block_until_ready(), reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=None, help="default: torch's")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    config = ModelConfig.from_hf_json(CONFIG)
    model = init_random(config, seed=0)
    rs = np.random.RandomState(0)
    lengths = rs.randint(args.prompt_len - 10, args.prompt_len + 11, args.batch)
    prompts = [rs.randint(3, config.vocab_size, n).tolist() for n in lengths]
    eos = [1]  # same stop id on both sides

    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder)
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, mask = left_pad(prompts, 0)
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    outputs = {}

    def run_jax():
        outputs["jax"] = generate(model, prompts, max_new_tokens=args.new_tokens, eos_ids=eos)

    def run_hf():
        with torch.inference_mode():
            out = hf_model.generate(
                ids_t,
                attention_mask=mask_t,
                max_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=0,
            )
        outputs["hf"] = out[:, ids.shape[1] :].numpy()

    jax_s = median_seconds(run_jax, args.reps)
    hf_s = median_seconds(run_hf, args.reps)
    generated = int(outputs["jax"].lengths.sum())
    hf_tokens = outputs["hf"]
    same = (
        hf_tokens.shape == outputs["jax"].tokens.shape
        and (hf_tokens == outputs["jax"].tokens).mean()
    )

    # forward pass FLOP/s: one jitted forward over the padded prompts
    forward = nnx.jit(lambda m, x, k: m(x, k))
    forward_s = median_seconds(lambda: forward(model, ids, mask).block_until_ready(), args.reps)
    peak, torch_peak = matmul_peak(), matmul_peak(backend="torch")
    bandwidth = memory_bandwidth()
    params = config.num_params
    forward_flops = 2 * params * ids.size / forward_s
    decode_flops = 2 * params * generated / jax_s
    # each decode step streams every weight once (batch 16 is far below the ridge point)
    steps = int(outputs["jax"].lengths.max()) - 1
    decode_bytes = steps * params * 4 / max(jax_s - forward_s, 1e-9)

    print(f"machine: {machine_description()}; torch threads {torch.get_num_threads()}")
    print(f"model: Qwen2-shaped, {params / 1e6:.1f}M params, float32")
    print(f"batch {args.batch}, prompt {lengths.min()}-{lengths.max()}, {args.new_tokens} new")
    print(f"greedy tokens equal to transformers: {same:.1%} of positions")
    print(f"w2s_jax generate : {jax_s:7.2f} s  {generated / jax_s:8.1f} tokens/s")
    print(f"transformers     : {hf_s:7.2f} s  {hf_tokens.size / hf_s:8.1f} tokens/s")
    print(f"speed-up         : {(generated / jax_s) / (hf_tokens.size / hf_s):.2f}x tokens/s")
    print(f"matmul peak (f32, 2048^3): JAX {peak / 1e9:.1f} GFLOP/s, torch {torch_peak / 1e9:.1f}")
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s")
    print(
        f"forward [{ids.shape[0]}x{ids.shape[1]}]: {forward_flops / 1e9:7.1f} GFLOP/s "
        f"({forward_flops / peak:.0%} of peak)"
    )
    print(
        f"generate (2*params*tokens): {decode_flops / 1e9:7.1f} GFLOP/s "
        f"({decode_flops / peak:.0%} of peak); decode streams weights at "
        f"~{decode_bytes / 1e9:.1f} GB/s ({decode_bytes / bandwidth:.0%} of measured bandwidth)"
    )


if __name__ == "__main__":
    main()
