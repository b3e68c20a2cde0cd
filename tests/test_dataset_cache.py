"""The tokenized-data cache gives exactly what tokenizing gives, and only while nothing the tokens depend on
has changed: the data's bytes, the tokenizer, the chat template, the maximum length, skipping bad lines."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

import dataset.lm_dataset as lm_dataset
from dataset.lm_dataset import PretrainDataset, SFTDataset
from dataset.records import DataError
from dataset.token_cache import KEEP, TokenCache, cache_from_flag, default_cache_dir
from tests.train_utils import (
    lora_args,
    run_inprocess,
    save_tiny_minimind,
    small_disk,
    tokenizer_dir,
    write_chat_data,
)
from trainer.train_lora import main


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tokenizer_dir())


@pytest.fixture()
def data(tmp_path):
    path = write_chat_data(tmp_path / "data.jsonl", 40, max_words=30)
    with open(path, "a") as f:  # a multi-turn chat with a system prompt
        f.write(json.dumps({"conversations": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
            {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Two?"},
            {"role": "assistant", "content": "No."}]}) + "\n")
    return path


def arrays(ds) -> tuple:
    return ds.ids, ds.mask, ds.lengths, ds.targets, np.array([ds.skipped, ds.dropped])


def assert_same(a, b) -> None:
    for x, y in zip(arrays(a), arrays(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npz"))


def test_a_second_read_comes_from_the_cache_and_equals_tokenizing(tok, data, tmp_path, monkeypatch):
    cache = TokenCache(tmp_path / "cache")
    plain = SFTDataset(data, tok, 40, log=None)
    assert plain.dropped > 0  # truncation to 40 leaves some answers nothing: the counts are cached too
    first = SFTDataset(data, tok, 40, cache=cache, log=None)
    assert first.summary.endswith(f"tokens cached in {cache.folder} for the next run")
    monkeypatch.setattr(lm_dataset, "_map_chunks", None)  # a hit tokenizes nothing
    second = SFTDataset(data, tok, 40, cache=cache, log=None)
    assert second.summary.endswith(f"tokens read from the cache {cache.folder}")
    assert_same(first, plain)
    assert_same(second, plain)
    assert len(entries(cache.folder)) == 1


def test_pretrain_text_is_cached_too(tok, tmp_path):
    path = tmp_path / "pre.jsonl"
    path.write_text("".join(json.dumps({"text": f"line {i} " * (i + 1)}) + "\n" for i in range(30)))
    cache = TokenCache(tmp_path / "cache")
    plain = PretrainDataset(path, tok, 24, log=None)
    PretrainDataset(path, tok, 24, cache=cache, log=None)
    again = PretrainDataset(path, tok, 24, cache=cache, log=None)
    assert "read from the cache" in again.summary
    assert_same(again, plain)
    chat = SFTDataset(data_path=write_chat_data(tmp_path / "chat.jsonl", 5), tokenizer=tok, max_length=64,
                      cache=cache, log=None)
    assert "cached in" in chat.summary  # another file, another entry


def test_every_input_of_the_tokens_makes_its_own_entry(tok, data, tmp_path):
    """Each change is a miss whose tokens equal tokenizing afresh, never the old entry's."""
    cache = TokenCache(tmp_path / "cache")
    SFTDataset(data, tok, 40, cache=cache, log=None)
    template = tmp_path / "template.jinja"
    template.write_text(tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>assistant "))
    more_special = AutoTokenizer.from_pretrained(tokenizer_dir())
    more_special.add_special_tokens({"additional_special_tokens": ["Answer"]})  # a word of the data
    edited = tmp_path / "edited.jsonl"
    rows = data.read_text().splitlines()
    rows[3] = rows[3].replace('"content": "', '"content": "X', 1)  # one more character in one question
    edited.write_text("\n".join(rows) + "\n")
    edited_in_place = tmp_path / "moved" / data.name
    edited_in_place.parent.mkdir()
    for path, tokenizer, kwargs in (
        (data, tok, {"max_length": 41}),
        (data, tok, {"max_length": 40, "chat_template": template.read_text()}),
        (data, more_special, {"max_length": 40}),
        (data, tok, {"max_length": 40, "skip_invalid": True}),
        (edited, tok, {"max_length": 40}),
    ):
        fresh = SFTDataset(path, tokenizer, log=None, **kwargs)
        cached = SFTDataset(path, tokenizer, cache=cache, log=None, **kwargs)
        assert "cached in" in cached.summary, kwargs
        assert_same(cached, fresh)
    # A file edited in place, even one whose time is set back, is known by its bytes.
    edited_in_place.write_bytes(data.read_bytes())
    SFTDataset(edited_in_place, tok, 40, cache=cache, log=None)
    edited_in_place.write_bytes(edited.read_bytes())
    os.utime(edited_in_place, ns=(0, 0))
    after = SFTDataset(edited_in_place, tok, 40, cache=cache, log=None)
    assert "cached in" in after.summary
    assert_same(after, SFTDataset(edited, tok, 40, log=None))


def test_bad_lines_skipped_into_the_cache_still_stop_a_run_that_does_not_skip(tok, data, tmp_path):
    rows = data.read_text().splitlines()
    rows[4] = rows[4][:-2]  # line 5: cut JSON
    data.write_text("\n".join(rows) + "\n")
    cache = TokenCache(tmp_path / "cache")
    skipping = SFTDataset(data, tok, 40, skip_invalid=True, cache=cache, log=None)
    assert skipping.skipped == 1
    assert "read from the cache" in SFTDataset(data, tok, 40, skip_invalid=True, cache=cache, log=None).summary
    with pytest.raises(DataError, match=f"{data}:5: invalid JSON"):
        SFTDataset(data, tok, 40, cache=cache, log=None)


def test_a_damaged_entry_is_tokenized_again_and_replaced(tok, data, tmp_path):
    cache = TokenCache(tmp_path / "cache")
    plain = SFTDataset(data, tok, 40, log=None)
    SFTDataset(data, tok, 40, cache=cache, log=None)
    (entry,) = entries(cache.folder)
    good = entry.read_bytes()
    with np.load(entry) as f:
        parts = dict(f)
    damages = {
        "cut short": good[: len(good) // 2],
        "not a zip": b"\0" * 100,
        "empty": b"",
    }
    for name, bad in damages.items():
        entry.write_bytes(bad)
        again = SFTDataset(data, tok, 40, cache=cache, log=None)
        assert "cached in" in again.summary, name
        assert_same(again, plain)
    for name, change in (("a length off by one", {"lengths": parts["lengths"] + np.eye(len(parts["lengths"]),
                                                                                          dtype=np.int64)[0]}),
                         ("ids of another dtype", {"ids": parts["ids"].astype(np.int64)}),
                         ("no counts", {"left_out": None})):
        with open(entry, "wb") as f:
            np.savez(f, **{k: v for k, v in {**parts, **change}.items() if v is not None})
        again = SFTDataset(data, tok, 40, cache=cache, log=None)
        assert "cached in" in again.summary, name
        assert_same(again, plain)
    assert entry.read_bytes() == good  # replaced by the same bytes: the writer is deterministic
    entry.unlink()
    entry.mkdir()  # a folder in its place: read as a miss, left alone
    again = SFTDataset(data, tok, 40, cache=cache, log=None)
    assert f"tokens not cached: {entry}" in again.summary and entry.is_dir()
    assert_same(again, plain)


def test_each_data_file_keeps_its_latest_entries(tok, data, tmp_path):
    cache = TokenCache(tmp_path / "cache")
    other = write_chat_data(tmp_path / "other.jsonl", 6)
    SFTDataset(other, tok, 30, cache=cache, log=None)
    for length in range(30, 30 + KEEP + 2):
        SFTDataset(data, tok, length, cache=cache, log=None)
        time.sleep(0.02)  # distinct modification times
    assert len(entries(cache.folder)) == KEEP + 1  # the other file's entry stays
    for length in range(32, 30 + KEEP + 2):  # the latest KEEP: read back
        assert "read from the cache" in SFTDataset(data, tok, length, cache=cache, log=None).summary
    assert "read from the cache" in SFTDataset(other, tok, 30, cache=cache, log=None).summary
    assert "cached in" in SFTDataset(data, tok, 30, cache=cache, log=None).summary  # pruned, made again


def test_a_cache_that_cannot_be_written_costs_only_time(tok, data, tmp_path):
    plain = SFTDataset(data, tok, 40, log=None)
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    ds = SFTDataset(data, tok, 40, cache=TokenCache(blocked / "cache"), log=None)
    assert "tokens not cached: " in ds.summary and str(blocked) in ds.summary
    assert_same(ds, plain)

    reader = TokenCache(tmp_path / "cache", write=False)  # a rank other than each machine's first
    assert SFTDataset(data, tok, 40, cache=reader, log=None).summary == plain.summary  # no note: nothing written
    assert not reader.folder.exists()
    SFTDataset(data, tok, 40, cache=TokenCache(reader.folder), log=None)
    assert "read from the cache" in SFTDataset(data, tok, 40, cache=reader, log=None).summary

    with small_disk(tmp_path / "small", "1m", " (the other cases ran)") as small:
        ds = SFTDataset(data, tok, 40, cache=TokenCache(small), log=None)
        assert "tokens not cached: 1 MiB free on" in ds.summary and not list(small.iterdir())
        assert_same(ds, plain)


def test_the_flag_and_its_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILORA_CACHE_DIR", str(tmp_path / "env"))
    assert cache_from_flag(None).folder == tmp_path / "env" == default_cache_dir()
    assert cache_from_flag("~/x").folder == Path.home() / "x"
    assert cache_from_flag("none") is None and cache_from_flag("off") is None
    monkeypatch.delenv("MINILORA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "minilora" / "tokenized"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "minilora" / "tokenized"


def test_a_second_run_reads_the_cache_and_trains_the_same(tmp_path, capsys):
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 12)
    cache = tmp_path / "cache"
    printed = []
    for run in ("first", "second"):
        argv = lora_args(tmp_path, weight, data, save_dir=tmp_path / run, batch_size=4, max_steps=4,
                         data_cache=cache)
        assert run_inprocess(main, argv) == 0
        printed.append(capsys.readouterr().out)
    assert f"tokens cached in {cache} for the next run" in printed[0]
    assert f"tokens read from the cache {cache}" in printed[1]
    losses = [[line.split("| loss ")[1][:6] for line in out.splitlines() if "| loss " in line] for out in printed]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    off = tmp_path / "off"
    assert run_inprocess(main, lora_args(tmp_path, weight, data, save_dir=off, max_steps=1, data_cache="none")) == 0
    assert "cache" not in capsys.readouterr().out
