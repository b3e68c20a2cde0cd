"""A rank that fails mid-run takes the whole torchrun job down quickly, and says which rank and step."""

import re

import pytest

from tests.train_utils import (
    alive,
    lora_args,
    run_timed,
    save_tiny_minimind,
    subprocess_env,
    tokenizer_dir,
    torchrun,
    write_chat_data,
    write_launcher,
)

FAIL_AT = 3


@pytest.mark.slow
@pytest.mark.parametrize("rank_0", ["waits in the all-reduce", "is stuck"])
def test_rank_1_raising_at_step_3_ends_every_process_within_60s(tmp_path, rank_0):
    """Rank 1 raises at step 3. Rank 0 either waits for it in the step's gradient all-reduce (gloo sees the
    peer's sockets close and fails), or is stuck where no error reaches it (as in an NCCL collective, where
    it would wait for the timeout): then torchrun's store tells it, within seconds."""
    tokenizer_dir()
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 9)
    # 3 epochs of 3 steps: the failure comes in the middle of the run.
    cmd = torchrun("--standalone", "--nproc_per_node", "2", str(write_launcher(tmp_path)),
                   *lora_args(tmp_path, weight, data, batch_size=2, epochs=3, dist_timeout=60))
    env = subprocess_env(FAIL_AT=str(FAIL_AT), PID_FILE=str(tmp_path / "pid"),
                         STUCK_AT=str(FAIL_AT if rank_0 == "is stuck" else 0))
    ours = f"rank 1 failed at step {FAIL_AT}: RuntimeError: injected failure"
    run = run_timed(cmd, cwd=tmp_path, env=env, timeout=120, mark=ours)

    assert run.returncode != 0
    assert run.seconds < 60, run.output[-3000:]
    assert re.search(rf"^step {FAIL_AT - 1}/9 ", run.output, re.M), run.output[-3000:]  # it did train first
    # Our own line, not only torchrun's summary (which may name rank 0, the first to exit).
    assert ours in run.output, run.output[-3000:]
    assert "done:" not in run.output
    if rank_0 == "is stuck":
        assert f"rank 0: stopping because {ours}" in run.output, run.output[-3000:]
        assert run.exit_lag < 20, run.exit_lag  # torchrun alone would wait 30 s before it kills rank 0
    pids = [int((tmp_path / f"pid.{rank}").read_text()) for rank in (0, 1)]
    assert not [pid for pid in pids if alive(pid)], "a rank is still running after torchrun exited"
