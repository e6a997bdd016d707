"""Packed training (w2s train) vs the reference trainer's one-position-per-forward scheme.

Same random Qwen2-shaped expert (~50M parameters, made here with transformers),
same synthetic selected positions and sparse targets, same LoRA (rank 8, alpha
16, q_proj/v_proj), AdamW 5e-5 with linear decay, clipping 1.0, 16 positions per
step (8 x 2 accumulation), float32 on this CPU, LoRA dropout 0 so the losses can
be compared step by step.

- ours: `w2s_jax.train.compile_step` (the step `w2s train` runs): one forward over
  each trajectory, the loss gathered at its selected positions.
- reference: the LightReasoner fine-tuning script rebuilt with PyTorch +
  transformers + peft (its `SoftLabelKLTrainer` loop without the HF Trainer
  wrapper): one sample per selected position = the prefix before it, right-padded
  batches of 8, a dense |V| label vector, `F.kl_div(log_softmax, labels,
  "batchmean")`. One defect is fixed so the losses can match: logits are read at
  each row's last real token instead of `[:, -1]` (a padding position for all but
  the longest row). Samples are fed as token ids in our step order (no re-tokenization).
  Its LoRA A matrices are copied from ours (B starts at 0 in both), so the two runs
  are the same training and the loss curves must agree.

Reports median seconds per step after warm-up, selected positions/s, the ratio,
the first-step losses, and FLOP rates against a measured matmul peak. A second
configuration (64 positions per step, no accumulation) shows how packing scales
when a step holds whole trajectories.

    .venv/bin/python benchmarks/training.py      # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import machine_description, matmul_peak

EXPERT = dict(
    vocab_size=32768,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=10,
    num_attention_heads=8,
    num_key_value_heads=2,
)


def make_expert(folder: Path) -> int:
    """Save a random tied-embedding Qwen2 (float32); return its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        **EXPERT, tie_word_embeddings=True, max_position_embeddings=1024, initializer_range=0.05
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def make_samples(folder: Path, *, trajectories: int, seed: int = 0) -> None:
    """GSM8K-like shapes: prompt 80-140 tokens, rollout 128, ~20% positions selected."""
    rng = random.Random(seed)
    records = []
    for i in range(trajectories):
        prompt = [rng.randrange(3, EXPERT["vocab_size"]) for _ in range(rng.randint(80, 140))]
        completion = [rng.randrange(3, EXPERT["vocab_size"]) for _ in range(128)]
        positions = sorted(rng.sample(range(128), rng.randint(20, 30)))
        ids, weights = [], []
        for _ in positions:
            k = rng.randint(1, 5)
            w = sorted((rng.random() + 0.05 for _ in range(k)), reverse=True)
            ids.append(rng.sample(range(3, EXPERT["vocab_size"]), k))
            weights.append([x / sum(w) for x in w])
        records.append(
            {
                "id": f"q{i}",
                "prompt_ids": prompt,
                "completion_ids": completion,
                "positions": positions,
                "target_ids": ids,
                "target_weights": weights,
            }
        )
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


class Ours:
    """`w2s train`'s compiled step on fixed batches; `step(i)` -> (seconds, loss, kl)."""

    def __init__(self, expert: Path, samples: Path, out: Path, *, positions, accum, steps):
        import jax

        from w2s_jax.data.packing import (
            collate_step,
            find_sample_files,
            iter_steps,
            load_trajectories,
        )
        from w2s_jax.sharding import make_mesh
        from w2s_jax.train import compile_step, shard_batch
        from w2s_jax.train_config import TrainSettings

        config = TrainSettings(
            samples=str(samples),
            out=str(out),
            expert=str(expert),
            dtype="float32",
            lora_dropout=0.0,
            batch_positions=positions,
            grad_accum=accum,
            steps=1000,
            length_bucket=64,
        )
        self.mesh = make_mesh(None)
        trajectories, stats = load_trajectories(find_sample_files(samples))
        plan = iter_steps(trajectories, positions_per_step=positions, micro_batches=accum)
        self.batches = [
            collate_step(trajectories, next(plan), k=stats["k"], length_bucket=64)
            for _ in range(steps)
        ]
        self.tokens = [int(b["input_ids"].size) for b in self.batches]  # padded: computed
        self.step_fn, state0, self.rest, _ = compile_step(config, self.mesh)
        self.shardings = jax.tree.map(lambda x: x.sharding, state0)
        self.initial = jax.device_get(state0)
        self.lora_a = {
            ".".join(map(str, path[:-1])): v.get_value()
            for path, v in _flat(self.initial[0])
            if path[-1] == "lora_a"
        }
        self._shard = shard_batch
        self.reset()
        for i in range(steps):  # warm-up: compile every shape, then start again
            self.step(i)
        self.reset()

    def reset(self):
        import jax

        self.state = jax.device_put(self.initial, self.shardings)

    def step(self, i: int):
        import jax

        batch = self._shard(self.batches[i], self.mesh)
        start = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.rest, batch, jax.random.key(i))
        metrics = jax.device_get(metrics)
        return time.perf_counter() - start, float(metrics["loss"]), float(metrics["kl"])


def _flat(state):
    from flax import nnx

    return list(nnx.to_flat_state(state))


class Reference:
    """The reference trainer on the same positions in the same order; `step(i)` -> (s, loss)."""

    def __init__(self, expert: Path, batches, lora_a, *, accum: int):
        import torch
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

        model = AutoModelForCausalLM.from_pretrained(str(expert), dtype=torch.float32)
        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.0,
            bias="none",
            task_type=TaskType.CAUSAL_LM,
        )
        model = get_peft_model(model, lora)
        with torch.no_grad():  # same initial adapters as ours: A copied ([in, r] -> [r, in])
            for name, module in model.named_modules():
                if "default" in getattr(module, "lora_A", {}):
                    key = name.split("base_model.model.", 1)[1]
                    weight = torch.from_numpy(lora_a[key].T.copy())
                    module.lora_A["default"].weight.copy_(weight)
        model.train()
        self.model, self.accum, self.vocab = model, accum, model.config.vocab_size
        # one sample per selected position: (prefix ids, dense label vector), in our order
        self.samples = []
        for arrays in batches:
            t = arrays["input_ids"].shape[2]
            for m in range(arrays["flat_index"].shape[0]):
                for p, flat in enumerate(arrays["flat_index"][m]):
                    row, index = divmod(int(flat), t)
                    labels = torch.zeros(self.vocab)
                    for tid, w in zip(
                        arrays["target_ids"][m, p], arrays["target_weights"][m, p], strict=True
                    ):
                        if w > 0:
                            labels[int(tid)] = float(w)
                    prefix = torch.from_numpy(arrays["input_ids"][m, row, : index + 1].copy())
                    self.samples.append((prefix, labels))
        self.per_device = len(self.samples) // len(batches) // accum
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=5e-5, weight_decay=0.0)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, 0, 1000)
        self.tokens = []

    def step(self, i: int):
        import torch
        import torch.nn.functional as F

        start = time.perf_counter()
        step_loss, step_tokens = 0.0, 0
        for micro in range(self.accum):
            first = (i * self.accum + micro) * self.per_device
            chunk = self.samples[first : first + self.per_device]
            input_ids = torch.nn.utils.rnn.pad_sequence([c[0] for c in chunk], batch_first=True)
            mask = torch.zeros_like(input_ids)
            for r, c in enumerate(chunk):
                mask[r, : len(c[0])] = 1
            step_tokens += int(mask.numel())
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
            last = mask.sum(1) - 1  # the fix: the row's last real token, not [:, -1]
            logp = F.log_softmax(logits[torch.arange(len(chunk)), last, : self.vocab], dim=-1)
            labels = torch.stack([c[1] for c in chunk])
            loss = F.kl_div(logp, labels, reduction="batchmean") / self.accum
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.tokens.append(step_tokens)
        return time.perf_counter() - start, step_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per configuration.")
    parser.add_argument("--trajectories", type=int, default=6)
    args = parser.parse_args()

    import torch

    root = Path(tempfile.mkdtemp(prefix="w2s_train_bench_"))
    n_params = make_expert(root / "expert")
    (root / "samples").mkdir()
    make_samples(root / "samples", trajectories=args.trajectories)
    d, v = EXPERT["hidden_size"], EXPERT["vocab_size"]
    body = n_params - d * v  # tied: the embedding/head counted once

    print(f"machine: {machine_description()}; torch threads {torch.get_num_threads()}")
    print(f"expert: random Qwen2 {EXPERT} = {n_params / 1e6:.1f}M parameters, float32")
    xla_peak = matmul_peak() / 1e9
    torch_peak = matmul_peak(backend="torch") / 1e9
    print(f"matmul peak (2048^3 f32): XLA {xla_peak:.1f} GFLOP/s, torch {torch_peak:.1f} GFLOP/s\n")

    ours = Ours(
        root / "expert", root / "samples", root / "o16", positions=16, accum=2, steps=args.steps
    )
    big = Ours(
        root / "expert", root / "samples", root / "o64", positions=64, accum=1, steps=args.steps
    )
    reference = Reference(root / "expert", ours.batches, ours.lora_a, accum=2)
    # interleaved, so that both see the same machine load
    t_ref, l_ref, t_ours, l_ours, t_big = [], [], [], [], []
    for i in range(args.steps):
        seconds, loss = reference.step(i)
        t_ref.append(seconds)
        l_ref.append(loss)
        seconds, _, kl = ours.step(i)
        t_ours.append(seconds)
        l_ours.append(kl)
        t_big.append(big.step(i)[0])
    tok_ref, tok_ours, tok_big = reference.tokens, ours.tokens, big.tokens

    def report(name, times, tokens, positions, head_tokens):
        """One line; FLOPs ~ 4 per weight per token (forward + activation gradients; LoRA)."""
        med = statistics.median(times)
        tok = statistics.median(tokens)
        gflops = 4 * (body * tok + d * v * head_tokens(tok)) / med / 1e9
        print(
            f"{name:<46} {med:7.3f} s/step {positions / med:8.1f} positions/s "
            f"{tok / med:8.0f} tokens/s {gflops:6.1f} GFLOP/s"
        )
        return positions / med

    rate_ref = report(
        "reference (PyTorch+peft, 1 position/forward)", t_ref, tok_ref, 16, lambda t: t
    )
    rate_ours = report("ours, 16 positions/step (2 x 8 packed)", t_ours, tok_ours, 16, lambda t: 16)
    rate_big = report("ours, 64 positions/step (1 x 64 packed)", t_big, tok_big, 64, lambda t: 64)
    print(
        f"\nselected positions/s, ours / reference: {rate_ours / rate_ref:.1f}x (same "
        f"16-position steps), {rate_big / rate_ref:.1f}x (64-position steps)"
    )
    print(
        f"tokens per 16-position step (padded): reference {statistics.median(tok_ref):.0f}, "
        f"ours {statistics.median(tok_ours):.0f}"
    )
    print("step losses (KL(v_C || pi), the reference's objective):")
    for i, (kl, r) in enumerate(zip(l_ours, l_ref, strict=True)):
        print(f"  step {i + 1}: ours {kl:.6f}  reference {r:.6f}  |diff| {abs(kl - r):.2e}")


if __name__ == "__main__":
    main()
