"""generate() on the demo base: the KV cache changes nothing, on every transformers version we support."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import model.model_minimind  # noqa: F401  (registers MiniMind with AutoModelForCausalLM)
from model.hf_compat import cache_kwargs, cache_of

DEMO = Path(__file__).resolve().parents[1] / "model" / "demo"
PROMPTS = ["who are you?", "你是谁", "What colour is the sky?"]


@pytest.fixture(scope="module")
def demo():
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    model = AutoModelForCausalLM.from_pretrained(DEMO).float().eval()   # the file is fp16
    model.generation_config.eos_token_id = None      # run every step, so later cache steps are compared too
    return model, tokenizer


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


@torch.no_grad()
def test_greedy_generate_same_tokens_with_and_without_cache(demo, capfd):
    model, tokenizer = demo
    for prompt in PROMPTS:
        ids = torch.tensor([chat_ids(tokenizer, prompt)])
        cached = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, use_cache=False)
        assert cached.shape[1] == ids.shape[1] + 24
        assert torch.equal(cached, uncached), prompt
    first = tokenizer.decode(model.generate(torch.tensor([chat_ids(tokenizer, PROMPTS[0])]), max_new_tokens=12,
                                            do_sample=False, pad_token_id=0)[0])
    assert "MiniLoRA Demo" in first                    # the demo base's trained answer, not noise
    assert "deprecated" not in capfd.readouterr().err   # no transformers deprecation noise in users' logs


@torch.no_grad()
def test_batched_left_padded_generate_matches_single_and_uncached(demo):
    model, tokenizer = demo
    rows = [chat_ids(tokenizer, p) for p in PROMPTS]
    width = max(map(len, rows))
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, row in enumerate(rows):
        batch[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    cached = model.generate(batch, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    uncached = model.generate(batch, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                              use_cache=False)
    assert torch.equal(cached, uncached)
    for i, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert torch.equal(cached[i, width:], alone[0, len(row):])


@torch.no_grad()
def test_cache_passed_by_hand_under_the_installed_name(demo):
    model, tokenizer = demo
    ids = torch.tensor([chat_ids(tokenizer, PROMPTS[0])])
    full = model(ids).logits[:, -1]
    first = model(ids[:, :-1], use_cache=True)
    step = model(ids[:, -1:], use_cache=True, **cache_kwargs(cache_of(first)))
    assert (step.logits[:, -1] - full).abs().max() <= 1e-5
    assert cache_of(step).get_seq_length() == ids.shape[1]


def test_unknown_keyword_arguments_are_refused(demo):
    model, _ = demo
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match="attn_mask"):
        model(ids, attn_mask=torch.ones_like(ids))            # a typo would otherwise be dropped silently
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(ids, output_hidden_states=True)
    assert model(ids, return_dict=True, output_attentions=False).logits.shape[:2] == (1, 3)
