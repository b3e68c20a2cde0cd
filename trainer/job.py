"""The entry point every job shares: a stop signal that saves first, errors as one line, and under torchrun a
failure named by its rank and step, with no rank left hanging on a dead peer."""

import atexit
import contextlib
import faulthandler
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import torch.distributed as dist

from model.errors import UserError, first_line, is_out_of_memory, print_error
from trainer.compile_cache import stopped_by_cache
from trainer.distributed import (
    DistInfo,
    announce_failure,
    cleanup_distributed,
    exit_now,
    launched_as_a_rank,
    say_once_per_machine,
    torchrun_agent_watches,
)


class StopSignal:
    """SIGINT/SIGTERM ask the run to finish its current step, save, and exit.

    A second signal ends the process at once, without saving. Under torchrun a rank that has not
    finished `deadline_s` after the first signal also exits (status 1): when torchrun tears the group
    down after another rank failed, this rank may be blocked in a collective that will never complete.
    """

    def __init__(self, deadline_s: float = 120) -> None:
        self.requested = False
        self.deadline_s = deadline_s
        # A signal the launcher set to be ignored stays ignored (bash does that to SIGINT for `cmd &`).
        self.signals = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
        for s in self.signals:
            signal.signal(s, self._handle)
        # How the user stops the run, as the start-up line says it.
        if signal.SIGINT in self.signals:
            self.how = "Ctrl-C or kill"
        else:  # run in the background (`nohup cmd &`): only SIGTERM stops it; name the process to send it to
            self.how = f"`kill {os.getppid()}` (torchrun)" if torchrun_agent_watches() else f"`kill {os.getpid()}`"

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        # The next signal takes the default action (the process ends), even while the main thread is stuck
        # in C++ (a collective, a kernel), where a Python handler would not run until it returned.
        for s in self.signals:
            signal.signal(s, signal.SIG_DFL)
        rank = os.environ.get("RANK") if launched_as_a_rank() else None
        print(f"\n{f'rank {rank}: ' if rank else ''}{signal.Signals(signum).name} received: finishing this step, then "
              f"saving a resume checkpoint (a second {self.how} aborts without saving)", flush=True)
        if rank is not None:
            timer = threading.Timer(self.deadline_s, exit_now, (1, f"rank {rank}: the step did not finish within "
                                    f"{self.deadline_s:g} s of the stop signal (is a peer rank gone?); exiting "
                                    "without saving"))
            timer.daemon = True
            timer.start()


@contextlib.contextmanager
def at_step(step: int) -> Iterator[None]:
    """Tag an exception raised inside with optimizer step `step` (run_job's failure line names it)."""
    try:
        yield
    except Exception as err:
        if not hasattr(err, "failed_step"):
            err.failed_step = step
        raise


def resume_command(info: DistInfo) -> str:
    """The command line that continues this run (`--from_resume 1` added or switched on)."""
    return rerun_command(info, {"from_resume": "1"})


def stopped_line(step: int, total_steps: int, info: DistInfo) -> str:
    """What a run a signal stopped says last: the command that continues it, or that nothing was saved yet."""
    if step == 0:
        return f"stopped before the first step (0/{total_steps}): nothing was saved; run the same command to start"
    return f"stopped at step {step}/{total_steps}; resume with:\n  {resume_command(info)}"


def rerun_command(info: DistInfo, changes: dict[str, str]) -> str:
    """This run's command line with the flags in `changes` set to their values (dropped where given, then
    appended)."""
    argv, out, skip = sys.argv[1:], [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        name = a.removeprefix("--").split("=", 1)[0]
        if a.startswith("--") and name in changes:
            skip = "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        out.append(a)
    for name, value in changes.items():
        out += [f"--{name}", value]
    if not launched_as_a_rank():
        return shlex.join(["python", sys.argv[0], *out])
    if not torchrun_agent_watches():  # srun or another launcher, whose own flags this rank cannot see
        return "your launcher's command, as before, running " + shlex.join([sys.argv[0], *out])
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    if per_machine == info.world_size:
        return shlex.join(["torchrun", f"--nproc_per_node={per_machine}", sys.argv[0], *out])
    # Several machines: each was started with its own --node_rank and rendezvous flags, which a rank cannot see.
    return ("your torchrun command on every machine, as before, running " + shlex.join([sys.argv[0], *out]))


EXIT_GRACE_S = 30  # seconds an exiting rank may spend leaving the process group
# What gloo and NCCL say when a peer process is gone or never answers.
PEER_LOST = ("closed by peer", "Connection reset by peer", "remote process exited", "Timed out", "timed out")


def run_job(main: Callable[[], int | None], teardown: bool = True) -> None:
    """Run a job's main(): a UserError is printed without a traceback (exit 2); under torchrun a failure
    is reported as `rank R failed at step N: ...` (the launcher only says which rank exited); the process
    group is left without hanging on a dead peer; signal handlers are put back as they were.

    `teardown=False` (the scripts' entry points) leaves, once the exit handlers have run and the output is
    flushed, without the interpreter's teardown: after a compiled run that takes 2-4 s (docs/PERF.md)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 1
    try:
        code = main() or 0
    except UserError as err:
        _print_user_error(err)
        code = 2
        _tell_peers(err)
    except KeyboardInterrupt as err:
        print("aborted", file=sys.stderr)
        code = 130
        _tell_peers(err)
    except Exception as err:
        distributed = dist.is_available() and dist.is_initialized()
        code = 1
        if is_out_of_memory(err):  # outside a step (trainer/out_of_memory.py has those): loading the model
            print_error(f"out of memory ({first_line(err)}). A base model too big for the device trains with --load_in_4bit "
                        "(LoRA) or --fsdp over several GPUs; a lower --batch_size or --max_seq_len needs less per step")
            code = 2
        elif (cache_error := stopped_by_cache(err)) is not None:
            print_error(cache_error)
            code = 2
        elif not (distributed and _peer_lost(err)):  # a peer's death: its one line says all there is to say
            traceback.print_exc()
        if distributed:
            print(_failure_line(err), file=sys.stderr, flush=True)
        _tell_peers(err)
    finally:
        if torchrun_agent_watches():
            # Leaving must not hang a rank (seen once, on torch 2.6 under load, blocked in native code where
            # no Python timer runs): faulthandler's own thread dumps the stacks and exits past the limit.
            faulthandler.dump_traceback_later(2 * EXIT_GRACE_S, exit=True)
        _leave_process_group(code)
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if not teardown or torchrun_agent_watches():
        # Under torchrun, interpreter shutdown could also abort a rank that had finished cleanly (SIGABRT,
        # "terminate called without an active exception": C++ threads torn down with the interpreter), and
        # torchrun then fails the job. Run the exit handlers, flush, and leave without that teardown.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


QUIET_WAIT_S = 30  # seconds a rank that leaves an error to local rank 0 waits for torchrun to stop it


def _print_user_error(err: UserError) -> None:
    """`error: <message>`, once per machine under torchrun rather than once per rank.

    Before the process group exists, an error comes from the flags and this machine's files, which all of its
    ranks share: local rank 0 says it and the others wait quietly for torchrun, which stops them when local
    rank 0 exits (its exit status 2 is then the one torchrun's summary reports). Should that not happen, the
    error was this rank's own after all, and it says so. After that, an error may be one rank's own (its data,
    its memory): it names the rank, and a rank whose message another rank of its machine printed stays quiet.
    Under another launcher (slurm's srun), which stops no rank, every rank says its error at once.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not launched_as_a_rank() or world == 1:
        print_error(err)
    elif dist.is_available() and dist.is_initialized():
        say_once_per_machine(str(err), dist.get_rank())
    elif os.environ["LOCAL_RANK"] == "0":
        print_error(err)
    elif not torchrun_agent_watches():
        print_error(f"rank {os.environ['RANK']}: {err}")
    else:
        # Stopped by torchrun, this rank too ends with the error's status (torchrun's summary lists it); a stop
        # that comes before this rank reached its error ends it by the signal, as any rank torchrun stops.
        signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
        with contextlib.suppress(KeyboardInterrupt):
            time.sleep(QUIET_WAIT_S)
        print_error(f"rank {os.environ['RANK']}: {err}")


def _leave_process_group(code: int) -> None:
    """cleanup_distributed(), for at most EXIT_GRACE_S: leaving a broken NCCL group (a peer died in the
    middle of a collective) can block, and an exiting rank must not hang."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    timer = threading.Timer(EXIT_GRACE_S, exit_now, (code, "could not leave the process group in time; exiting"))
    timer.daemon = True
    timer.start()
    try:
        cleanup_distributed()
    finally:
        timer.cancel()


def _tell_peers(err: BaseException) -> None:
    """Under torchrun, let the other ranks know at once (see distributed.watch_peers) that this one failed."""
    if dist.is_available() and dist.is_initialized():
        announce_failure(_failure_line(err))


def _peer_lost(err: BaseException) -> bool:
    """Whether `err` is a collective failing because another rank is gone (not a bug of this rank)."""
    return isinstance(err, dist.DistError) or any(t in str(err) for t in PEER_LOST)


def _failure_line(err: BaseException) -> str:
    """`rank R failed at step N: Type: message`, with a hint when it only saw a peer's failure."""
    step = getattr(err, "failed_step", None)
    where = f" at step {step}" if step is not None else ""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    line = f"rank {dist.get_rank()} failed{where}: {type(err).__name__}: {text}"
    if _peer_lost(err):
        line += (" (a collective failed: another rank probably failed first; see its message, or, where it left none "
                 "(killed, out of host memory), torchrun's summary of the failed ranks)")
    return line
