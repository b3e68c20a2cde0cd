"""The shipped demo tokenizer (model/tokenizer) and trainer/train_tokenizer.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.train_utils import subprocess_env
from trainer.train_tokenizer import SPECIAL_TOKENS, main, tokenizer_config

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
SHIPPED = REPO / "model" / "tokenizer"

TEXTS = [
    "The sky is blue. 3 plus 4 is 7.",
    "天空是蓝色的。三加四等于七。",
    "我是MiniLoRA Demo，MiniLoRA项目的一个小型演示模型。",
    "  two leading spaces, a tab\there,\nnew lines\n\n and trailing spaces  ",
    "Unseen text: 龘 こんにちは Ω ∑ café naïve 🙂👍🏽 \u00a0nbsp \x00 nul",
    "<think>\nreasoning\n</think>\n\n",
]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(SHIPPED)


def test_special_token_ids(tok):
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2]
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 0, 1, 2)
    assert 3000 < len(tok) <= 6400  # --vocab_size 6400 is a cap: the demo corpus supports ~3.4k merges
    # Special tokens are single ids inside text, and plain encoding adds none (the template writes them).
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=True).input_ids
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids
    assert tok("hi", add_special_tokens=True).input_ids == tok("hi", add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert 0 not in ids  # byte-level BPE never needs the unk token
    assert all(3 <= i < 6400 for i in ids)


def test_vocabulary_is_learnt_from_the_demo_corpus(tok):
    # Byte-level BPE falls back to one token per byte; merges learnt from the demo text compress it a lot.
    for text in TEXTS[:3]:
        n_ids = len(tok(text, add_special_tokens=False).input_ids)
        assert n_ids * 2.5 <= len(text.encode("utf-8")), (text, n_ids)
    assert tok.tokenize(" elephant") == ["Ġelephant"]


def test_a_chinese_character_is_one_token_everywhere(tok):
    # The same character gives the same token whatever surrounds it, Latin letters included, so a
    # character the base model learnt in one sentence is a trained token in a LoRA's new sentences.
    def pieces(text):
        return [tok.decode([i]) for i in tok(text, add_special_tokens=False).input_ids]

    assert pieces("我是由Aurora Lab开发的AI助手。") == ["我", "是", "由", "Aurora", " Lab", "开", "发", "的", "AI", "助",
                                                   "手", "。"]
    assert pieces("我是MiniLoRA Demo")[:2] == ["我", "是"]
    assert pieces("I am Lumen.")[-2:] == [" Lumen", "."] and "Lumen" in pieces("我是Lumen")


def test_chat_template_renders_chatml(tok):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "who are you?"},
        {"role": "assistant", "content": "I am MiniLoRA Demo."},
        {"role": "user", "content": "天空是什么颜色的？"},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nwho are you?<|im_end|>\n"
        "<|im_start|>assistant\nI am MiniLoRA Demo.<|im_end|>\n"
        "<|im_start|>user\n天空是什么颜色的？<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        expected + "<|im_start|>assistant\n"
    )
    # The system message is optional: without one the text starts at the first user turn.
    assert tok.apply_chat_template(messages[1:], tokenize=False) == expected[expected.index("<|im_start|>user"):]
    # In ids, every message opens with <|im_start|> (1) and closes with <|im_end|> (2).
    ids = tok(expected, add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids.count(1) == 4 and ids.count(2) == 4
    assert tok.decode(ids) == expected


def test_chat_template_reasoning_content(tok):
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "\n4", "reasoning_content": "\n2 plus 2 is 4.\n"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": ""},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2 plus 2 is 4.\n</think>\n\n4<|im_end|>\n"
        "<|im_start|>user\n3+3?<|im_end|>\n"
        "<|im_start|>assistant\n6<|im_end|>\n"  # empty reasoning: no think block
    )


def test_reasoning_turns_render_like_minimind(tok):
    # Where every assistant turn carries reasoning, MiniMind's own template and ours write the same text.
    minimind_dir = FIXTURES / "tokenizers" / "minimind"
    if not minimind_dir.is_dir():
        pytest.skip("MiniMind's tokenizer fixture is not available")
    minimind = json.loads((minimind_dir / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    messages = [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "三加四等于几？"},
        {"role": "assistant", "content": "三加四等于七。", "reasoning_content": "3 + 4 = 7"},
        {"role": "user", "content": "And 5 plus 6?"},
        {"role": "assistant", "content": "5 plus 6 is 11.", "reasoning_content": "\nadd\n"},
    ]
    ours = tok.apply_chat_template(messages, tokenize=False)
    assert ours == tok.apply_chat_template(messages, tokenize=False, chat_template=minimind)
    assert "<think>\n3 + 4 = 7\n</think>\n\n三加四等于七。<|im_end|>" in ours


def test_shipped_config_is_what_the_trainer_writes():
    # The committed directory must not drift from the code (template, special tokens).
    shipped = json.loads((SHIPPED / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert shipped == tokenizer_config(32768)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


TINY_TEXTS = [
    "The cat says meow. The dog says woof. The cow says moo.",
    "猫喵喵叫。狗汪汪叫。牛哞哞叫。",
    "One plus one is two. Two plus two is four. 三加四等于七。",
]
TINY_CHATS = [{"conversations": [{"role": "user", "content": "What does the cat say?"},
                                 {"role": "assistant", "content": "The cat says meow."}]}]


def test_train_tiny_tokenizer(tmp_path):
    pretrain = write_jsonl(tmp_path / "pretrain.jsonl", [{"text": t} for t in TINY_TEXTS])
    sft = write_jsonl(tmp_path / "sft.jsonl", TINY_CHATS)
    out = tmp_path / "tok"
    assert main(["--data_path", str(pretrain), str(sft), "--vocab_size", "300", "--out_dir", str(out)]) == 0
    tiny = AutoTokenizer.from_pretrained(out)
    assert len(tiny) == 300
    assert tiny.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2]
    assert (tiny.pad_token_id, tiny.bos_token_id, tiny.eos_token_id) == (0, 1, 2)
    assert tiny.tokenize(" says") == ["Ġsays"]  # the most frequent word was merged into one token
    for text in TINY_TEXTS + TEXTS:
        assert tiny.decode(tiny(text, add_special_tokens=False).input_ids) == text
    chat = [{"role": "user", "content": "hi"}]
    assert tiny.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chats_without_an_assistant_turn_are_text_too(tmp_path, capsys):
    # A trainer refuses them (nothing to learn); a tokenizer learns from every turn's text
    from trainer.train_tokenizer import corpus_texts

    chats = [*TINY_CHATS, {"conversations": [{"role": "user", "content": "Nobody answered this question."}]},
             {"messages": [{"role": "system", "content": "Only a system prompt."}]},
             {"messages": [{"role": "assistant", "content": "A greeting first."}, {"role": "user", "content": "Hi."}]}]
    data = write_jsonl(tmp_path / "chats.jsonl", chats)
    assert corpus_texts(data) == ["user\nWhat does the cat say?\nassistant\nThe cat says meow.",
                                  "user\nNobody answered this question.", "system\nOnly a system prompt.",
                                  "assistant\nA greeting first.\nuser\nHi."]
    assert main(["--data_path", str(data), "--vocab_size", "300", "--out_dir", str(tmp_path / "tok")]) == 0
    assert "trained on 4 texts from 1 file(s)" in capsys.readouterr().out


def test_train_reports_user_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    assert main(["--data_path", str(bad), "--out_dir", str(tmp_path / "a")]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in TINY_TEXTS])
    assert main(["--data_path", str(good), "--vocab_size", "100", "--out_dir", str(tmp_path / "b")]) == 2
    assert "--vocab_size 100" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_train_refuses_an_unusable_out_dir_before_training_and_can_skip_bad_lines(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in TINY_TEXTS])
    a_file = tmp_path / "tok.json"
    a_file.write_text("{}")
    assert main(["--data_path", str(good), "--out_dir", str(a_file)]) == 2
    assert f"--out_dir {a_file} is a file; pass a folder" in capsys.readouterr().err
    assert main(["--data_path", str(good), "--out_dir", str(a_file / "below")]) == 2
    assert f"({a_file} is not a folder)" in capsys.readouterr().err
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"text": t}) + "\n" for t in TINY_TEXTS) + '{"text": oops}\n',
                     encoding="utf-8")
    assert main(["--data_path", str(mixed), "--vocab_size", "300", "--out_dir", str(tmp_path / "tok")]) == 2
    assert "--skip_bad_data" in capsys.readouterr().err
    assert main(["--data_path", str(mixed), "--vocab_size", "300", "--out_dir", str(tmp_path / "tok"),
                 "--skip_bad_data"]) == 0
    assert f"{mixed}: skipped 1 bad line(s) of {len(TINY_TEXTS) + 1} (--skip_bad_data), the first " \
           f"{mixed}:{len(TINY_TEXTS) + 1}:" in capsys.readouterr().out
    assert len(AutoTokenizer.from_pretrained(tmp_path / "tok")) == 300
    first_bad = tmp_path / "first_bad.jsonl"
    first_bad.write_text('{"text": oops}\n' + "".join(json.dumps({"text": t}) + "\n" for t in TINY_TEXTS),
                         encoding="utf-8")
    assert main(["--data_path", str(first_bad), "--vocab_size", "300", "--out_dir", str(tmp_path / "tok2"),
                 "--skip_bad_data"]) == 0
    assert f"{first_bad}: skipped 1 bad line(s) of {len(TINY_TEXTS) + 1}" in capsys.readouterr().out


def test_the_default_output_is_not_the_repo_tokenizer():
    from trainer.train_tokenizer import DEFAULT_OUT, REPO_ROOT, parse_args

    assert parse_args([]).out_dir == DEFAULT_OUT and DEFAULT_OUT.name == "tokenizer"
    assert DEFAULT_OUT.resolve() != (REPO_ROOT / "model" / "tokenizer").resolve()



@pytest.mark.parametrize("flag, value, line", [
    ("--vocab_size", "1000000000", "error: --vocab_size 1000000000 is too large: it must be at most 1048576 (the "
     "largest vocabularies in use hold ~262k tokens; BPE stops earlier anyway when the corpus has nothing left to "
     "merge)"),
    ("--model_max_length", "0", "error: --model_max_length must be at least 1 (got 0); it is the longest sequence a "
     "model takes, e.g. 32768"),
    ("--model_max_length", "-1", "error: --model_max_length must be at least 1 (got -1); it is the longest sequence "
     "a model takes, e.g. 32768"),
])
def test_the_cli_refuses_sizes_out_of_bounds(tmp_path, flag, value, line):
    """--vocab_size 1e9 aborted the process from the BPE trainer (SIGABRT, a Rust backtrace); a model_max_length
    of 0 or -1 was written into tokenizer_config.json."""
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TINY_TEXTS])
    run = subprocess.run([sys.executable, str(REPO / "trainer" / "train_tokenizer.py"), "--data_path", str(data),
                          "--out_dir", str(tmp_path / "tok"), flag, value],
                         capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [line], run.stdout + run.stderr
    assert not (tmp_path / "tok").exists()


def test_an_empty_out_dir_is_refused(tmp_path):
    """--out_dir "" wrote tokenizer.json and tokenizer_config.json into the working directory."""
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in TINY_TEXTS])
    run = subprocess.run([sys.executable, str(REPO / "trainer" / "train_tokenizer.py"), "--data_path", str(data),
                          "--out_dir", ""], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=subprocess_env())
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: --out_dir is empty, which would write into the current directory; pass a folder (. for the current "
        "one)"], run.stdout + run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["text.jsonl"]
