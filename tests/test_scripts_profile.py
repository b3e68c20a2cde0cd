"""scripts/bench/profile_trainer.py: profiles whole loop iterations of a real train_lora.py run."""

import gzip
import json
import re
import subprocess
from pathlib import Path

from tests.train_utils import (
    REPO,
    lora_args,
    python,
    save_tiny_minimind,
    subprocess_env,
    tokenizer_dir,
    write_chat_data,
)


def _profile(tmp: Path, steps: str) -> subprocess.CompletedProcess:
    """A 4-step tiny CPU run of train_lora.py under the profiler script; it must succeed."""
    tokenizer_dir()
    weight, data = save_tiny_minimind(tmp / "full_sft_64.pth"), write_chat_data(tmp / "data.jsonl", 9)
    cmd = [python(), str(REPO / "scripts" / "bench" / "profile_trainer.py"), "--steps", steps, "--out",
           str(tmp / "prof"), "--", *lora_args(tmp, weight, data, batch_size=2, max_steps=4)]
    run = subprocess.run(cmd, cwd=tmp, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "done: " in run.stdout  # the run itself went on to its end
    return run


def test_profiles_the_chosen_steps_of_a_real_run(tmp_path):
    run = _profile(tmp_path, "2-3")
    summary = (tmp_path / "prof" / "profile_rank0.txt").read_text()
    assert re.match(r"rank 0: steps 2-3 \(2 loop iterations\), [\d.]+ ms wall, [\d.]+ ms per step", summary)
    assert "aten::mm" in summary and "Optimizer.step" in summary  # forward/backward and the update are inside
    assert summary.splitlines()[0] in run.stdout
    trace = json.loads(gzip.decompress((tmp_path / "prof" / "trace_rank0.json.gz").read_bytes()))
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert "aten::mm" in names and any("DataLoader" in n for n in names)  # the next batch's fetch is in the window


def test_a_window_past_the_end_is_closed_at_exit(tmp_path):
    run = _profile(tmp_path, "3-9")
    assert "rank 0: steps 3-4 (2 loop iterations, the run ended inside the window)" in run.stdout
