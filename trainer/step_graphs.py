"""CUDA graphs of whole micro-steps: each micro-batch shape's forward and backward recorded once, then replayed.

Without torch.compile a GPU step is bound by its host: Python, autograd and thousands of kernel launches per
step, while the GPU idles (docs/PERF.md, "The padded eager path"). Compiled per layer, the host still launches
each layer's kernels, the embedding, the loss and the optimizer. A CUDA graph replays all of a micro-batch's
kernels, compiled or not, in one launch. A graph holds fixed shapes and addresses, so there is one per
micro-batch shape: padded widths come in buckets (trainer/data.py) and their supervised positions are padded
here to a multiple of SUPERVISED_MULTIPLE rows; packed rows have one width, and their supervised positions are
padded to the run's `sup_slots` (the most a micro-batch of the first epoch has; index 0, target ignored: the
head's GEMM runs on a few more rows, the loss does not change), so a packed run has one shape. A shape's first
micro-batch runs eagerly, which also warms what a capture must not do for the first time (compiling, cuBLAS and
attention kernel choice); its second is recorded and replayed, and so is every later one. A shape that differs
from one already run only in its supervised rows is recorded at once: only the loss's head GEMM and its
cross-entropy (compiled for any row count) meet the new count, and neither needs a warm-up.

All graphs share one memory pool, so they hold one step's activations, not one per shape. That is safe
because nothing a graph allocated outlives its replay: the gradients add into FlatGradients' buffer (allocated
before any capture) and the loss is copied out at once. The eager first runs allocate outside that pool: a
capture first returns their cached memory to the driver, but the eager first run of a later width holds its
own beside the pool. Padded runs, with their many widths, may so reserve about twice a step's activations
(hence --cuda_graphs 0 near the limit); a packed run, one width, does not.
"""

from collections.abc import Callable

import torch

from model.errors import UserError
from trainer.data import to_device
from trainer.loss import IGNORE_INDEX, pad_rows_to

SUPERVISED_MULTIPLE = 1024  # supervised rows padded to this: few shapes; at 0.6B at most ~1 ms more head work
MAX_GRAPHS = 64  # shapes past this many run eagerly (each graph's host-side record costs memory and time)

SUPERVISION = ("sup_index", "sup_targets")  # the tensors padded to supervised_rows(batch) rows
MicroStep = Callable[[dict, torch.Tensor], torch.Tensor]  # (device batch, [loss scale, aux scale]) -> detached loss


def supervised_rows(batch: dict) -> int:
    """The supervised rows a graph of `batch` holds. Packed rows (no attention_mask): the run's `sup_slots`
    (trainer/data.supervised_slots), or one per position for a micro-batch with more (or without sup_slots);
    padded batches: their count rounded up to SUPERVISED_MULTIPLE."""
    n = batch["sup_index"].numel()
    if "attention_mask" in batch:
        return n + -n % SUPERVISED_MULTIPLE
    slots = batch.get("sup_slots") or 0
    return slots if n <= slots else batch["input_ids"].numel()


def supervised_padded(batch: dict) -> dict:
    """`batch` with sup_index / sup_targets padded to supervised_rows(batch) rows."""
    index, targets = pad_rows_to(batch["sup_index"], batch["sup_targets"], supervised_rows(batch))
    return {**batch, "sup_index": index, "sup_targets": targets}


def shape_key(batch: dict) -> tuple:
    """What a graph is recorded for: every tensor's name, shape and dtype (supervision padded)."""
    n_sup = supervised_rows(batch)
    return tuple((name, n_sup if name in SUPERVISION else tuple(t.shape), t.dtype)
                 for name, t in sorted(batch.items()) if torch.is_tensor(t))


def warm_up_key(key: tuple) -> tuple:
    """The part of a shape_key that an eager run must have met before a capture: all but the supervision."""
    return tuple(entry for entry in key if entry[0] not in SUPERVISION)


class MicroStepGraphs:
    """Runs `micro_step` on each micro-batch: eagerly the first time a shape comes, then through its CUDA graph.

    `micro_step` must not sync with the host (no `.item()`, no data-dependent shapes) and must leave its
    gradients in buffers that live across steps. If a capture fails all the same, the run goes on eagerly and
    `note` says why.
    """

    def __init__(self, micro_step: MicroStep, device: torch.device) -> None:
        self.micro_step = micro_step
        self.device = device
        self.seen: set[tuple] = set()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        self.failure = ""

    def __call__(self, cpu_batch: dict, scales: tuple[float, float]) -> torch.Tensor:
        """This micro-batch's forward and backward (gradients added); returns its loss share (a new tensor)."""
        key = shape_key(cpu_batch)
        if key in self.graphs:
            graph, inputs, static_scales, loss = self.graphs[key]
            _fill(inputs, cpu_batch)
            static_scales.copy_(torch.tensor(scales), non_blocking=True)
            graph.replay()
            return loss.clone()  # the next replay, of any graph in the pool, may reuse this memory
        batch = supervised_padded(to_device(cpu_batch, self.device))
        scales_t = torch.tensor(scales, device=self.device)
        warm_up = warm_up_key(key)
        if warm_up not in self.seen or self.failure or len(self.graphs) >= MAX_GRAPHS:
            self.seen.add(warm_up)
            return self.micro_step(batch, scales_t)
        return self._record(key, batch, scales_t)

    def _record(self, key: tuple, batch: dict, scales: torch.Tensor) -> torch.Tensor:
        """Capture this shape's graph (inputs: `batch`'s tensors, copied in before each replay) and replay it."""
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the DataLoader's pin-memory thread may allocate pinned memory meanwhile.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                loss = self.micro_step(batch, scales)
        except RuntimeError as err:  # e.g. an operator that syncs with the host; nothing ran, so no gradient moved
            self.failure = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            return self.micro_step(batch, scales)
        self.pool = graph.pool()
        inputs = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        self.graphs[key] = (graph, inputs, scales, loss)
        graph.replay()
        return loss.clone()

    @property
    def note(self) -> str:
        """One line on what was recorded (for the end of the run)."""
        if self.failure:
            return f"CUDA graphs stopped after {len(self.graphs)} shape(s): {self.failure}"
        return f"CUDA graphs: {len(self.graphs)} micro-batch shape(s) recorded and replayed"


def _fill(inputs: dict, cpu_batch: dict) -> None:
    """Copy a CPU micro-batch into a graph's input tensors; supervision rows past the batch's own are padding."""
    for name, static in inputs.items():
        value = cpu_batch[name]
        if name in SUPERVISION:
            n = value.numel()
            static[:n].copy_(value, non_blocking=True)
            static[n:].fill_(0 if name == "sup_index" else IGNORE_INDEX)
        else:
            static.copy_(value, non_blocking=True)


def cuda_graph_needs(device: torch.device, compiled: bool, packing: bool, fsdp: bool, moe: bool,
                     checkpointing: bool, minimind: bool, amp_dtype: torch.dtype) -> dict[str, bool]:
    """What CUDA graphs need in this run, each with whether it holds (for --cuda_graphs and its error).

    Compiled, they need one shape per step (packed rows): the graphs of whole micro-steps where those apply
    (whole_step_needs), else the compiled decoder's own. Uncompiled, only whole micro-steps.
    """
    needs = {"a CUDA device": device.type == "cuda", "no --fsdp": not fsdp,
             "a dense model (MoE routing differs per batch)": not moe,
             "no --gradient_checkpointing": not checkpointing}
    if compiled:
        needs["--packing (one shape per step)"] = packing
    else:
        needs.update(whole_step_needs(minimind, amp_dtype))
    return needs


def whole_step_needs(minimind: bool, amp_dtype: torch.dtype) -> dict[str, bool]:
    """What one graph of a whole micro-step needs beyond cuda_graph_needs: MiniMind's decoder (transformers'
    own classes may sync with the host) and no float16 (the GradScaler's scale changes on the host's schedule)."""
    return {"MiniMind's decoder (a MiniMind model, or a directory on its decoder)": minimind,
            "--dtype bfloat16 or float32": amp_dtype != torch.float16}


def pick_cuda_graphs(flag: bool | None, needs: dict[str, bool]) -> bool:
    """--cuda_graphs: unset = wherever `needs` all hold; 0 = never; 1 = always (a UserError if one fails)."""
    missing = [what for what, ok in needs.items() if not ok]
    if flag and missing:
        raise UserError(f"--cuda_graphs 1 needs {', '.join(missing)}; leave --cuda_graphs unset or set it to 0")
    return flag is not False and not missing


def graphs_note(graphs: MicroStepGraphs | None, compiled: bool) -> str:
    """The start-up line's words for micro-steps that replay CUDA graphs (none otherwise)."""
    if graphs is None:
        return ""
    return ", CUDA graphs per micro-batch shape" if compiled else "; eager, CUDA graphs per micro-batch shape"
