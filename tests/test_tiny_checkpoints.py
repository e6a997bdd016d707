"""The shared tiny checkpoints load in transformers and behave as documented."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_tokenizer_round_trip_and_chat_template(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    text = "How many apples? 12 + 345 = 357. The answer is \\boxed{357}."
    assert tok.decode(tok.encode(text)) == text
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_models_load_with_padded_vocab(tiny_qwen2_dir, tiny_qwen2_amateur_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    ids = torch.tensor([tok.encode("how many apples 12")])
    for folder in (tiny_qwen2_dir, tiny_qwen2_amateur_dir):
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        assert model.config.vocab_size == 320 > len(tok)
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], 320)
        assert torch.isfinite(logits).all()
