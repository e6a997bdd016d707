"""Dynamic amateur on the toy world: `w2s lightreasoner` for 3 rounds under each amateur rule.

The shipped expert and amateur (w2s_jax/assets/toy_world), the demo's questions (1,024
train questions drawn as `w2s demo`'s seed 0 draws them) and test problems (the demo's
1,000, so the numbers line up with its LightReasoner arm), the demo's tuned toy settings
(β 0.2, α 0.2, 96 new tokens, LoRA rank 8 on q/v, lr 5e-4, 100 steps x 64 positions).
Round 1 is the same under every rule (it always uses the shipped amateur): it runs once
and is copied (with the base's evaluation) into the other rules' folders before they run.
Round 2 pairs E_2 with E_1 under base and previous alike, but previous samples it from
the shared base (round 1's train run and `base`) and base from the two folders, so each
rule runs its own.
Writes OUT/<rule>/ (each a `w2s lightreasoner` run: rounds.json, summary.md, rounds.png)
and OUT/comparison.md (every rule's rounds in one table). Resumable: re-run to continue.

    .venv/bin/python experiments/toy_world/dynamic_amateur.py --out runs/dynamic_amateur
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from w2s_jax import compile_cache
from w2s_jax.demo_settings import WORLD_PRESETS
from w2s_jax.demo_worlds import ASSETS, system_prompt, write_problems
from w2s_jax.rounds_report import summary_markdown
from w2s_jax.stages.rounds import run_rounds
from w2s_jax.stages.rounds_settings import AMATEUR_RULES, RoundsSettings

TOY = WORLD_PRESETS["toy"]


def settings(args, rule: str, out: Path, questions: Path, problems: Path) -> RoundsSettings:
    """The demo's toy settings as a rounds run under `rule`."""
    return RoundsSettings(
        expert=str(ASSETS / "expert"),
        amateur=str(ASSETS / "amateur"),
        amateur_rule=rule,
        rounds=args.rounds,
        data=str(questions),
        eval_data=str(problems),
        out=str(out / rule),
        alpha=0.2,
        beta=0.2,
        max_new_tokens=TOY["max_new_tokens"],
        eval_max_new_tokens=TOY["max_new_tokens"],
        system_prompt=system_prompt("toy"),
        lora_rank=8,
        lora_alpha=16.0,
        lora_targets=("q_proj", "v_proj"),
        learning_rate=5e-4,
        steps=args.steps,
        batch_positions=TOY["batch_positions"],
        grad_accum=1,
        length_bucket=TOY["length_bucket"],
        dtype="float32",
        batch_size=64,
        eval_batch_size=64,
        save_every=args.steps,
        progress=False,
    )


FINISHED = ("summary.json", "eval/summary.json")  # an evaluation's, a round's
SHARED = {"eval-base": AMATEUR_RULES, "round-1": AMATEUR_RULES}


def share_rounds(out: Path, rule: str) -> None:
    """Copy into OUT/rule the finished folders another rule computed identically (SHARED)."""
    for name, rules in SHARED.items():
        target = out / rule / name
        if rule not in rules or target.exists():
            continue
        finished = [
            out / other / name
            for other in rules
            if other != rule and any((out / other / name / f).is_file() for f in FINISHED)
        ]
        if finished:
            shutil.copytree(finished[0], target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/dynamic_amateur")
    parser.add_argument("--rules", default="fixed,previous,base")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--questions", type=int, default=TOY["questions"])
    parser.add_argument("--eval-questions", type=int, default=TOY["eval_questions"])
    parser.add_argument("--split", default="test", choices=("test", "validation"))
    parser.add_argument("--steps", type=int, default=TOY["steps"])
    args = parser.parse_args()
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not rules or any(r not in AMATEUR_RULES for r in rules):
        raise SystemExit(f"--rules must name some of {', '.join(AMATEUR_RULES)}")
    compile_cache.enable_compilation_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    questions, problems = out / "questions.jsonl", out / f"{args.split}.jsonl"
    expert = ASSETS / "expert"
    if not questions.is_file():  # as `w2s demo` draws seed 0's questions
        write_problems("toy", expert, questions, "train", args.questions, seed=1000)
    if not problems.is_file():  # as `w2s demo` draws its held-out problems
        write_problems("toy", expert, problems, args.split, args.eval_questions, seed=0)
    tables = []
    for rule in rules:
        (out / rule).mkdir(exist_ok=True)
        share_rounds(out, rule)
        report = run_rounds(settings(args, rule, out, questions, problems))
        tables.append(summary_markdown(report))
    (out / "comparison.md").write_text("\n".join(tables))
    print("\n".join(tables))


if __name__ == "__main__":
    main()
