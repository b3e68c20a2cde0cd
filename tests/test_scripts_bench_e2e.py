"""scripts/bench_e2e.py's generated chat mix: the documented languages, turns, system prompts and lengths."""

import json

from transformers import AutoTokenizer

from dataset.lm_dataset import SFTDataset
from scripts.bench_e2e import write_chat_mix
from trainer.base_model import REPO_TOKENIZER


def test_chat_mix_has_the_documented_shape(tmp_path):
    tok = AutoTokenizer.from_pretrained(REPO_TOKENIZER)
    path = write_chat_mix(tmp_path / "mix.jsonl", 400, tok, seed=0)
    chats = [json.loads(line)["conversations"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(chats) == 400
    zh = sum(any("\u4e00" <= ch <= "\u9fff" for ch in c[-1]["content"]) for c in chats) / 400
    multi = sum(sum(m["role"] == "user" for m in c) > 1 for c in chats) / 400
    system = sum(c[0]["role"] == "system" for c in chats) / 400
    assert 0.4 < zh < 0.6 and 0.18 < multi < 0.32 and 0.09 < system < 0.21
    assert all(c[-1]["role"] == "assistant" for c in chats)
    lengths = SFTDataset(path, tok, max_length=512, log=None).lengths
    assert 200 < lengths.mean() < 290 and lengths.min() >= 16 and lengths.max() <= 512
