"""The Qwen world's settings (`w2s demo --world qwen`): its tasks, scales and presets. The
world run in small, on the real 0.5B, is in test_gguf_sources.py (it shares that file's
one import of the 0.5B)."""

import pytest

from w2s_jax.data.word_problems import word_problem_records
from w2s_jax.demo import DemoSettings
from w2s_jax.demo_worlds import QWEN_0_5B, QWEN_1_5B, QWEN_SCALES, QWEN_TASKS, SMOLLM2
from w2s_jax.models.gguf_sources import SOURCES


def test_each_scale_has_a_task_harder_than_the_real_lm_worlds():
    from w2s_jax.demo_worlds import REAL_LM_TASK

    for scale in QWEN_SCALES.values():
        task = QWEN_TASKS[scale["task"]]
        (record,) = word_problem_records("validation", 1, seed=0, config=task, instruction="")
        assert record["answer"].startswith("#### ")
        assert task.min_steps > REAL_LM_TASK.min_steps and task.digits > REAL_LM_TASK.digits
    hard3 = QWEN_TASKS[QWEN_SCALES["full"]["task"]]
    assert hard3.min_steps >= 3 and hard3.digits == 3
    assert set(hard3.operations) >= {"add", "sub", "mul", "div"}


def test_presets_follow_the_world_and_the_scale():
    cpu = DemoSettings(world="qwen")
    assert (cpu.expert, cpu.amateur) == (QWEN_0_5B, SMOLLM2)
    assert (cpu.beta, cpu.learning_rate, cpu.eval_max_new_tokens) == (0.4, 5e-4, None)
    assert cpu.arms == ("base", "lightreasoner", "sft")
    full = DemoSettings(world="qwen", scale="full")
    assert (full.expert, full.amateur) == (QWEN_1_5B, QWEN_0_5B)
    assert "lightreasoner_cross" in full.arms and "contrastive_decoding" in full.arms
    paper = DemoSettings(world="qwen", scale="paper")
    assert (paper.expert, paper.amateur) == (QWEN_1_5B, QWEN_0_5B)
    assert (paper.questions, paper.beta, paper.learning_rate) == (1000, 0.4, 5e-5)
    assert (paper.max_new_tokens, paper.eval_max_new_tokens) == (128, 1024)
    assert DemoSettings(world="qwen", scale="paper", questions=8).questions == 8  # flags win
    toy = DemoSettings()
    assert (toy.beta, toy.learning_rate) == (0.2, 5e-4) and "lightreasoner_cross" not in toy.arms
    assert toy.expert is None and toy.amateur is None
    assert SOURCES[QWEN_1_5B].size > SOURCES[QWEN_0_5B].size


def test_arms_that_cannot_run_with_the_smollm2_amateur_are_refused():
    with pytest.raises(ValueError, match="contrastive_decoding needs an amateur of the expert"):
        DemoSettings(world="qwen", arms=("base", "contrastive_decoding"))
    with pytest.raises(ValueError, match="the amateur is already smollm2"):
        DemoSettings(world="qwen", arms=("base", "lightreasoner_cross"))
    with_pair = DemoSettings(world="qwen", amateur=QWEN_0_5B, arms=("base", "contrastive_decoding"))
    assert with_pair.expert == QWEN_0_5B  # an amateur given replaces SmolLM2


def test_the_cross_tokenizer_arm_belongs_to_the_qwen_world():
    with pytest.raises(ValueError, match="lightreasoner_cross runs in --world qwen only"):
        DemoSettings(world="toy", arms=("base", "lightreasoner_cross"))
