"""The Qwen world's settings (`w2s demo --world qwen`): its task and its presets. The
world run in small, on the real 0.5B, is in test_gguf_sources.py (it shares that file's
one import of the 0.5B)."""

from w2s_jax.data.word_problems import word_problem_records
from w2s_jax.demo import DemoSettings
from w2s_jax.demo_worlds import QWEN_AMATEUR, QWEN_EXPERT, QWEN_TASK
from w2s_jax.models.gguf_sources import SOURCES


def test_the_qwen_task_is_harder_than_the_real_lm_worlds():
    (record,) = word_problem_records("validation", 1, seed=0, config=QWEN_TASK, instruction="")
    assert record["answer"].startswith("#### ")
    assert QWEN_TASK.min_steps >= 3 and QWEN_TASK.digits == 3
    assert set(QWEN_TASK.operations) >= {"add", "sub", "mul", "div"}


def test_presets_follow_the_world_and_the_scale():
    cpu = DemoSettings(world="qwen")
    assert (cpu.beta, cpu.learning_rate, cpu.eval_max_new_tokens) == (0.4, 5e-4, None)
    assert cpu.arms[0] == "base" and "lightreasoner_cross" in cpu.arms
    paper = DemoSettings(world="qwen", scale="paper")
    assert (paper.questions, paper.beta, paper.learning_rate) == (1000, 0.4, 5e-5)
    assert (paper.max_new_tokens, paper.eval_max_new_tokens) == (128, 1024)
    assert DemoSettings(world="qwen", scale="paper", questions=8).questions == 8  # flags win
    toy = DemoSettings()
    assert (toy.beta, toy.learning_rate) == (0.2, 5e-4) and "lightreasoner_cross" not in toy.arms
    assert SOURCES[QWEN_EXPERT].size > SOURCES[QWEN_AMATEUR].size


def test_the_cross_tokenizer_arm_belongs_to_the_qwen_world():
    import pytest

    with pytest.raises(ValueError, match="lightreasoner_cross runs in --world qwen only"):
        DemoSettings(world="toy", arms=("base", "lightreasoner_cross"))
