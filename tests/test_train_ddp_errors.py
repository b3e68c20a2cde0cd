"""Under a real torchrun (2 gloo ranks on CPU), an error every rank hits is said once, and an error one rank
hits alone is said by that rank, with its rank named; the ranks that failed exit 2. Under a launcher that stops no
rank (slurm's srun), a rank says its error and exits at once."""

import re
import time

import pytest

from tests.train_utils import (
    REPO,
    lora_args,
    python,
    run_cli,
    run_timed,
    save_tiny_minimind,
    subprocess_env,
    torchrun,
    write_chat_data,
)
from trainer.job import QUIET_WAIT_S

SCRIPT = str(REPO / "trainer" / "train_lora.py")
# Rank 1 alone fails with a UserError, before the process group exists (WHERE=flags) or after (WHERE=base).
ONE_RANK = '''
import os
import sys

import trainer.job
import trainer.train_lora as job
from model.errors import UserError

trainer.job.QUIET_WAIT_S = 2


def fail_on_rank_1(real):
    def call(*args, **kwargs):
        if os.environ["RANK"] == "1":
            raise UserError("only rank 1 sees this")
        return real(*args, **kwargs)
    return call


where = os.environ["WHERE"]
if where == "flags":
    job.check_data_files = fail_on_rank_1(job.check_data_files)
else:
    job.load_base = fail_on_rank_1(job.load_base)
trainer.job.run_job(lambda: job.main(sys.argv[1:]))
'''


def _two_ranks(tmp_path, script: str, *flags: str, failing: tuple[int, ...] = (0, 1), **env: str) -> list[str]:
    """The `error: ` lines of a 2-rank run, whose `failing` ranks must end with the error's status 2."""
    run = run_timed(torchrun("--standalone", "--nproc_per_node", "2", script, *flags), cwd=tmp_path,
                    env=subprocess_env(**env), timeout=120)
    assert run.returncode != 0, run.output[-3000:]
    # torchrun's summary gives the exit status of the rank it saw fail first and, from torch 2.7, of the ranks it
    # stopped then. A failing rank listed exited 2, or by torchrun's SIGTERM itself (-15) when that came before the
    # rank reached its own error; at least one exited 2.
    status = {int(rank): code for rank, code in
              re.findall(r"rank\s*: (\d) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", run.output)}
    listed = [status[rank] for rank in failing if rank in status]
    assert "2" in listed and all(code in ("2", "-15") for code in listed), run.output[-3000:]
    return [line for line in run.output.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    return tmp, save_tiny_minimind(tmp / "full_sft_64.pth"), write_chat_data(tmp / "data.jsonl", 4)


@pytest.mark.slow
def test_a_flag_error_is_said_once(tmp_path):
    lines = _two_ranks(tmp_path, SCRIPT, "--ddp", "--device", "cpu", "--lora_rank", "0")
    assert lines == ["error: --lora_rank must be at least 1 (got 0)"]


@pytest.mark.slow
def test_an_error_every_rank_hits_after_joining_is_said_once(tiny):
    tmp, weight, data = tiny
    missing = tmp / "missing" / "full_sft_64.pth"
    lines = _two_ranks(tmp, SCRIPT, *lora_args(tmp, missing, data))
    assert len(lines) == 1 and re.fullmatch(rf"error: rank [01]: --from_weight {re.escape(str(missing))}: no such "
                                            r"file or directory", lines[0]), lines


@pytest.mark.slow
@pytest.mark.parametrize("where", ["flags", "base"])
def test_an_error_of_one_rank_names_it(tiny, where):
    tmp, weight, data = tiny
    launcher = tmp / "one_rank.py"
    launcher.write_text(ONE_RANK)
    lines = _two_ranks(tmp, str(launcher), *lora_args(tmp, weight, data), failing=(1,), WHERE=where)
    assert lines == ["error: rank 1: only rank 1 sees this"]


def test_a_flag_error_under_a_launcher_that_is_not_torchrun_exits_at_once(tmp_path):
    # A slurm script exports RANK, WORLD_SIZE and LOCAL_RANK but no TORCHELASTIC_RUN_ID, and no agent stops this rank after local
    # rank 0 exits: waiting QUIET_WAIT_S for one would only delay the error
    env = {k: v for k, v in subprocess_env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1").items()
           if not k.startswith("TORCHELASTIC_")}
    start = time.monotonic()
    run = run_cli([python(), SCRIPT, "--lora_rank", "0"], timeout=120, cwd=tmp_path, env=env)
    elapsed = time.monotonic() - start
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == ["error: rank 1: --lora_rank must be at least 1 (got 0)"], run.stderr
    assert elapsed < QUIET_WAIT_S / 2, f"{elapsed:.1f} s"


def test_ranks_set_without_a_rendezvous_address_stop_in_one_line(tmp_path):
    # A slurm script that exports RANK, WORLD_SIZE and LOCAL_RANK from SLURM_PROCID and the rest, but no MASTER_ADDR
    # or MASTER_PORT: torch's env:// rendezvous would raise a ValueError with a traceback
    env = {k: v for k, v in subprocess_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items()
           if not k.startswith(("TORCHELASTIC_", "MASTER_"))}
    weight = save_tiny_minimind(tmp_path / "base.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 4)
    run = run_cli([python(), SCRIPT, *lora_args(tmp_path, weight, data, max_steps=1)], timeout=120, cwd=tmp_path,
                  env=env)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: RANK, WORLD_SIZE and LOCAL_RANK are set but MASTER_ADDR and MASTER_PORT not: export rank 0's host as "
        "MASTER_ADDR and a free port as MASTER_PORT too, or start with torchrun"], run.stderr
