"""The trainer's loss on packed rows equals its loss on padded batches, for MiniMind and transformers models."""

import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from dataset.lm_dataset import PackedDataset, SFTDataset, collate_packed, collate_padded
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from tests.train_utils import (
    REPO,
    lora_args,
    python,
    run_cli,
    save_tiny_minimind,
    subprocess_env,
    tiny_lm,
    write_chat_data,
)
from trainer.base_model import REPO_TOKENIZER
from trainer.loss import SupervisedLoss, supervision


def summed_ce(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The trainer's summed CE over the supervised positions of one batch."""
    index, targets = supervision(batch["labels"])
    ce_sum, _ = SupervisedLoss(model)(batch["input_ids"], index, targets, attention_mask=batch.get("attention_mask"),
                                      position_ids=batch.get("position_ids"))
    return ce_sum


@pytest.mark.parametrize("family", ["qwen3", "minimind"])
def test_packed_loss_equals_padded_loss(tmp_path, family):
    tok = AutoTokenizer.from_pretrained(REPO_TOKENIZER)
    chats = [[{"role": "user", "content": f"What is {i} + {i + 1}?"},
              {"role": "assistant", "content": f"{i} + {i + 1} = {2 * i + 1}." * (1 + i % 3)}] for i in range(10)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"conversations": c}) + "\n" for c in chats))
    ds = SFTDataset(path, tok, max_length=128, log=None)
    # qwen3: use_cache defaults to True in its config, the case that once leaked across samples
    model = tiny_lm(family, vocab_size=len(tok))
    padded = collate_padded([ds[i] for i in range(len(ds))], pad_id=tok.pad_token_id)
    rows = PackedDataset(ds, 128, seed=0)
    assert len(rows) < len(ds)  # several samples share a row
    packed = collate_packed([rows[r] for r in range(len(rows))], pad_id=tok.pad_token_id)
    with torch.no_grad():
        # Packing labels each sample's first token -100; that label is never a target when padded either.
        assert supervision(packed["labels"])[0].numel() == supervision(padded["labels"])[0].numel()
        torch.testing.assert_close(summed_ce(model, packed), summed_ce(model, padded), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3", "minimind"])
def test_right_padding_needs_no_mask(family):
    """The trainer drops the padding mask of right-padded batches (faster kernels): the loss must not move."""
    model = tiny_lm(family)
    samples = [(torch.randint(3, 100, (n,)), torch.randint(3, 100, (n,))) for n in (5, 17, 9)]
    batch = collate_padded(samples, pad_id=0)
    loss = SupervisedLoss(model)
    assert loss.drop_padding_mask
    index, targets = supervision(batch["labels"])
    with torch.no_grad():
        ours, _ = loss(batch["input_ids"], index, targets, attention_mask=batch["attention_mask"])
        # Reference: each sample alone, no padding at all
        alone = sum(summed_ce(model, collate_padded([s], pad_id=0)) for s in samples)
    torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-4)


def test_transformers_moe_counts_as_moe(tmp_path):
    """A transformers MoE directory keeps its padding mask and gets DDP's unused-parameter search (use_moe)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from trainer.base_model import load_base

    tok = AutoTokenizer.from_pretrained(REPO_TOKENIZER)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                       moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=16)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    base = load_base(str(tmp_path), str(tmp_path), torch.float32)
    assert base.use_moe and not SupervisedLoss(base.model).drop_padding_mask
    dense = MiniMindForCausalLM(MiniMindConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2))
    assert SupervisedLoss(dense).drop_padding_mask  # MiniMind lists num_experts even when dense


@pytest.mark.parametrize("packing", [1, 0])
def test_val_fraction_line_counts_samples_packed_or_not(tmp_path, packing):
    """The start-up line's held-out count is in samples: packed, it counted packed rows (40 held out of 70)."""
    weight = save_tiny_minimind(tmp_path / "base.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 40)
    argv = lora_args(tmp_path, weight, data, packing=packing, val_fraction=0.25, max_steps=1, batch_size=8)
    run = run_cli([python(), "trainer/train_lora.py", *argv], timeout=180, cwd=REPO, env=subprocess_env())
    assert run.returncode == 0, run.stdout + run.stderr
    held = re.search(r"validation: (\d+) sample\(s\) held out of (\d+) \(--val_fraction\)", run.stdout)
    assert held and held.groups() == ("10", "40"), run.stdout
