"""scripts/bench/profile_trainer.py: profiles whole loop iterations of a real train_lora.py run."""

import gzip
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from scripts.bench import trace_gaps
from tests.train_utils import (
    REPO,
    lora_args,
    python,
    run_cli,
    save_tiny_minimind,
    subprocess_env,
    tokenizer_dir,
    write_chat_data,
)


def _profile(tmp: Path, steps: str, *extra: str, device: str = "cpu") -> subprocess.CompletedProcess:
    """A 4-step tiny run of train_lora.py under the profiler script (on the CPU unless `device`); it must
    succeed."""
    tokenizer_dir()
    weight, data = save_tiny_minimind(tmp / "full_sft_64.pth"), write_chat_data(tmp / "data.jsonl", 9)
    cmd = [python(), str(REPO / "scripts" / "bench" / "profile_trainer.py"), "--steps", steps, "--out",
           str(tmp / "prof"), *extra, "--", *lora_args(tmp, weight, data, batch_size=2, max_steps=4, device=device)]
    run = run_cli(cmd, timeout=600, cwd=tmp, env=subprocess_env())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "done: " in run.stdout  # the run itself went on to its end
    return run


def test_profiles_the_chosen_steps_of_a_real_run(tmp_path):
    run = _profile(tmp_path, "2-3", "--with-stack")
    summary = (tmp_path / "prof" / "profile_rank0.txt").read_text()
    assert re.match(r"rank 0: steps 2-3 \(2 loop iterations\), [\d.]+ ms wall, [\d.]+ ms per step", summary)
    assert "aten::mm" in summary  # the summary's top operators (sorted by self time) hold the matmuls
    assert summary.splitlines()[0] in run.stdout
    trace = json.loads(gzip.decompress((tmp_path / "prof" / "trace_rank0.json.gz").read_bytes()))
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert "aten::mm" in names and any(n.startswith("Optimizer.step") for n in names)  # forward/backward, update
    assert any("DataLoader" in n for n in names)  # the next batch's fetch is in the window
    assert any(n.startswith("trainer/engine.py(") and n.endswith(": train_step") for n in names)  # --with-stack
    # A CPU trace has no device timeline to read gaps from, and trace_gaps says so.
    events = trace_gaps.load_events(tmp_path / "prof" / "trace_rank0.json.gz")
    assert "no device events" in trace_gaps.report(events, n_gaps=8, depth=6, min_gap_ms=0.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_run_on_the_default_path_is_profiled_with_its_kernels(tmp_path):
    run = _profile(tmp_path, "3", device="cuda")  # packed, compiled, CUDA graphs: step 3 replays steps 1-2's
    assert "CUDA graphs: 1 micro-batch shape(s) recorded and replayed" in run.stdout
    summary = (tmp_path / "prof" / "profile_rank0.txt").read_text()
    assert float(re.search(r"device time summed over kernels ([\d.]+) ms", summary).group(1)) > 0
    events = trace_gaps.load_events(tmp_path / "prof" / "trace_rank0.json.gz")
    assert sum(e.category == "kernel" for e in events) > 20


def test_a_window_past_the_end_is_closed_at_exit(tmp_path):
    run = _profile(tmp_path, "3-9")
    assert "rank 0: steps 3-4 (2 loop iterations, the run ended inside the window)" in run.stdout


def _x(name: str, cat: str, ts_ms: float, dur_ms: float, tid: int, correlation: int | None = None) -> dict:
    """One complete event as torch.profiler's chrome trace writes it (times in microseconds)."""
    event = {"ph": "X", "name": name, "cat": cat, "ts": ts_ms * 1e3, "dur": dur_ms * 1e3,
             "pid": 0 if cat in ("kernel", "gpu_memcpy") else 100, "tid": tid}
    if correlation is not None:
        event["args"] = {"correlation": correlation}
    return event


def test_trace_gaps_names_the_late_launch_and_the_sync_that_made_it_late(tmp_path):
    # Device: k1 (0-10 ms) and a copy on another stream inside it, then k2 from 16 ms: one 6 ms gap.
    # Host thread 1: a train_step frame around everything; k1 launched at 1 ms; aten::item blocks in a
    # stream synchronize from 10.6 to 14.4 ms; aten::mm launches k2 at 15.2 ms.
    events = [
        _x("k1", "kernel", 0, 10, tid=7, correlation=1), _x("Memcpy HtoD", "gpu_memcpy", 3, 2, tid=8, correlation=3),
        _x("k2", "kernel", 16, 4, tid=7, correlation=2),
        _x("trainer/engine.py(150): train_step", "python_function", 0, 21, tid=1),
        _x("cudaLaunchKernel", "cuda_runtime", 1, 0.01, tid=1, correlation=1),
        _x("aten::item", "cpu_op", 10.5, 4, tid=1),
        _x("cudaStreamSynchronize", "cuda_runtime", 10.6, 3.8, tid=1),
        _x("aten::mm", "cpu_op", 15, 1, tid=1),
        _x("cudaLaunchKernel", "cuda_runtime", 15.2, 0.01, tid=1, correlation=2),
        _x("aten::add_", "cpu_op", 0.5, 0.2, tid=2),  # another thread's span never counts as around
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    text = trace_gaps.report(trace_gaps.load_events(path), n_gaps=8, depth=6, min_gap_ms=0.2)
    lines = text.splitlines()
    assert lines[0] == "window 21.0 ms; device busy 14.0 ms (67%), idle 7.0 ms"
    assert "gap of 6.00 ms at +10.0 ms, ended by k2" in text
    assert ("  launched +5.20 ms after the gap began, by cudaLaunchKernel (0.01 ms) in "
            "trainer/engine.py(150): train_step > aten::mm") in lines
    assert ("  host blocked: cudaStreamSynchronize (3.80 ms) in trainer/engine.py(150): train_step > aten::item"
            in lines)
    assert text.count("gap of") == 1  # 10 → 16 ms is the only gap; the copy overlaps k1
    assert lines[-1] == "  cudaStreamSynchronize (3.80 ms) in trainer/engine.py(150): train_step > aten::item"


def test_without_its_own_flags_the_profiled_run_stops_after_the_window_and_saves_under_out(tmp_path):
    """The README's bare profile command must not train the whole quick start again over its out/ files."""
    tokenizer_dir()
    weight, data = save_tiny_minimind(tmp_path / "full_sft_64.pth"), write_chat_data(tmp_path / "data.jsonl", 9)
    flags = lora_args(tmp_path, weight, data, batch_size=2)
    i = flags.index("--save_dir")
    flags = flags[:i] + flags[i + 2:]
    cmd = [python(), str(REPO / "scripts" / "bench" / "profile_trainer.py"), "--steps", "2", "--out",
           str(tmp_path / "prof"), "--", *flags]
    run = run_cli(cmd, timeout=600, cwd=tmp_path, env=subprocess_env())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "rank 0: steps 2-2 (1 loop iterations)" in run.stdout
    assert "done: prof/run/lora_identity_64.pth and prof/run/lora_identity_64/ (step 3/3)" in run.stdout
