"""Packing: whole samples per row, deterministic, and the same loss as padding on real tiny models."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from dataset.lm_dataset import PackedDataset, SFTDataset, collate_packed, collate_padded, pack_indices

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tokenizers" / "minimind"
MAX_LENGTH = 96


def test_pack_indices_whole_samples_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=300)
    rows = pack_indices(lengths, 64, seed=1, epoch=0)
    assert sorted(i for row in rows for i in row) == list(range(300))  # every sample exactly once
    assert all(lengths[row].sum() <= 64 for row in rows)
    assert len(rows) <= np.ceil(lengths.sum() / 64) * 1.05  # best-fit decreasing wastes little
    assert rows == pack_indices(lengths, 64, seed=1, epoch=0)
    assert rows != pack_indices(lengths, 64, seed=1, epoch=1) != pack_indices(lengths, 64, seed=2, epoch=0)
    # Same length profile every epoch, so the number of rows (and steps per epoch) does not change
    assert len(pack_indices(lengths, 64, seed=1, epoch=1)) == len(rows)
    with pytest.raises(ValueError, match="does not fit"):
        pack_indices(np.array([65]), 64, seed=0, epoch=0)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    if not TOKENIZER.is_dir():
        pytest.skip("../shared/fixtures is not available")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    rng = np.random.default_rng(0)
    words = "the a model learns masks tokens 你好 世界 loss data".split()
    lines = []
    for i in range(12):
        turns = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            turns += [
                {"role": "user", "content": " ".join(rng.choice(words, rng.integers(2, 12)))},
                {"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(1, 20)))},
            ]
        lines.append(json.dumps({"conversations": turns}, ensure_ascii=False))
    path = tmp_path_factory.mktemp("packing") / "sft.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tok, SFTDataset(path, tok, MAX_LENGTH, log=None)


def test_each_samples_target_count_is_what_the_loss_supervises_alone_and_in_a_packed_row(sft):
    """TokenizedDataset.targets (which sizes the packed CUDA graphs' supervision) counts the positions that
    supervision() finds: for each sample alone, and summed over the samples of each packed row."""
    from trainer.loss import supervision

    _, ds = sft
    alone = [supervision(collate_padded([ds[i]], pad_id=0)["labels"])[0].numel() for i in range(len(ds))]
    assert ds.targets.tolist() == alone and min(alone) > 0
    packed = PackedDataset(ds, MAX_LENGTH, seed=0)
    for r in range(len(packed)):
        _, labels, _ = packed[r]
        assert supervision(labels[None])[0].numel() == ds.targets[packed.rows[r]].sum()


def test_packed_rows_restart_positions_and_cut_labels(sft):
    tok, ds = sft
    packed = PackedDataset(ds, MAX_LENGTH, seed=0)
    assert sorted(i for row in packed.rows for i in row) == list(range(len(ds)))
    for r in range(len(packed)):
        ids, labels, positions = packed[r]
        start = 0
        for i in packed.rows[r]:
            sample_ids, sample_labels = ds[i]
            n = len(sample_ids)
            assert ids[start : start + n].tolist() == sample_ids.tolist()
            assert positions[start : start + n].tolist() == list(range(n))
            assert labels[start] == -100  # never predicted across the boundary
            assert labels[start + 1 : start + n].tolist() == sample_labels[1:].tolist()
            start += n
        assert start == len(ids) <= MAX_LENGTH
    batch = collate_packed([packed[r] for r in range(len(packed))], pad_id=tok.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids", "n_tokens"}
    assert batch["n_tokens"] == sum(len(packed[r][0]) for r in range(len(packed)))
    for r in range(len(packed)):  # pads form their own segment: positions from 0, nothing learned
        n = len(packed[r][0])
        assert batch["position_ids"][r, n:].tolist() == list(range(batch["input_ids"].shape[1] - n))
        assert (batch["labels"][r, n:] == -100).all() and (
            batch["input_ids"][r, n:] == tok.pad_token_id
        ).all()
    # A fixed width (the trainer passes --max_seq_len) only adds pad segments: one shape for every step.
    wide = collate_packed([packed[r] for r in range(len(packed))], pad_id=tok.pad_token_id, width=MAX_LENGTH + 5)
    width = batch["input_ids"].shape[1]
    assert wide["input_ids"].shape == (len(packed), MAX_LENGTH + 5)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(wide[key][:, :width], batch[key])
    assert wide["n_tokens"] == batch["n_tokens"]  # the extra pads are not tokens
    assert (wide["labels"][:, width:] == -100).all()
    # Fixed rows too (the trainer passes --batch_size; an epoch's last step runs short): rows of pads only.
    full = collate_packed([packed[0]], pad_id=tok.pad_token_id, width=MAX_LENGTH, rows=3)
    assert full["input_ids"].shape == (3, MAX_LENGTH) and full["n_tokens"] == len(packed[0][0])
    assert (full["input_ids"][1:] == tok.pad_token_id).all() and (full["labels"][1:] == -100).all()
    assert full["position_ids"][1:].tolist() == [list(range(MAX_LENGTH))] * 2


def token_losses(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of every position (shifted, -100 ignored gives 0) through the agreed model call."""
    # use_cache=False matters: transformers models build a KV cache by default (config.use_cache) and then
    # skip the packed-sequence detection, so samples in a row would silently attend to each other.
    hidden = model.model(
        batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    ).last_hidden_state
    logits = model.lm_head(hidden).float()
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")
    return F.pad(losses, (1, 0))  # aligned with the labels: position t holds the loss of label t


def qwen3(attn: str):
    config = Qwen3Config(
        vocab_size=6400,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        attn_implementation=attn,
    )
    return Qwen3ForCausalLM(config)


def minimind():
    model_minimind = pytest.importorskip("model.model_minimind")
    config = model_minimind.MiniMindConfig(
        generation=3, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    return model_minimind.MiniMindForCausalLM(config)


@pytest.mark.parametrize(
    "make",
    [lambda: qwen3("eager"), lambda: qwen3("sdpa"), minimind],
    ids=["qwen3-eager", "qwen3-sdpa", "minimind"],
)
def test_packed_and_padded_give_the_same_loss(sft, make):
    tok, ds = sft
    torch.manual_seed(0)
    model = make().float().eval()
    padded = collate_padded([ds[i] for i in range(len(ds))], pad_id=tok.pad_token_id)
    packed_ds = PackedDataset(ds, MAX_LENGTH, seed=0)
    packed = collate_packed([packed_ds[r] for r in range(len(packed_ds))], pad_id=tok.pad_token_id)
    assert len(packed_ds) < len(ds)  # really several samples per row
    with torch.no_grad():
        pad_losses, pack_losses = token_losses(model, padded), token_losses(model, packed)
        # Negative control: plain positions without restarts let samples attend to each other
        leaky = token_losses(
            model,
            {
                **packed,
                "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]),
            },
        )

    # The same tokens are learned, each with the same loss (a label at position 0 is never used by the shift)
    learned = padded["labels"] != -100
    learned[:, 0] = False
    assert learned.sum() == (packed["labels"] != -100).sum()
    for r, row in enumerate(packed_ds.rows):
        start = 0
        for i in row:
            n = len(ds[i][0])
            in_row = packed["labels"][r, start : start + n] != -100
            torch.testing.assert_close(
                pack_losses[r, start : start + n][in_row], pad_losses[i][learned[i]], atol=1e-5, rtol=1e-5
            )
            start += n
    n_tokens = int(learned.sum())
    assert abs(pad_losses.sum().item() - pack_losses.sum().item()) / n_tokens <= 1e-5
    assert (leaky - pack_losses)[packed["labels"] != -100].abs().max() > 1e-3  # the check above can fail
