"""scripts/multi_gpu_check.py (run once by hand on 2 GPUs) keeps working: its --cpu-smoke mode runs every
part end to end with tiny shapes on CPU (gloo), through the same code."""

import json
import math

import pytest

from tests.train_utils import REPO, python, run_cli, scaled, subprocess_env
from trainer.fsdp import fsdp_supported


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path):
    out = tmp_path / "out"
    # The script skips a part once its --budget is spent; this test's own time limit is the one that counts (on
    # a busy machine the smoke's default 120 s ran out before part (e)).
    budget = f"{scaled(540):.0f}"
    run = run_cli([python(), str(REPO / "scripts" / "multi_gpu_check.py"), "--cpu-smoke", "--out", str(out),
                   "--budget", budget], timeout=600, cwd=tmp_path, env=subprocess_env())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())

    # 1 process × accumulation 2 == 2 ranks (fp32 here: equal up to rounding), from a MiniMind .pth (a) and
    # from the same weights as a transformers Qwen3 directory (e)
    for part, base in (("a", "MiniMind .pth"), ("e", "transformers Qwen3 directory")):
        r = results[part]
        assert "skipped" not in r, f"({part}) {r.get('skipped')}"
        why = json.dumps(r) + "\n" + (out / f"{part}.log").read_text()[-4000:]  # the runs' output, should one fail
        assert (r["one"]["returncode"], r["two"]["returncode"], r.get("steps_compared")) == (0, 0, 4), why
        assert r["base"] == base and r["max_abs_loss_diff"] < 1e-5, why
        assert r["speedup"] > 0 and r["two"]["exit_after_done_s"] < 10, why
    assert "(Qwen3ForCausalLM) runs on the fast decoder" in (out / "e.log").read_text()

    c = results["c"]  # --fsdp holds about half of the base on each rank, DDP all of it
    if not fsdp_supported():  # torch < 2.7: the part says why it did not run
        assert c["skipped"].startswith("skipped: --fsdp needs torch >= 2.7")
    else:
        assert c["returncode"] == 0
        for fsdp, ddp in zip(c["fsdp"], c["ddp"], strict=True):
            base = ddp["params_held"] - ddp["lora_params"]
            assert fsdp["params_held"] - fsdp["lora_params"] == pytest.approx(base / 2, rel=0.02)
            assert fsdp["head_tied"] and ddp["head_tied"]
            assert all(math.isfinite(v) for v in fsdp["loss"] + ddp["loss"])

    d = results["d"]  # rank 1 raises at step 2: everything ends, and says so
    assert d["returncode"] != 0 and d["our_line"] and not d["timed_out"]
    assert d["processes_left"] == 0 and d["ranks_seen"] == 2 and d["exit_after_failure_s"] < 30

    summary = (out / "summary.txt").read_text()
    assert summary == run.stdout[-len(summary):]  # the table is also what it prints last
    for part in "abcde":
        assert f"\n({part}) " in summary
    assert len(list(out.iterdir())) <= 8


def test_a_run_past_its_time_is_stopped_with_its_torchrun_workers(tmp_path):
    """torchrun puts each worker in a session of its own: killing torchrun's group alone left the workers
    holding the output pipe, and the check hung until the device's limit. Now every process ends."""
    from scripts.multi_gpu_check import _alive, child_env, launcher, run_logged

    worker = tmp_path / "sleeper.py"
    # One write() per line: the two workers share the pipe, and with PYTHONUNBUFFERED=1 (as in CI) print()
    # writes "worker", " ", the pid and "\n" one by one, so two lines could interleave ("workerworker 9743").
    worker.write_text("import os, time\nos.write(1, f'worker {os.getpid()}\\n'.encode())\ntime.sleep(300)\n")
    # torchrun needs about 3 s to start both workers here, but on the loaded 2-core CI machine 5 s, and
    # once even 20 s, were too short; the check needs both started, so a slow start gets a longer try.
    for timeout in (20, 90):
        run = run_logged([*launcher(2), str(worker)], child_env(cpu=True), tmp_path / "log.txt", timeout=timeout)
        assert run["timed_out"] and run["returncode"] != 0
        # SIGTERM, then SIGKILL 30 s later at the latest
        assert run["seconds"] < timeout + 40, run["output"][-2000:]
        pids = [int(line.split()[1]) for line in run["output"].splitlines() if line.startswith("worker ")]
        if len(pids) == 2:
            break
    assert len(pids) == 2, run["output"][-2000:]
    assert not any(_alive(pid) for pid in pids)


def test_unknown_parts_are_refused_with_the_letters_to_use(tmp_path):
    run = run_cli([python(), str(REPO / "scripts" / "multi_gpu_check.py"), "--parts", "bx", "--out", str(tmp_path)],
                  timeout=60, cwd=tmp_path, env=subprocess_env())
    assert run.returncode == 2 and "--parts 'bx': give letters from abcde" in run.stderr, run.stderr
    assert not any(tmp_path.iterdir())  # refused before anything ran
