"""One process per GPU under torchrun (or a single process): device, ranks and the few collectives we use."""

import atexit
import contextlib
import hashlib
import math
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from model.errors import UserError, print_error


class DistributedError(UserError):
    """A multi-process setup that cannot work (e.g. --ddp without torchrun)."""


@dataclass
class DistInfo:
    """Where this process runs and how many others run with it."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # A gloo group for small host-side numbers (token counts, stop flags): reducing them on the CPU
    # never waits for the GPU, so the GPU queue stays full.
    host_group: object | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 prints, logs and saves."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1


def launched_as_a_rank() -> bool:
    """Whether a launcher started this process as one rank of a job: torchrun (and torch.distributed.launch) export
    these for every worker, and a slurm script exports them for srun's (see torchrun_agent_watches)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def torchrun_agent_watches() -> bool:
    """Whether torchrun's agent started this process (it sets TORCHELASTIC_RUN_ID) and so stops the other ranks when
    one exits with an error; under another launcher (a slurm script that exports RANK, WORLD_SIZE and LOCAL_RANK from
    srun's SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID) no one stops them."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def pick_device(flag: str | None, local_rank: int = -1) -> torch.device:
    """`--device` as given (default: cuda if there is one, else cpu), refused in one line when this machine has no
    such device; under torchrun a CUDA device is replaced by this worker's own GPU."""
    if flag is None:
        flag = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except (RuntimeError, ValueError, TypeError):
        raise DistributedError(f"--device {flag}: not a device name; use cuda, cuda:N, cpu or mps") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DistributedError(f"--device {flag}: no MPS device here (Apple silicon has one); use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError(f"--device {flag}: no CUDA GPU is visible here; use --device cpu")
        device = torch.device("cuda", local_rank if local_rank >= 0 else (device.index or 0))
        torch.cuda.set_device(device)
    return device


def setup_distributed(device_flag: str | None, ddp_flag: bool, timeout_s: float = 600) -> DistInfo:
    """Join the process group if torchrun started us (NCCL on CUDA, gloo on CPU), else run alone.

    A collective that some rank never joins (it died, or hangs) fails after `timeout_s` instead of
    blocking its peers forever.
    """
    if not launched_as_a_rank():
        if ddp_flag:
            raise DistributedError(
                "--ddp needs several processes started by torchrun, e.g.\n"
                "  torchrun --nproc_per_node 2 trainer/train_lora.py <your flags>\n"
                "(for one GPU, drop --ddp)")
        return DistInfo(rank=0, world_size=1, local_rank=0, device=pick_device(device_flag, -1))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:  # torchrun sets them; a launcher script that exports RANK and the rest itself (srun's) may not
        raise DistributedError(f"RANK, WORLD_SIZE and LOCAL_RANK are set but {' and '.join(missing)} not: export "
                               "rank 0's host as MASTER_ADDR and a free port as MASTER_PORT too, or start with torchrun")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = pick_device(device_flag, local_rank)
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        # 1 = TearDown: on an error or a timeout NCCL's watchdog aborts the communicators and ends the process.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
        host_group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
        host_group = dist.group.WORLD
    watch_peers(rank)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, host_group=host_group)


def cleanup_distributed() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def same_on_all_ranks(value: object, what: str, hint: str, info: DistInfo) -> None:
    """Raise DistributedError (on every rank) unless all ranks hold the same `value`."""
    if not info.distributed:
        return
    values = gather_objects(value, info)
    if len(set(values)) > 1:
        per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise DistributedError(f"the ranks disagree on {what} ({per_rank}); {hint}")


# ------------------------------------------------------------------------- a rank fails: everyone hears it

PEER_FAILURE_GRACE_S = 5  # time a rank gets to fail on its own (with its own message) after a peer failed


def _job_store() -> dist.Store | None:
    """A client of the key-value store torchrun keeps for this job (None when there is none to reach)."""
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=10))
    except (KeyError, ValueError, RuntimeError):
        return None
    # Keyed by run and restart, so that a restarted job does not see its previous attempt's failure.
    attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return dist.PrefixStore(f"minilora/{attempt}/", store)


def announce_failure(line: str) -> None:
    """Tell the other ranks (their watch_peers thread) that this rank failed; the first failure is kept."""
    store = _job_store()
    if store is not None:
        with contextlib.suppress(RuntimeError):
            store.compare_set("failure", "", line)


def say_once_per_machine(message: str, rank: int) -> None:
    """print_error(`rank R: message`), unless another rank of this machine has printed the same message: each
    machine's torchrun shows its own ranks' output, so each says an error all of its ranks hit once. Only the
    job store is used (no collective, which a failed peer could leave hanging); without it, it prints."""
    store = _job_store()
    key = f"error/{os.environ.get('GROUP_RANK', '0')}/{hashlib.sha1(message.encode()).hexdigest()}"
    try:
        if store is not None and store.add(key, 1) > 1:
            # Exit only once the first rank has printed it: torchrun kills the remaining ranks when one exits.
            store.wait([f"{key}/said"], timedelta(seconds=10))
            return
    except RuntimeError:  # the store is gone or the first rank never said it: better twice than never
        pass
    print_error(f"rank {rank}: {message}")
    if store is not None:
        with contextlib.suppress(RuntimeError):
            store.set(f"{key}/said", "1")


def watch_peers(rank: int) -> None:
    """End this process soon after another rank announces a failure, whatever this rank is doing.

    A rank waiting for a dead peer inside an NCCL collective waits until the collective times out, and
    while its host thread is blocked on the GPU its Python signal handlers do not run. This thread polls
    torchrun's store instead (no collective), so such a rank ends within seconds, saying why.
    """

    stop = threading.Event()

    def watch() -> None:
        store = _job_store()
        while store is not None and not stop.wait(1):
            try:
                if not store.check(["failure"]):
                    continue
                line = store.get("failure").decode()
            except RuntimeError:  # the launcher, and its store, are gone: nothing left to watch
                return
            if line.startswith(f"rank {rank} "):
                return  # this rank's own failure: its main thread reports it and exits
            if not stop.wait(PEER_FAILURE_GRACE_S):
                exit_now(1, f"rank {rank}: stopping because {line}")
            return

    thread = threading.Thread(target=watch, name="minilora-watch-peers", daemon=True)
    thread.start()

    def stop_watching() -> None:
        # A daemon thread still inside a store call when the interpreter finalises is killed while it takes
        # the GIL back, inside C++ that may not unwind: "terminate called without an active exception" and
        # SIGABRT after a clean run (seen about 1 in 10 exits of a 2-rank gloo job). Stop it first.
        stop.set()
        thread.join(timeout=5)

    atexit.register(stop_watching)


def exit_now(code: int, message: str) -> None:
    """End the process at once from any thread (no cleanup that could block), saying why on stderr."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def host_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum small host-side numbers over all ranks (one gloo all_reduce; no GPU sync)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=info.host_group)
    return t.tolist()


def device_sum_(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """In-place sum of a device tensor over all ranks (no-op alone)."""
    if info.distributed:
        dist.all_reduce(tensor)
    return tensor


def broadcast_from_rank0_(tensors: Iterable[torch.Tensor], info: DistInfo) -> None:
    """Overwrite each tensor, in place, with rank 0's copy (every rank must pass them in the same order)."""
    if not info.distributed:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)


class FlatGradients:
    """The gradients of `params` as views of one flat buffer, averaged over the ranks by one all-reduce.

    How several processes keep one LoRA without DDP (dense models, and --fsdp). DDP's machinery, a hook
    per parameter and ~25 MB buckets all-reduced while the backward still runs, is built for big
    gradients. LoRA gradients are small (40 MB in all at the Qwen3-0.6B shape, rank 16), one all-reduce
    of all of them after the backward takes 0.2 ms on NVLink (scripts/bench/allreduce.py), and at that
    shape 2 H200s ran exactly as fast as under DDP (docs/PERF.md, row 16). Over a slow link between
    machines this all-reduce is not hidden behind the backward, as DDP's buckets would be.

    The backward adds into the views, so `.grad` stays a view of `buffer` for the whole run, provided
    nothing sets it to None: zero the gradients with `zero_()`, not the optimizer's `zero_grad`. CUDA
    graphs need such buffers even in one process (see train_step). One buffer also makes the rest of the
    step cheap on the host: clipping and zeroing are a kernel or two, not a Python loop over hundreds of
    LoRA tensors (row 17: 2.7 → 0.03 ms of host time per step for 392 tensors).
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        first = params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in params):
            raise ValueError("FlatGradients needs parameters of one dtype on one device")
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
        offset = 0
        for p in params:
            p.grad = self.buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def average_(self, info: DistInfo) -> None:
        """Replace every gradient by its mean over the ranks (no-op in a single process)."""
        if info.distributed:
            dist.all_reduce(self.buffer)
            self.buffer.div_(info.world_size)

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradients down to `max_norm` if their norm is above it (torch's clip_grad_norm_ rule);
        returns the norm before clipping, on the device."""
        norm = torch.linalg.vector_norm(self.buffer)
        if math.isfinite(max_norm):
            self.buffer.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return norm

    def zero_(self) -> None:
        """Zero every gradient, in place."""
        self.buffer.zero_()


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's `obj`, in rank order (used for per-rank RNG states when saving)."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.host_group)
    return out
