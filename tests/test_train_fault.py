"""A rank that fails mid-run takes the whole torchrun job down quickly, and says which rank and step; a
stop signal to torchrun ends the job cleanly."""

import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train_utils import (
    REPO,
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
def test_rank_1_raising_at_step_3_ends_every_process_within_60s(tmp_path):
    """Rank 1 raises at step 3 while rank 0 is stuck where no error reaches it (as in an NCCL collective with
    the dead rank, which waits for the timeout): torchrun's store tells rank 0, which stops within seconds.
    (With rank 0 waiting in a gloo all-reduce instead, gloo fails it at once: scripts/multi_gpu_check.py
    part (d), run by tests/test_scripts_multi_gpu.py.)"""
    tokenizer_dir()
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 9)
    # 3 epochs of 3 steps: the failure comes in the middle of the run.
    cmd = torchrun("--standalone", "--nproc_per_node", "2", str(write_launcher(tmp_path)),
                   *lora_args(tmp_path, weight, data, batch_size=2, epochs=3, dist_timeout=60))
    env = subprocess_env(FAIL_AT=str(FAIL_AT), STUCK_AT=str(FAIL_AT), PID_FILE=str(tmp_path / "pid"))
    ours = f"rank 1 failed at step {FAIL_AT}: RuntimeError: injected failure"
    run = run_timed(cmd, cwd=tmp_path, env=env, timeout=120, mark=ours)

    assert run.returncode != 0
    assert run.seconds < 60, run.output[-3000:]
    assert re.search(rf"^step {FAIL_AT - 1}/9 ", run.output, re.M), run.output[-3000:]  # it did train first
    # Our own line, not only torchrun's summary (which may name rank 0, the first to exit).
    assert ours in run.output, run.output[-3000:]
    assert "done:" not in run.output
    assert f"rank 0: stopping because {ours}" in run.output, run.output[-3000:]
    assert run.exit_lag < 20, run.exit_lag  # torchrun alone would wait 30 s before it kills rank 0
    pids = [int((tmp_path / f"pid.{rank}").read_text()) for rank in (0, 1)]
    assert not [pid for pid in pids if alive(pid)], "a rank is still running after torchrun exited"


@pytest.mark.slow
def test_sigterm_to_torchrun_lets_every_rank_finish_its_step_and_save(tmp_path):
    """torchrun passes a SIGTERM on to its workers' process groups, DataLoader workers included: those must
    not die under the rank, which finishes its step with them and saves. (torchrun itself then exits 1:
    it reports that it was signalled, whatever its workers did.)"""
    tokenizer_dir()
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 200)
    out = tmp_path / "out"
    cmd = torchrun("--standalone", "--nproc_per_node", "2", str(REPO / "trainer" / "train_lora.py"),
                   *lora_args(tmp_path, weight, data, save_dir=out, batch_size=2, num_workers=1))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=60)
    output = "".join(seen) + rest
    for rank in (0, 1):  # each rank says it received it
        assert output.count(f"rank {rank}: SIGTERM received: finishing this step") == 1, output[-3000:]
    assert not re.search(r"rank \d failed|DataLoader worker .* is killed", output), output[-3000:]
    stopped = int(re.search(r"stopped at step (\d+)/\d+; resume with:", output).group(1))
    assert stopped >= 2
    assert torch.load(out / "lora_identity_64_resume.pth", weights_only=False)["state"]["step"] == stopped


def test_the_resume_command_is_one_the_user_can_run(monkeypatch):
    """One process: python. torchrun, even of one process (--ddp needs it): torchrun with this machine's processes.
    Another launcher (srun): the user's own command. Several machines: each started torchrun with its own --node_rank and rendezvous flags, which no rank sees."""
    from trainer.distributed import DistInfo
    from trainer.job import resume_command, stopped_line

    monkeypatch.setattr("sys.argv", ["trainer/train_lora.py", "--ddp", "--batch_size", "4"])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    one = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert resume_command(one) == "python trainer/train_lora.py --ddp --batch_size 4 --from_resume 1"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    # srun sets the ranks but is not torchrun: its command is the user's own
    assert resume_command(one) == ("your launcher's command, as before, running trainer/train_lora.py --ddp "
                                   "--batch_size 4 --from_resume 1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert resume_command(one) == ("torchrun --nproc_per_node=1 trainer/train_lora.py --ddp --batch_size 4 "
                                   "--from_resume 1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    four = DistInfo(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"))
    assert resume_command(four) == ("your torchrun command on every machine, as before, running "
                                    "trainer/train_lora.py --ddp --batch_size 4 --from_resume 1")
    assert stopped_line(0, 6, four) == ("stopped before the first step (0/6): nothing was saved; run the same "
                                        "command to start")
    assert stopped_line(3, 6, four).startswith("stopped at step 3/6; resume with:\n  your torchrun command")


def test_ctrl_c_while_the_imports_run_ends_with_aborted_not_a_traceback(tmp_path):
    """torch and transformers take seconds to import; a Ctrl-C then ends the run as one later does."""
    proc = subprocess.Popen([sys.executable, str(REPO / "trainer" / "train_lora.py"), "--max_steps", "1",
                             "--save_dir", str(tmp_path / "out")], cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # inside the imports (they take 3 s and more on 2 cores)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, err, out) == (130, "aborted\n", "")
