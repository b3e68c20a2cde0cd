"""scripts/bench_e2e.py: its generated chat mix (the documented languages, turns, system prompts and lengths),
a run against another checkout of the trainer, and the Trainer rows' clock and whole epochs."""

import json
import math
import os
import re
import shutil
import subprocess
import time

import peft
import torch
import transformers
from transformers import AutoTokenizer

from dataset.lm_dataset import SFTDataset
from scripts.bench_e2e import write_chat_mix
from tests.train_utils import REPO, python, run_cli, subprocess_env
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


def test_against_runs_each_of_our_rows_from_the_other_checkout_too(tmp_path):
    """--against DIR: the ours row, then the same row from DIR's trainer (marked here so that its log shows
    which code ran), each to a finished epoch, both in the table."""
    before = tmp_path / "before"
    shutil.copytree(REPO, before, ignore=shutil.ignore_patterns(".git", "out", ".venv*", "*.egg-info", "__pycache__",
                                                                ".dev*", ".pytest_cache", ".ruff_cache"))
    job = before / "trainer" / "train_lora.py"
    job.write_text(job.read_text().replace("\ndef main(", '\nprint("trainer: the other checkout", flush=True)\n\n\n'
                                            "def main(", 1))
    work = tmp_path / "work"
    out = run_cli([python(), "scripts/bench_e2e.py", "--tiny", "--variants", "ours", "--workdir", str(work),
                   "--against", str(before), "--json", str(tmp_path / "rows.json")], 400, cwd=REPO,
                  env=subprocess_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(r["name"], r["code"], r["full_epoch"]) for r in rows] == [("ours", 0, True), ("ours@before", 0, True)]
    assert "trainer: the other checkout" in (work / "ours@before.log").read_text()
    assert "trainer: the other checkout" not in (work / "ours.log").read_text()
    table = out.stdout.split("variant")[-1]
    assert "ours@before" in table
    # The figures name what they ran on: the versions this interpreter imports.
    assert (f"; CPU, {os.cpu_count()} cores; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}") in out.stdout
    # The loss at the last step, read from each log's last step line: the same code and data train alike.
    for row in rows:
        last_step = [line for line in (work / f"{row['name']}.log").read_text().splitlines() if re.search(r" step \d+/\d+ ", line)][-1]
        assert f"| loss {row['last_loss']:.4f} |" in last_step, (row["last_loss"], last_step)
        assert f"{row['last_loss']:9.4f}" in table
    assert rows[0]["last_loss"] == rows[1]["last_loss"]


def test_the_length_grouped_trainer_row_pads_less(tmp_path):
    """The Trainer peer with its length-grouped sampler (the `-grouped` rows) computes on far less padding than
    the random batches of the plain padded row: a peer this fast belongs in the comparison. Both rows report
    `pad_share`, the padding's share of their batches' token slots."""
    out = run_cli([python(), "scripts/bench_e2e.py", "--tiny", "--conversations", "1280", "--steps", "3",
                   "--variants", "hf-padded,hf-grouped", "--workdir", str(tmp_path / "work"),
                   "--json", str(tmp_path / "rows.json")], 400, cwd=REPO, env=subprocess_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    assert rows["hf-padded"]["code"] == rows["hf-grouped"]["code"] == 0, rows
    padded, grouped = rows["hf-padded"]["pad_share"], rows["hf-grouped"]["pad_share"]
    assert 0.3 < padded < 0.8 and grouped < padded / 4, (padded, grouped)


def test_a_trainer_row_can_train_its_whole_epoch_and_is_then_measured(tmp_path):
    """`--steps 0`: the Trainer row trains every batch of the epoch and saves its adapter, and its epoch time is
    measured from launch to exit, as ours is, not projected. Its times run from launch: imports, then the
    first step, then the last, then the exit."""
    work = tmp_path / "work"
    out = run_cli([python(), "scripts/bench_e2e.py", "--tiny", "--steps", "0", "--variants", "hf-padded",
                   "--workdir", str(work), "--json", str(tmp_path / "rows.json")], 400, cwd=REPO, env=subprocess_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "rows.json").read_text())
    (row,) = result["rows"]
    assert row["code"] == 0 and row["full_epoch"] and "projected_s" not in row, row
    assert row["steps"] == math.ceil(result["stats"]["conversations"] / 32)
    assert (work / "runs" / "hf-padded" / "adapter_config.json").is_file()
    assert 0 < row["imports_s"] < row["first_step_s"] <= row["step_end_s"][-1] < row["wall_s"], row
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("hf-padded ")]
    assert line.split()[1:3] == [f"{row['wall_s']:.1f}", "measured"], line


def test_a_trainer_row_counts_from_its_launch(tmp_path):
    """The worker's clock starts at the launch time main gives it, so its imports and its reading of the data
    count, as they do for ours: launched (as if) 100 s ago, every time it reports is past 100 s."""
    tok = AutoTokenizer.from_pretrained(REPO_TOKENIZER)
    data = write_chat_mix(tmp_path / "mix.jsonl", 40, tok, seed=0)
    opts = dict(name="hf-padded", collator="padded", data=str(data), shape="tiny", device="cpu", qwen3_dir="",
                steps=4, batch=8, out=str(tmp_path / "out"), launched_at=time.time() - 100)
    p = subprocess.run([python(), "scripts/bench_e2e.py", "--hf-worker", json.dumps(opts)], capture_output=True,
                       text=True, timeout=300, cwd=REPO, env=subprocess_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    row = json.loads(p.stdout.splitlines()[-1])
    assert 100 < row["imports_s"] < row["first_step_s"] < row["projected_s"], row
    assert not row["full_epoch"] and row["steps"] == 4
