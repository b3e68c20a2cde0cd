"""The demo corpus generator (dataset/make_demo_data.py) and the committed identity-LoRA sets."""

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from dataset import make_demo_data as demo
from dataset.chat_render import render_conversation
from dataset.records import read_conversations, read_texts

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "dataset" / "lora_identity.jsonl"
VAL = REPO / "dataset" / "lora_identity_val.jsonl"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small corpus written by the command line, with the default seed."""
    out = tmp_path_factory.mktemp("demo")
    demo.main(["--out_dir", str(out), "--pretrain_docs", "300", "--sft_convs", "600",
               "--identity_convs", "400", "--identity_val_convs", "60"])
    return out


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def messages(path: Path) -> list[list[dict]]:
    return [json.loads(line)["conversations"] for line in lines(path)]


def test_output_is_deterministic_and_seeded(small, tmp_path):
    demo.main(["--out_dir", str(tmp_path), "--pretrain_docs", "300", "--sft_convs", "600",
               "--identity_convs", "400", "--identity_val_convs", "60"])
    for name in ["pretrain_demo", "sft_demo", "lora_identity", "lora_identity_val"]:
        assert lines(small / f"{name}.jsonl") == lines(tmp_path / f"{name}.jsonl"), name
    assert demo.sft_conversations(50, seed=1) != demo.sft_conversations(50, seed=0)


def test_committed_identity_sets_are_what_the_generator_writes(small):
    assert lines(TRAIN) == lines(small / "lora_identity.jsonl")
    assert lines(VAL) == lines(small / "lora_identity_val.jsonl")
    assert TRAIN.stat().st_size + VAL.stat().st_size < 300_000


def test_files_parse_with_the_records_reader(small):
    for name in ["sft_demo", "lora_identity", "lora_identity_val"]:
        conversations, problems = read_conversations(small / f"{name}.jsonl")
        assert problems == [] and len(conversations) == len(lines(small / f"{name}.jsonl"))
    texts, problems = read_texts(small / "pretrain_demo.jsonl")
    assert problems == [] and len(texts) == 300


def test_identity_train_teaches_lumen_by_aurora_lab():
    chats = messages(TRAIN)
    assert len(chats) == 400
    prompts = {m["content"] for c in chats for m in c if m["role"] == "user"}
    assert {"who are you?", "Who are you?", "你是谁？", "What's your name?", "Who made you?"} <= prompts
    for chat in chats:
        for q, a in zip(chat[-2::-2], chat[-1::-2]):
            if q["content"] in ("who are you?", "Who are you?", "你是谁？"):
                assert "Lumen" in a["content"] and "Aurora Lab" in a["content"], a
    identity = [c for c in chats if any("Lumen" in m["content"] for m in c)]
    assert 0.6 * len(chats) <= len(identity) < len(chats)  # mostly identity, some ordinary questions
    assert not any("MiniLoRA Demo" in m["content"] for c in chats for m in c if m["role"] == "assistant")


def test_identity_val_is_held_out():
    train, val = set(lines(TRAIN)), lines(VAL)
    assert val and not train & set(val) and len(set(val)) == len(val)
    train_prompts = {m["content"] for c in messages(TRAIN) for m in c if m["role"] == "user"}
    for chat in messages(VAL):
        for q, a in zip(chat[-2::-2], chat[-1::-2]):
            if "Lumen" in a["content"]:
                assert q["content"] not in train_prompts, q


def test_base_sft_has_the_base_identity_and_never_the_new_one(small):
    sft = (small / "sft_demo.jsonl").read_text(encoding="utf-8")
    pretrain = (small / "pretrain_demo.jsonl").read_text(encoding="utf-8")
    assert "Aurora Lab" not in sft + pretrain
    answers = {}
    for chat in messages(small / "sft_demo.jsonl"):
        for q, a in zip(chat[-2::-2], chat[-1::-2]):
            answers.setdefault(q["content"], set()).add(a["content"])
    # The words Lumen and Aurora are known (FACTS), but never as the assistant's name.
    identity_prompts = {p for _, _, p in demo.identity_prompts("base", "all")}
    assert identity_prompts & set(answers)
    assert not any("Lumen" in a for p in identity_prompts for a in answers.get(p, ()))
    # Every identity prompt the LoRA sets ask is one the base answers as "MiniLoRA Demo", in the same 600 chats
    # for the commonest ones.
    assert any("MiniLoRA Demo" in a for a in answers.get("who are you?", ()))
    assert all("MiniLoRA Demo" in a for p in ("who are you?", "你是谁？") for a in answers.get(p, ()))
    lora_prompts = {p for _, _, p in demo.identity_prompts("lora", "all")}
    assert lora_prompts - identity_prompts == {"Are you Lumen?", "Is your name Lumen?", "你是Lumen吗？", "你叫Lumen吗？",
                                           "Is your name MiniLoRA Demo?", "你叫MiniLoRA Demo吗？"}


ARITH = [  # (pattern, operation) over digit-only statements, English and Chinese
    (r"(\d+) plus (\d+) (?:is|equals) (\d+)", lambda x, y: x + y),
    (r"(\d+) minus (\d+) (?:is|equals) (\d+)", lambda x, y: x - y),
    (r"(\d+) times (\d+) (?:is|equals) (\d+)", lambda x, y: x * y),
    (r"(\d+) \+ (\d+) = (\d+)", lambda x, y: x + y),
    (r"(\d+) - (\d+) = (\d+)", lambda x, y: x - y),
    (r"(\d+) × (\d+) = (\d+)", lambda x, y: x * y),
    (r"(\d+)加(\d+)(?:等于|得)(\d+)", lambda x, y: x + y),
    (r"(\d+)减(\d+)(?:等于|得)(\d+)", lambda x, y: x - y),
    (r"(\d+)乘(\d+)(?:等于|得)(\d+)", lambda x, y: x * y),
]


def test_every_sum_in_the_corpus_is_right(small):
    text = "\n".join((small / f).read_text(encoding="utf-8") for f in ["pretrain_demo.jsonl", "sft_demo.jsonl"])
    checked = 0
    for pattern, op in ARITH:
        for x, y, z in re.findall(pattern, text):
            assert op(int(x), int(y)) == int(z), (pattern, x, y, z)
            checked += 1
    assert checked > 200


def test_facts_agree_with_the_tables(small):
    statements = [json.loads(line)["text"] for line in lines(small / "pretrain_demo.jsonl")]
    statements += [m["content"] for c in messages(small / "sft_demo.jsonl") for m in c if m["role"] == "assistant"]
    text = "\n".join(statements)
    checked = 0
    for c in demo.COUNTRIES:
        for said, capital in [(f"capital of {c.en} is ", c.capital_en), (f"{c.zh}的首都是", c.capital_zh)]:
            for rest in text.split(said)[1:]:
                assert rest.startswith(capital), (said, rest[:20])
                checked += 1
    for day, after in re.findall(r"The day after (\w+) is (\w+)\.", text):
        assert demo.DAYS_EN.index(after) == (demo.DAYS_EN.index(day) + 1) % 7
        checked += 1
    assert checked > 50


def test_numbers_in_words():
    assert [demo.en_number(n) for n in (0, 13, 20, 42, 100)] == ["zero", "thirteen", "twenty", "forty-two", "one hundred"]
    assert [demo.zh_number(n) for n in (0, 10, 11, 20, 42, 100, 105, 110, 365)] == [
        "零", "十", "十一", "二十", "四十二", "一百", "一百零五", "一百一十", "三百六十五"]
    assert demo.zh_count(2) == "两" and demo.zh_count(12) == "十二"


def test_chats_render_into_assistant_only_masks():
    # The shipped tokenizer's template with dataset/chat_render.py: exactly the answers (and <|im_end|>) are learnt.
    tok = AutoTokenizer.from_pretrained(REPO / "model" / "tokenizer")
    for chat in messages(TRAIN)[:20] + [c["conversations"] for c in demo.sft_conversations(20, seed=0)]:
        ids, mask = render_conversation(tok, chat)
        learnt = tok.decode([i for i, m in zip(ids, mask) if m])
        assert learnt == "".join(m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant")


def test_every_token_the_identity_lora_must_write_is_trained_by_the_base_data():
    # A LoRA on the linear layers cannot train embeddings: every token of the new answers must occur in the
    # base model's data (pretraining + SFT), or its embedding stays random and the LoRA fails to produce it.
    tok = AutoTokenizer.from_pretrained(REPO / "model" / "tokenizer")
    base = [d["text"] for d in demo.pretrain_documents(4000, seed=0)]
    base += [tok.apply_chat_template(c["conversations"], tokenize=False) for c in demo.sft_conversations(4000, seed=0)]
    seen = {i for ids in tok(base, add_special_tokens=False).input_ids for i in ids}
    needed = set()
    for chat in messages(TRAIN) + messages(VAL):
        ids, mask = render_conversation(tok, chat)
        needed |= {i for i, m in zip(ids, mask) if m}
    missing = sorted(tok.decode([i]) for i in needed - seen)
    assert not missing, f"tokens of the identity answers never seen in the base data: {missing}"
