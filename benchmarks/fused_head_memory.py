"""XLA temporaries of the fused kernels with a tied LM head: transposed view vs as stored.

A tied model's head is its embedding [V, D]. Passed as ``embedding.T`` with
``head_layout="dv"`` (what ``lm_head_kernel()`` gives), the head is a loop-invariant
operand of the position-chunk loop and XLA:CPU materializes the transposed [D, V] copy;
passed as stored with ``head_layout="vd"`` (what ``CausalLM.lm_head_matrix()`` gives),
no copy is made. An untied [D, V] kernel with ``"dv"`` is the reference. Last, the
same for sampling's ``_score`` (the amateur's pass + ``fused_kl_and_target``) with tied
models. Compile only (abstract float32 shapes of Qwen2.5-Math-1.5B and Qwen2.5-0.5B;
nothing runs), so it takes seconds:

    .venv/bin/python benchmarks/fused_head_memory.py
"""

from __future__ import annotations

import argparse

from common import machine_description

VOCAB, TOKENS = 151936, 151665  # Qwen2.5 head rows, tokenizer size
D_EXPERT, D_AMATEUR = 1536, 896  # Qwen2.5-Math-1.5B, Qwen2.5-0.5B
ALPHA, K = 0.2, 16


def temp_gib(fn, *shapes) -> float:
    """XLA's temporary bytes of jit(fn) at these abstract shapes, in GiB."""
    import jax

    compiled = jax.jit(fn).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**30


def heads(d: int, case: str):
    """(abstract stored matrix, function of it giving the head passed, layout) per case."""
    import jax
    import jax.numpy as jnp

    if case == "untied":
        return jax.ShapeDtypeStruct((d, VOCAB), jnp.float32), lambda w: w, "dv"
    embedding = jax.ShapeDtypeStruct((VOCAB, d), jnp.float32)
    if case == "tied, embedding.T as dv":
        return embedding, lambda e: e.T, "dv"
    return embedding, lambda e: e, "vd"


CASES = ("tied, embedding.T as dv", "tied, embedding as vd", "untied")


def kl_and_target(batch: int, length: int, chunk: int, case: str) -> float:
    """fused_kl_and_target, as sampling's `_score` calls it."""
    import jax
    import jax.numpy as jnp

    from w2s_jax import divergence as dv

    (we, fe, le), (wa, fa, la) = heads(D_EXPERT, case), heads(D_AMATEUR, case)

    def score(he, we, ha, wa):
        return dv.fused_kl_and_target(
            he,
            fe(we),
            ha,
            fa(wa),
            ALPHA,
            K,
            chunk_size=chunk,
            vocab_size=TOKENS,
            expert_head_layout=le,
            amateur_head_layout=la,
        )

    hidden = [jax.ShapeDtypeStruct((batch, length, d), jnp.float32) for d in (D_EXPERT, D_AMATEUR)]
    return temp_gib(score, hidden[0], we, hidden[1], wa)


def loss_grads(batch: int, length: int, chunk: int, case: str, wrt_head: bool) -> float:
    """fused_contrastive_loss forward + backward wrt hidden (and the head)."""
    import jax
    import jax.numpy as jnp

    from w2s_jax import divergence as dv

    w, f, layout = heads(D_EXPERT, case)

    def loss_and_grads(h, w, ids, weights, mask):
        def loss(h, w):
            return dv.fused_contrastive_loss(
                h,
                f(w),
                ids,
                weights,
                mask,
                chunk_size=chunk,
                vocab_size=TOKENS,
                head_layout=layout,
            )

        return jax.value_and_grad(loss, argnums=(0, 1) if wrt_head else 0)(h, w)

    sd = jax.ShapeDtypeStruct
    return temp_gib(
        loss_and_grads,
        sd((batch, length, D_EXPERT), jnp.float32),
        w,
        sd((batch, length, K), jnp.int32),
        sd((batch, length, K), jnp.float32),
        sd((batch, length), bool),
    )


def score(layers: int, batch: int, length: int, chunk: int, transposed: bool) -> float:
    """sampling's `_score` (amateur pass + fused KL/targets) with tied Qwen2.5 models.

    ``transposed`` gives it the heads the way it took them before: ``lm_head_kernel()``
    (``embedding.T``) as ``"dv"``.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from w2s_jax import sampling
    from w2s_jax.models import CausalLM, ModelConfig

    def abstract(hidden, intermediate, heads, kv_heads):
        config = ModelConfig.from_hf_json(
            {
                "model_type": "qwen2",
                "vocab_size": VOCAB,
                "hidden_size": hidden,
                "intermediate_size": intermediate,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "tie_word_embeddings": True,
            }
        )
        return nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))

    expert, amateur = abstract(D_EXPERT, 8960, 12, 2), abstract(D_AMATEUR, 4864, 14, 2)
    prompt = 64
    sd = jax.ShapeDtypeStruct
    slots = (batch, prompt + length - 1)
    args = (*expert, *amateur, sd((batch, length, D_EXPERT), jnp.float32))
    args += (sd(slots, jnp.int32), sd(slots, jnp.int32), sd((batch, length), bool))
    args += (sd((), jnp.float32), sd((), bool))
    as_stored = CausalLM.lm_head_matrix
    if transposed:
        CausalLM.lm_head_matrix = lambda model: (model.lm_head_kernel(), "dv")
    try:
        jax.clear_caches()  # trace again with this head
        lowered = sampling._score.lower(
            *args, alpha=ALPHA, top_k=K, chunk_size=chunk, vocab_size=TOKENS, prefix_len=0
        )
    finally:
        CausalLM.lm_head_matrix = as_stored
    return lowered.compile().memory_analysis().temp_size_in_bytes / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers in the _score part")
    args = parser.parse_args()
    shape = (args.batch, args.length, args.chunk_size)
    print(machine_description())
    print(
        f"float32, V={VOCAB} (vocab_size {TOKENS}), D={D_EXPERT}/{D_AMATEUR}, "
        f"B={args.batch}, T={args.length}, chunk {args.chunk_size}, k={K}"
    )
    print(f"\n{'XLA temporaries, GiB':44s}" + "".join(f"{case:>26s}" for case in CASES))
    rows = {
        "fused_kl_and_target (expert + amateur)": lambda c: kl_and_target(*shape, c),
        "fused_contrastive_loss, grad wrt hidden": lambda c: loss_grads(*shape, c, False),
        "fused_contrastive_loss, grad wrt hidden+head": lambda c: loss_grads(*shape, c, True),
    }
    for name, fn in rows.items():
        print(f"{name:44s}" + "".join(f"{fn(case):26.3f}" for case in CASES))
    before, after = (score(args.layers, *shape, transposed) for transposed in (True, False))
    print(
        f"\nsampling._score, tied models with {args.layers} layers, prompt 64: "
        f"{before:.3f} GiB with lm_head_kernel() as 'dv', {after:.3f} GiB with "
        f"lm_head_matrix() as stored"
    )


if __name__ == "__main__":
    main()
