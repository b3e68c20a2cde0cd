"""A step that runs out of memory: the run keeps its last finished step and says which flags need less.

The error comes from the allocator before the step's optimizer update (AdamW's update allocates nothing),
so the weights are still those of the last finished step: a single-process run saves them, then exits 2
with the command that continues from there in micro-batches half as big.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from model.errors import UserError, is_out_of_memory
from trainer.checkpoint import capture_rng
from trainer.distributed import DistInfo
from trainer.job import rerun_command

GIB = 2**30


class OutOfMemory(UserError):
    """A step needed more memory than the device had."""


class MemoryWatch:
    """Wraps each step (`watch`): an allocation failure inside ends the loop without a traceback.

    One process: the failure is recorded (`failed`) for the loop to break, save the last finished step and
    raise `error(...)`. Several: it is raised at once as OutOfMemory, since the peers wait in a collective.
    `keep_rng`: remember the RNG state at each step's start (LoRA dropout draws from it), so the saved
    step continues bit for bit. `step_graphs`: padded micro-batches replay CUDA graphs, one per shape
    (trainer/step_graphs.py).
    """

    def __init__(self, info: DistInfo, args: argparse.Namespace, keep_rng: bool, step_graphs: bool = False) -> None:
        self.info, self.args, self.keep_rng, self.step_graphs = info, args, keep_rng, step_graphs
        self.failed: str | None = None  # what ran out, for the message
        self.rng: dict | None = None

    @contextlib.contextmanager
    def watch(self, step: int, micro_batches: list[dict] | None = None) -> Iterator[None]:
        """Run step `step` (1-based) on `micro_batches` (None: the validation after it); record (or raise) an
        allocation failure inside."""
        self.rng = capture_rng() if self.keep_rng else None
        try:
            yield
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            if micro_batches is None:
                where = f"in the validation after step {step}"
            else:
                rows, width = micro_batches[0]["input_ids"].shape
                where = f"at step {step}, in a micro-batch of {rows} × {width} tokens"
            self.failed = f"out of memory on {self.info.device} {where}{_held(self.info.device)}"
            if self.info.distributed:
                raise self.error(step if micro_batches is None else step - 1, saved=None) from None

    def error(self, finished: int, saved: Path | None) -> OutOfMemory:
        """The error to raise: what ran out, what is kept (`saved`: the file that now holds step `finished`,
        the last finished one), the command that continues in less memory, and what else needs less."""
        changes, others = lighter_flags(self.args, self.step_graphs)
        if finished == 0:
            kept = "No step had finished, so nothing is lost."
        elif saved is not None:
            kept = f"Step {finished} is saved in {saved}: nothing is lost."
        else:
            kept = "The last checkpoint is kept as it was."
        lines = [f"{self.failed}. {kept}"]
        if changes:
            how = ("micro-batches half as big, twice as many of them (the same samples per optimizer step)"
                   if "batch_size" in changes else "--gradient_checkpointing (activations recomputed in backward)")
            command = rerun_command(self.info, {**changes, "from_resume": "1"} if finished else changes)
            lines.append(f"Continue with {how}:\n  {command}")
        lines.append("Other ways to need less memory: " + "; ".join(others) + ".")
        if self.info.device.type == "cuda":
            lines.append("Or free what other processes hold on the GPU (nvidia-smi lists them).")
        return OutOfMemory("\n".join(lines))


def lighter_flags(args: argparse.Namespace, step_graphs: bool = False) -> tuple[dict[str, str], list[str]]:
    """Flags that need less memory per micro-batch and that a resumed run may take (the same samples per
    optimizer step), and the other options, as text. `step_graphs`: padded micro-batches replay CUDA graphs."""
    changes: dict[str, str] = {}
    # The graphs' pool sits beside the eager first run of each new width: about twice a step's (docs/PERF.md).
    others = ["--cuda_graphs 0 (slower steps, about half the memory reserved)"] if step_graphs else []
    halves = args.batch_size % 2 == 0 and not getattr(args, "packed_rows", None)  # --packed_rows must stay
    if halves:
        changes = {"batch_size": str(args.batch_size // 2), "accumulation_steps": str(args.accumulation_steps * 2)}
    if not args.gradient_checkpointing:
        if changes:
            others.append("--gradient_checkpointing")
        else:
            changes = {"gradient_checkpointing": "1"}
    new_run = ["a lower --max_seq_len"] + (["--load_in_4bit (QLoRA)"] if hasattr(args, "load_in_4bit") and
                                            not args.load_in_4bit else [])
    others.append("for a new run, " + " or ".join(new_run))
    return changes, others


def _held(device: torch.device) -> str:
    """`; this run held up to X GiB of the GPU's Y GiB` (and what other processes hold, when that is much), on
    CUDA."""
    if device.type != "cuda":
        return ""
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)
    text = f"; this run held up to {torch.cuda.max_memory_reserved(device) / GIB:.1f} GiB of the GPU's {total / GIB:.1f} GiB"
    return text + (f", {others / GIB:.1f} GiB held by other processes and CUDA itself" if others > GIB else "")
