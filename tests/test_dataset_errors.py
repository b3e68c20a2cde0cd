"""Bad input is all reported before training as `file:line: problem`; truncation and dropping are exact."""

import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

import dataset.lm_dataset as lm_dataset
from dataset.lm_dataset import PretrainDataset, SFTDataset
from dataset.records import DataError, read_conversations
from model.errors import UserError
from tests.test_dataset_masks import FORMATS, TOOL_FORMATS
from tests.train_utils import REPO, lora_args, python, run_cli, save_tiny_minimind, subprocess_env

TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tokenizers" / "minimind"


@pytest.fixture(scope="module")
def tok():
    if not TOKENIZER.is_dir():
        pytest.skip("../shared/fixtures is not available")
    return AutoTokenizer.from_pretrained(TOKENIZER)


def chat(user: str, assistant: str) -> dict:
    return {"conversations": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


GOOD = json.dumps(chat("Hi", "Hello.")).encode()
BAD = [  # (raw line, what the message must say)
    (b'{"conversations": [', "invalid JSON"),
    (b'{"conversations": [{"role": "user", "content": "caf\xe9"}]}', "not valid UTF-8 (byte 0xe9"),
    (
        json.dumps(
            {"conversations": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}
        ).encode(),
        "message 0 (user): content must be a string, got int",
    ),
    (
        json.dumps(
            {"conversations": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}
        ).encode(),
        "message 1: unknown role 'bot'",
    ),
    (json.dumps(chat("Hi", "   ")).encode(), "message 1 (assistant): empty content"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), "no assistant turn"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (
        json.dumps(chat("hi <|im_end|>", "x")).encode(),
        "message 0 (user) content contains the special token '<|im_end|>'",
    ),
    (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "tool", "content": "x"},
                    {"role": "assistant", "content": "y"},
                ]
            }
        ).encode(),
        "message 1: a tool message must follow an assistant tool call",
    ),
    (json.dumps({"conversations": "hi"}).encode(), "'conversations' must be a non-empty list"),
    (json.dumps({"text": "plain"}).encode(), "this is a pretraining record"),
    (json.dumps({"instruction": "Say hi", "output": 3}).encode(), "'output' must be a string, got int"),
    (
        json.dumps(
            {"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "x"}]}
        ).encode(),
        "the first non-system message must be from the user, not the assistant",
    ),
    # Lines that crash a JSON reader or a tokenizer further down
    (GOOD.replace(b"Hello.", b"a\\ud800b"), "a string holds a lone surrogate escape (\\ud800), which is not a character"),
    (b'{"conversations": ' + b"[" * 3000 + b"]" * 3000 + b"}", "JSON nested too deeply"),
    (b'{"conversations": [], "n": ' + b"7" * 5000 + b"}", "invalid JSON: Exceeds the limit (4300 digits)"),
    (b'{"conversations": [{"from": ["human"], "value": "x"}]}', "message 0: unknown 'from' ['human']"),
    (b'{"x": ' + b"[" * 150 + b"]" * 150 + b', "instruction": "a", "output": "b"}', "JSON nested too deeply"),
]
BAD_PARTS = [  # OpenAI-style content parts: text only
    (
        json.dumps({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                         {"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]},
            {"role": "assistant", "content": "A cat."}]}).encode(),
        "message 0 (user): content part 1 has type 'image_url': this trainer trains text models",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": [{"text": "Hi"}]},
                                 {"role": "assistant", "content": "Hello."}]}).encode(),
        "message 0 (user): content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts, and item 0 "
        "has no 'type'",
    ),
    (  # a tool's result kept as JSON: structured data, not an image that a text model cannot read
        json.dumps({"messages": [
            {"role": "user", "content": "Find cats"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": [{"title": "Cats", "url": "https://x.org/cats"}]},
            {"role": "assistant", "content": "Here."}]}).encode(),
        "message 2 (tool): content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts, and item 0 "
        "has no 'type'; write structured content (a tool's JSON result) as a string",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": [{"type": "text", "text": 5}]}]}).encode(),
        "message 1 (assistant): content part 0: 'text' must be a string, got int",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "No."}]},
                                 {"role": "assistant", "content": "Ok."}]}).encode(),
        "message 0 (user): content part 0 is a refusal, which only an assistant message can hold",
    ),
]
BAD_IN_STRINGS = [  # the same inside MiniMind's JSON strings (tool calls, tools)
    (
        json.dumps({"conversations": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "", "tool_calls": '[{"name": "f", "arguments": {"a": "\\udc00"}}]'},
        ]}).encode(),
        "message 1 (assistant): tool_calls (a JSON string): a string holds a lone surrogate escape (\\udc00)",
    ),
    (
        json.dumps({"conversations": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "1" * 5000}]},
        ]}).encode(),
        "message 1 (assistant): arguments of tool call 'f' (a JSON string): invalid JSON: Exceeds the limit",
    ),
    (
        json.dumps({"tools": "[" * 3000 + "]" * 3000, "messages": [{"role": "user", "content": "x"}]}).encode(),
        "top-level 'tools' (a JSON string): JSON nested too deeply",
    ),
    (
        json.dumps({**chat("Hi", "Hello."), "messages": chat("Hi", "Other.")["conversations"]}).encode(),
        "both 'conversations' and 'messages': keep the one that holds the chat",
    ),
    (
        json.dumps({"data": [chat("Hi", "Hello."), chat("Hey", "Hey.")]}).encode(),
        "its records seem to be the list under 'data': write one of them per line",
    ),
]


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_every_bad_line_is_reported_with_file_and_line(tok, tmp_path):
    # good, bad..., blank, good: line n of the file holds BAD[n - 2]
    path = write_lines(tmp_path / "data.jsonl", [GOOD] + [raw for raw, _ in BAD] + [b"   ", GOOD])
    with pytest.raises(DataError) as err:
        SFTDataset(path, tok, max_length=64, log=None)
    message = str(err.value)
    assert isinstance(err.value, UserError)
    assert message.startswith(f"{path}: {len(BAD)} bad line(s) of {len(BAD) + 2}:")
    for n, (_, problem) in enumerate(BAD, start=2):
        assert f"{path}:{n}: {problem}" in message, problem
    assert "--skip_bad_data" in message
    assert f"{path}:1:" not in message and f"{path}:{len(BAD) + 3}:" not in message  # good and blank lines


def test_skip_invalid_counts_bad_lines(tok, tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD] + [raw for raw, _ in BAD] + [GOOD])
    logged = []
    ds = SFTDataset(path, tok, max_length=64, skip_invalid=True, log=logged.append)
    assert (len(ds), ds.skipped, ds.dropped) == (2, len(BAD), 0)
    # The first five skipped lines are named with their problem, under the data line
    assert len(logged) == 1
    lines = logged[0].splitlines()
    assert lines[0] == (f"{path}: kept 2 samples, dropped 0 with no supervised token after truncation to 64, "
                        f"skipped {len(BAD)} invalid lines")
    assert [line.split(": ", 1)[0] for line in lines[1:6]] == [f"  skipped {path}:{n}" for n in range(2, 7)]
    assert all(problem in line for line, (_, problem) in zip(lines[1:6], BAD))
    assert lines[6:] == [f"  ... and {len(BAD) - 5} more skipped"]


def test_only_the_first_20_problems_are_listed(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [b"{"] * 25)
    conversations, problems = read_conversations(path)
    assert conversations == [] and len(problems) == 25
    from dataset.records import data_error

    message = str(data_error(path, problems, 25))
    assert f"{path}:20: invalid JSON" in message and f"{path}:21:" not in message
    assert "  ... and 5 more" in message


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "no such file"), (b"", "the file is empty"), (b"\n  \n", "the file is empty")],
    ids=["missing", "empty", "blank"],
)
def test_missing_or_empty_file(tok, tmp_path, content, problem):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_bytes(content)
    for make in (
        lambda: SFTDataset(path, tok, 64, log=None),
        lambda: PretrainDataset(path, tok, 64, log=None),
    ):
        with pytest.raises(DataError, match=f"{path}: {problem}"):
            make()


def test_all_lines_skipped_is_still_an_error_that_says_why(tok, tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [b"{", b"[]"])
    with pytest.raises(DataError, match="no usable samples") as err:
        SFTDataset(path, tok, 64, skip_invalid=True, log=None)
    assert f"skipped {path}:1: invalid JSON" in str(err.value)
    assert f"skipped {path}:2: expected a JSON object, got list" in str(err.value)


def test_pretrain_bad_lines(tok, tmp_path):
    lines = [
        b'{"text": "fine"}',
        b'{"txt": "x"}',
        b'{"text": 3}',
        b'{"text": "  "}',
        b'{"text": "also fine"}',
        GOOD,  # a line of a chat file
    ]
    path = write_lines(tmp_path / "pre.jsonl", lines)
    with pytest.raises(DataError) as err:
        PretrainDataset(path, tok, 64, log=None)
    message = str(err.value)
    assert f'{path}:2: expected a JSON object with a "text" key' in message
    assert f'{path}:3: "text" must be a string, got int' in message
    assert f'{path}:4: "text" is empty' in message
    assert f'{path}:6: this is a chat record; pretraining needs {{"text": ...}} lines (chats train with ' in message
    assert len(PretrainDataset(path, tok, 64, skip_invalid=True, log=None)) == 2


# --- Truncation and dropping ------------------------------------------------------------------------------
def test_truncation_keeps_labels_aligned(tok, tmp_path):
    long_answer = " ".join(f"word{i}" for i in range(60))
    records = [chat("Hi", long_answer), chat("Tell me more " * 3, "Sure. " + long_answer)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    full = SFTDataset(path, tok, max_length=4096, log=None)
    for max_length in (25, 33, 57, 100):
        short = SFTDataset(path, tok, max_length=max_length, log=None)
        # A sample survives iff a label the shifted loss uses is left after truncation
        kept = [i for i in range(len(full)) if (full[i][1][1:max_length] != -100).any()]
        assert len(short) == len(kept) > 0 and short.dropped == len(full) - len(kept)
        for j, i in enumerate(kept):
            (ids, labels), (full_ids, full_labels) = short[j], full[i]
            assert len(ids) == len(labels) == min(max_length, len(full_ids))
            assert ids.tolist() == full_ids[:max_length].tolist()
            assert labels.tolist() == full_labels[:max_length].tolist()


def test_truncation_inside_a_reply_the_template_edits_keeps_the_sample(tok, tmp_path):
    # MiniMind's template strips the reply's leading newline, so each message is found by a render of its own;
    # those past the cut are not looked for, and a later reply is no reason to refuse the line
    records = [{"conversations": [{"role": "user", "content": "Tell me a story."},
                                  {"role": "assistant", "content": "\n" + "The cat sat on the mat. " * 200},
                                  {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "No."}]}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    full = SFTDataset(path, tok, max_length=4096, log=None)
    short = SFTDataset(path, tok, max_length=64, log=None)
    assert short[0][0].tolist() == full[0][0][:64].tolist()
    assert short[0][1].tolist() == full[0][1][:64].tolist()


def test_samples_with_nothing_to_learn_are_dropped_and_counted(tok, tmp_path):
    records = [chat("Hi", "Hello."), chat("A long question " * 20, "Short."), chat("Hey", "Hey.")]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    logged = []
    ds = SFTDataset(path, tok, max_length=32, log=logged.append)
    assert logged == [f"{path}: kept 2 samples, dropped 1 with no supervised token after truncation to 32"]
    assert (len(ds), ds.dropped) == (2, 1)
    for i in range(len(ds)):  # every kept sample has a label the shifted loss will use
        assert (ds[i][1][1:] != -100).any()
    assert ds.lengths.tolist() == [len(ds[i][0]) for i in range(len(ds))]
    with pytest.raises(DataError, match=r"no usable samples \(0 invalid lines skipped, 3 with nothing to learn after "
                                         r"truncation\); a larger --max_seq_len keeps"):
        SFTDataset(path, tok, max_length=8, log=None)


def test_pretrain_dataset_bos_text_eos(tok, tmp_path):
    texts = ["Hello world, 你好世界.", "word " * 50]
    path = tmp_path / "pre.jsonl"
    path.write_text(
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8"
    )
    ds = PretrainDataset(path, tok, max_length=20, log=None)
    for i, text in enumerate(texts):
        ids, labels = ds[i]
        body = tok(text, add_special_tokens=False).input_ids[:18]  # eos survives truncation
        assert ids.tolist() == [tok.bos_token_id] + body + [tok.eos_token_id]
        assert labels.tolist() == ids.tolist()  # every real token is learned


def test_worker_processes_give_the_same_arrays(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(lm_dataset, "CHUNK", 4)  # 4 chunks of 4 lines, so 2 workers really share the work
    lines = [json.dumps(chat(f"Question {i}?", f"Answer {i}." * (i % 5 + 1))).encode() for i in range(15)]
    lines[9] = b"{broken"
    path = write_lines(tmp_path / "data.jsonl", lines)
    one = SFTDataset(path, tok, 48, skip_invalid=True, num_workers=1, log=None)
    two = SFTDataset(path, tok, 48, skip_invalid=True, num_workers=2, log=None)
    assert np.array_equal(one.ids, two.ids) and np.array_equal(one.mask, two.mask)
    assert np.array_equal(one.lengths, two.lengths) and (one.skipped, two.skipped) == (1, 1)
    with pytest.raises(DataError, match=f"{path}:10: invalid JSON"):
        SFTDataset(path, tok, 48, num_workers=2, log=None)


def test_lone_surrogate_in_a_pair_is_fine_and_alone_is_reported(tok, tmp_path):
    paired = GOOD.replace(b"Hello.", b"\\ud83d\\ude00")  # a valid escaped pair: one emoji
    path = write_lines(tmp_path / "data.jsonl", [paired])
    assert len(SFTDataset(path, tok, 64, log=None)) == 1


def test_a_huge_line_costs_what_is_kept(tok, tmp_path):
    # 50 MB in one reply: rendered, tokenized and masked only as far as max_length can reach
    huge = "word " * 10_000_000
    lines = [json.dumps(chat("Hi", huge)).encode(), json.dumps(chat("Hi", huge[:2000])).encode()]
    path = write_lines(tmp_path / "data.jsonl", lines)
    assert path.stat().st_size > 50e6
    began = time.perf_counter()
    ds = SFTDataset(path, tok, max_length=64, num_workers=1, log=None)
    assert time.perf_counter() - began < 20  # the whole line tokenized took minutes and 6.7 GB
    assert ds[0][0].tolist() == ds[1][0].tolist() and ds[0][1].tolist() == ds[1][1].tolist()
    assert len(ds[0][0]) == 64
    text_path = write_lines(tmp_path / "pre.jsonl", [json.dumps({"text": huge}).encode()])
    pre = PretrainDataset(text_path, tok, max_length=64, log=None)
    assert pre[0][0].tolist() == [tok.bos_token_id] + tok(huge[:2000]).input_ids[:62] + [tok.eos_token_id]


def test_a_json_array_file_is_read_as_records(tok, tmp_path):
    records = [chat("Hi", "Hello."), {"instruction": "Say hi", "output": "Hi."}, chat("Hey", "Hey.")]
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(records, indent=2))
    ds = SFTDataset(path, tok, 64, log=None)
    assert len(ds) == 3
    jsonl = write_lines(tmp_path / "same.jsonl", [json.dumps(r).encode() for r in records])
    assert ds.ids.tolist() == SFTDataset(jsonl, tok, 64, log=None).ids.tolist()
    # A bad record is named by the line where it begins
    records[1] = {"instruction": "Say hi", "output": 3}
    path.write_text(json.dumps(records, indent=2))
    with pytest.raises(DataError, match=f"{path}:14: 'output' must be a string, got int"):
        SFTDataset(path, tok, 64, log=None)
    # A broken array is one message that says how to fix it
    path.write_text(json.dumps(records, indent=2).replace("  },\n  {", "  }\n  {", 1))  # a comma lost on line 13
    with pytest.raises(DataError, match=f"{path}:14: the file is not one valid JSON array .*convert it to JSON Lines"):
        SFTDataset(path, tok, 64, log=None)
    # JSON Lines whose first line is an array stay JSON Lines
    lines = write_lines(tmp_path / "data.jsonl", [b"[1, 2]", GOOD])
    with pytest.raises(DataError, match=f"{lines}:1: expected a JSON object, got list"):
        SFTDataset(lines, tok, 64, log=None)



def test_a_json_file_that_is_not_one_clean_array_stops_at_its_line_even_when_skipping(tok, tmp_path):
    # Read as lines, each record would fail on its trailing comma: with --skip_bad_data a run trained on one record
    records = [json.dumps(chat(f"Q{i}", f"A{i}.")) for i in range(10)]
    array = "[\n" + ",\n".join(records) + "\n]\n"
    path = tmp_path / "chats.json"
    for text, problem in [
        (array + "// exported by tool X\n", ":13: more text after the JSON array that ends on line 12"),
        (array.encode().replace(b'Q5"', b'Q5\xff"'), ":7: not valid UTF-8 (byte 0xff); a .json file is read whole"),
    ]:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        for skip in (False, True):
            with pytest.raises(DataError, match=re.escape(f"{path}{problem}")):
                SFTDataset(path, tok, 64, skip_invalid=skip, log=None)


def test_records_of_a_json_array_are_named_by_their_line_across_blank_lines(tok, tmp_path):
    good = json.dumps(chat("Hi", "Hello."))
    path = tmp_path / "chats.json"
    path.write_text("\n[\n" + ",\n\n\n".join([good, good]) + ',\n\n{"messages": [{"role": "user", "content": "Hi"}]}\n]\n')
    with pytest.raises(DataError, match=f"{path}:8: no assistant turn"):
        SFTDataset(path, tok, 64, log=None)


def test_a_byte_order_mark_crlf_line_ends_and_blank_lines_read_as_the_plain_file(tok, tmp_path):
    # What Windows editors write: the same samples, and the same line numbers in messages
    lines = [json.dumps(chat("Hi", "Hello.")), json.dumps(chat("Hey", "Hey there."))]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("\n".join(lines) + "\n")
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n\r\n  \r\n").encode())
    expected = SFTDataset(plain, tok, 64, log=None)
    got = SFTDataset(windows, tok, 64, log=None)
    assert got.ids.tolist() == expected.ids.tolist() and got.mask.tolist() == expected.mask.tolist()
    texts = tmp_path / "pretrain.jsonl"
    texts.write_bytes('\ufeff{"text": "Hello world."}\r\n\r\n{"text": oops}\r\n'.encode())
    with pytest.raises(DataError, match=re.escape(f"{texts}:3: invalid JSON")):
        PretrainDataset(texts, tok, 64, log=None)
    assert PretrainDataset(texts, tok, 64, skip_invalid=True, log=None)[0][0].tolist() == (
        [tok.bos_token_id] + tok("Hello world.", add_special_tokens=False).input_ids + [tok.eos_token_id])


def test_files_of_another_shape_get_one_line_that_says_what_they_are(tok, tmp_path):
    import gzip

    records = [chat("Hi", "Hello."), chat("Hey", "Hey.")]
    text = "\n".join(json.dumps(r) for r in records) + "\n"
    cases = {
        "data.jsonl.gz": (gzip.compress(text.encode()), "gzip-compressed, not text; decompress it first"),
        "data.parquet": (b"PAR1" + bytes(64), "a Parquet file, not text; convert it to JSON Lines first"),
        # Windows PowerShell 5's `>` writes UTF-16 with a byte-order mark
        "utf16.jsonl": (text.encode("utf-16"), "UTF-16 text, not UTF-8; convert it first (iconv -f UTF-16"),
        "data.json": (json.dumps({"data": records}, indent=2).encode(),
                      "the file is one JSON object whose records are the list under 'data'"),
    }
    for name, (content, problem) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}: {problem}")):
            SFTDataset(tmp_path / name, tok, 64, skip_invalid=True, log=None)
    # One record written over several lines is that record
    (tmp_path / "one.json").write_text(json.dumps(records[0], indent=2))
    one = SFTDataset(tmp_path / "one.json", tok, 64, log=None)
    jsonl = write_lines(tmp_path / "one.jsonl", [json.dumps(records[0]).encode()])
    assert one.ids.tolist() == SFTDataset(jsonl, tok, 64, log=None).ids.tolist()

POOL = [None, 0, 1.5, True, "", "x", [], {}, ["x"], {"a": 1}, [[1]], "[1,", '{"a": 1}', "\ud800", "user", "tool",
        "assistant", "function_call", "<|im_end|>", 10**30, "{{ x }}", [{"role": "user"}], {"name": 3}]


def mutated(record: dict, rng) -> dict:
    """The record with one value somewhere in it replaced, deleted or inserted."""
    record = json.loads(json.dumps(record))
    paths, stack = [], [((), record)]
    while stack:
        path, value = stack.pop()
        paths.append(path)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
        stack += [((*path, k), v) for k, v in items]
    path = rng.choice(paths[1:])
    parent = record
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[path[-1]]
    elif isinstance(parent, list) and rng.random() < 0.2:
        parent.insert(path[-1], rng.choice(POOL))
    else:
        parent[path[-1]] = rng.choice(POOL)
    return record


def test_malformed_records_are_errors_or_counted_skips(tok, tmp_path):
    # 200 variants of good records (every format, tool calls) with one value broken: never a traceback
    rng = random.Random(0)
    good = [*FORMATS.values(), *TOOL_FORMATS.values()]
    lines = [json.dumps(mutated(rng.choice(good), rng)).encode() for _ in range(200)] + [GOOD]
    path = write_lines(tmp_path / "data.jsonl", lines)
    ds = SFTDataset(path, tok, 256, skip_invalid=True, num_workers=1, log=None)
    assert len(ds) + ds.skipped + ds.dropped == len(lines) and 0 < ds.skipped < len(lines)
    with pytest.raises(DataError) as err:
        SFTDataset(path, tok, 256, num_workers=1, log=None)
    listed = str(err.value).splitlines()[1:-1]
    assert all(line.startswith(f"  {path}:") or line.startswith("  ... and") for line in listed)


def test_json_strings_inside_records_are_checked_like_lines(tok, tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD] + [raw for raw, _ in BAD_IN_STRINGS])
    conversations, problems = read_conversations(path)
    assert len(conversations) == 1
    for n, (line, message), (_, problem) in zip(range(2, 9), problems, BAD_IN_STRINGS, strict=False):
        assert line == n and problem in message, problem
    assert len(problems) == len(BAD_IN_STRINGS)
    ds = SFTDataset(path, tok, 64, skip_invalid=True, log=None)
    assert (len(ds), ds.skipped) == (1, len(BAD_IN_STRINGS))


def test_content_parts_other_than_text_are_named_by_line(tok, tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD] + [raw for raw, _ in BAD_PARTS])
    with pytest.raises(DataError) as err:
        SFTDataset(path, tok, 64, log=None)
    for n, (_, problem) in enumerate(BAD_PARTS, start=2):
        assert f"{path}:{n}: {problem}" in str(err.value), problem
    assert str(err.value).startswith(f"{path}: {len(BAD_PARTS)} bad line(s)")


def test_a_non_text_content_part_stops_the_real_cli_with_its_line(tmp_path):
    # An audio part in an OpenAI-style record: one `file:line` line, exit 2, no traceback
    weight = save_tiny_minimind(tmp_path / "base.pth")
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    path = write_lines(tmp_path / "data.jsonl", [GOOD, json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Transcribe this."}, audio]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]}).encode()])
    run = run_cli([python(), "trainer/train_lora.py", *lora_args(tmp_path, weight, path, max_steps=1,
                                                                 data_cache="none")],
                  300, cwd=REPO, env=subprocess_env())
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "Traceback" not in run.stderr
    assert (f"{path}:2: message 0 (user): content part 1 has type 'input_audio': this trainer trains text models"
            in run.stderr)


def test_sharegpt_problems_are_numbered_as_the_data_numbers_its_turns(tmp_path):
    # A ShareGPT "system" field is no turn of the data's list: the turns keep their own numbers in the messages
    human, gpt = {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}
    observation, system = {"from": "observation", "value": "21"}, {"from": "system", "value": "Be rude."}
    records = [
        ({"conversations": [human, observation, gpt]}, "message 1: a tool message must follow an assistant tool call"),
        ({"system": "S", "conversations": [human, observation, gpt]},
         "message 1: a tool message must follow an assistant tool call"),
        ({"system": "S", "conversations": [human, gpt, human, observation, gpt]},
         "message 3: a tool message must follow an assistant tool call"),
        ({"system": "S", "conversations": [system, human, gpt]},
         "message 0 is a system turn and the record has a 'system' field too: keep one of them"),
    ]
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(record).encode() for record, _ in records])
    _, problems = read_conversations(path)
    assert problems == [(n, problem) for n, (_, problem) in enumerate(records, start=1)]
    # A tokenizer learns from every turn's text, in any order: none of these is a problem for it
    conversations, problems = read_conversations(path, check_turns=False)
    assert problems == [] and len(conversations) == len(records)


def test_objects_written_over_several_lines_are_read_as_records(tok, tmp_path):
    # `jq . data.jsonl` and json.dump(record, f, indent=2) per record write each object over several lines
    records = [chat("Hi", "Hello."), {"instruction": "Say hi", "output": "Hi."}, chat("Hey", "Hey.")]
    pretty = [json.dumps(r, indent=2) for r in records]
    path = tmp_path / "pretty.jsonl"
    path.write_bytes("\n".join(pretty).replace("\n", "\r\n").encode() + b"\r\n\r\n")  # CRLF, blank lines after
    jsonl = write_lines(tmp_path / "same.jsonl", [json.dumps(r).encode() for r in records])
    ds, same = SFTDataset(path, tok, 64, log=None), SFTDataset(jsonl, tok, 64, log=None)
    assert ds.ids.tolist() == same.ids.tolist() and ds.mask.tolist() == same.mask.tolist()
    # A bad record is named by the line where it begins, as a broken one is
    begins = 2 + pretty[0].count("\n")
    records[1] = {"instruction": "Say hi", "output": 3}
    path.write_text("\n".join(json.dumps(r, indent=2) for r in records) + "\n")
    with pytest.raises(DataError, match=f"{path}:{begins}: 'output' must be a string, got int"):
        SFTDataset(path, tok, 64, log=None)
    third = begins + pretty[1].count("\n") + 1
    path.write_text("\n".join(pretty[:2] + [pretty[2][:-1]]) + "\n")  # the last object lost its closing brace
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(pretty[2][:-1].rstrip())  # the error at its end lies on its last line
    with pytest.raises(DataError) as err:
        SFTDataset(path, tok, 64, log=None)
    assert f"{path}:{third}: invalid JSON: {reference.value.msg} (line {third - 1 + reference.value.lineno}, " in str(
        err.value)
    skipped = SFTDataset(path, tok, 64, skip_invalid=True, log=None)
    two = write_lines(tmp_path / "two.jsonl", [json.dumps(json.loads(r)).encode() for r in pretty[:2]])
    assert skipped.skipped == 1 and skipped.ids.tolist() == SFTDataset(two, tok, 64, log=None).ids.tolist()


def pretty_chats(n: int) -> tuple[list[dict], list[str]]:
    """n distinct chats and each written over several lines, as `jq .` writes them."""
    records = [chat(f"Who are you, {i}?", f"I am Lumen, {i}.") for i in range(n)]
    return records, [json.dumps(r, indent=2) for r in records]


def begin_lines(texts: list[str]) -> list[int]:
    """The line each of these texts begins on, written one after another, each ending its last line."""
    return [1 + sum(t.count("\n") + 1 for t in texts[:k]) for k in range(len(texts))]


def test_a_broken_object_over_several_lines_is_one_bad_record_named_by_the_line_it_begins_on(tok, tmp_path):
    # A comma missing deep inside the third of six pretty-printed records
    records, pretty = pretty_chats(6)
    pretty[2] = pretty[2].replace('"role": "assistant",', '"role": "assistant"')
    path = tmp_path / "pretty.jsonl"
    path.write_text("\n".join(pretty) + "\n")
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(pretty[2])
    begins = begin_lines(pretty)[2]
    problem = (f"invalid JSON: Expecting ',' delimiter (line {begins - 1 + reference.value.lineno}, "
               f"column {reference.value.colno})")
    # Without --skip_bad_data: one file:line problem in the list of bad records, as any bad line
    with pytest.raises(DataError) as err:
        SFTDataset(path, tok, 64, log=None)
    assert str(err.value).splitlines()[:2] == [f"{path}: 1 bad line(s) of 6:", f"  {path}:{begins}: {problem}"]
    assert read_conversations(path)[1] == [(begins, problem)]
    # With it: skipped and counted, and the objects after it are read, as the same records on one line each
    ds = SFTDataset(path, tok, 64, skip_invalid=True, log=None)
    others = write_lines(tmp_path / "others.jsonl", [json.dumps(r).encode() for k, r in enumerate(records) if k != 2])
    same = SFTDataset(others, tok, 64, log=None)
    assert ds.skipped == 1 and len(ds) == 5
    assert ds.ids.tolist() == same.ids.tolist() and ds.mask.tolist() == same.mask.tolist()
    assert f"skipped {path}:{begins}: {problem}" in ds.summary


@pytest.mark.parametrize("layout", ["one line first", "several lines first", "alternating", "broken first"])
def test_a_file_may_mix_objects_on_one_line_and_over_several(tok, tmp_path, layout):
    # Each record is read by its own layout: the first one does not decide for the file
    records, pretty = pretty_chats(5)
    compact = [json.dumps(r) for r in records]
    texts = {"one line first": compact[:1] + pretty[1:], "several lines first": pretty[:1] + compact[1:],
             "alternating": [(pretty if k % 2 else compact)[k] for k in range(5)],
             "broken first": [pretty[0][:-1]] + compact[1:3] + pretty[3:]}[layout]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(texts) + "\n")
    broken = layout == "broken first"
    ds = SFTDataset(path, tok, 64, skip_invalid=broken, log=None)
    kept = records[1:] if broken else records
    same = SFTDataset(write_lines(tmp_path / "same.jsonl", [json.dumps(r).encode() for r in kept]), tok, 64, log=None)
    assert ds.ids.tolist() == same.ids.tolist() and ds.mask.tolist() == same.mask.tolist()
    assert ds.skipped == int(broken)
    conversations, problems = read_conversations(path)
    assert [c.line for c in conversations] == begin_lines(texts)[int(broken):]
    assert [line for line, _ in problems] == ([1] if broken else [])


def test_a_broken_object_over_several_lines_with_the_real_cli(tmp_path):
    # --skip_bad_data skips it and trains on the rest; without the flag, a file:line error and exit 2
    weight = save_tiny_minimind(tmp_path / "base.pth")
    _, pretty = pretty_chats(4)
    pretty[1] = pretty[1].replace('"role": "assistant",', '"role": "assistant"')
    path = tmp_path / "pretty.jsonl"
    path.write_text("\n".join(pretty) + "\n")
    begins = begin_lines(pretty)[1]
    for flags in ({}, {"skip_bad_data": 1}):
        run = run_cli([python(), "trainer/train_lora.py", *lora_args(tmp_path, weight, path, max_steps=1,
                                                                     data_cache="none", **flags)],
                      300, cwd=REPO, env=subprocess_env())
        assert run.returncode == (0 if flags else 2), run.stdout[-2000:] + run.stderr[-2000:]
        assert "Traceback" not in run.stderr
        if flags:
            assert f"{path}: kept 3 samples, dropped 0 with no supervised token after truncation to " in run.stdout
            assert f"skipped {path}:{begins}: invalid JSON: Expecting ',' delimiter (line " in run.stdout
        else:
            assert f"{path}:{begins}: invalid JSON: Expecting ',' delimiter (line " in run.stderr


def test_a_value_that_is_no_object_after_objects_over_several_lines_is_one_bad_record(tmp_path):
    # Read as lines instead, each line of the pretty-printed record before it would be an 'invalid JSON' error
    pretty = json.dumps(chat("Hi", "Hello."), indent=2)
    path = tmp_path / "pretty.jsonl"
    path.write_text(pretty + "\n" + json.dumps(["Hey", "Hey."]) + "\n" + json.dumps(chat("Yo", "Yo.")) + "\n")
    conversations, problems = read_conversations(path)
    begins = pretty.count("\n") + 2
    assert [c.line for c in conversations] == [1, begins + 1]
    assert problems == [(begins, "expected a JSON object, got list")]


FLAT_DAMAGE = {  # how one object of a file written with json.dumps(obj, indent=0) is broken
    "a value lost its closing quote": lambda text: text.replace('"I am Lumen, 1."', '"I am Lumen, 1.'),
    "a value is a bare word": lambda text: text.replace('"I am Lumen, 1."', "I am Lumen"),
    "the object lost its closing brace": lambda text: text[:-1],
}


@pytest.mark.parametrize("damage", FLAT_DAMAGE)
def test_a_broken_object_written_without_indentation_is_one_bad_record(tok, tmp_path, damage):
    # indent=0 puts every line at the same depth: where the broken object ends is read off where a value may stand
    records = [chat(f"Who are you, {i}?", f"I am Lumen, {i}.") for i in range(4)]
    texts = [json.dumps(r, indent=0) for r in records]
    texts[1] = FLAT_DAMAGE[damage](texts[1])
    path = tmp_path / "flat.jsonl"
    path.write_text("\n".join(texts) + "\n")
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(texts[1].rstrip())  # an error at its end lies on its last line
    begins = begin_lines(texts)
    conversations, problems = read_conversations(path)
    at = f"line {begins[1] - 1 + reference.value.lineno}, column {reference.value.colno}"
    assert problems == [(begins[1], f"invalid JSON: {reference.value.msg} ({at})")]
    assert [c.line for c in conversations] == [begins[0], *begins[2:]]
    ds = SFTDataset(path, tok, 64, skip_invalid=True, log=None)
    others = write_lines(tmp_path / "others.jsonl", [json.dumps(r).encode() for k, r in enumerate(records) if k != 1])
    assert ds.ids.tolist() == SFTDataset(others, tok, 64, log=None).ids.tolist()
    assert ds.summary.splitlines()[0] == (f"{path}: kept 3 samples, dropped 0 with no supervised token after "
                                          "truncation to 64, skipped 1 invalid line")
