"""The loop pieces the training jobs share: precision, one optimizer step, evaluation, stops, the entry point."""

import atexit
import contextlib
import faulthandler
import math
import os
import shlex
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from model.errors import UserError, first_line, is_out_of_memory, print_error
from model.varlen import VARLEN_DTYPES, varlen_attn
from trainer.compile_cache import stopped_by_cache
from trainer.data import to_device
from trainer.distributed import (
    DistInfo,
    FlatGradients,
    announce_failure,
    cleanup_distributed,
    device_sum_,
    exit_now,
    host_sum,
    launched_by_torchrun,
)
from trainer.flat_adamw import FlatAdamW, flatten_parameters
from trainer.step_graphs import MicroStepGraphs

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ------------------------------------------------------------------------- precision and optimizer

def pick_dtype(flag: str | None, device: torch.device) -> torch.dtype:
    """--dtype, defaulting to bfloat16 on GPU and float32 on CPU (CPU autocast is slow and lossy)."""
    if flag is not None:
        return DTYPES[flag]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler | None:
    """A GradScaler for float16 only (bfloat16 has float32's range and needs none)."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float,
                   flat_grads: FlatGradients | None = None) -> torch.optim.AdamW:
    """Fused AdamW: one kernel for all tensors, and it can skip a bad step on the device (found_inf).

    With `flat_grads` the parameters move into one flat tensor beside their flat gradients and AdamW updates
    that one tensor (trainer/flat_adamw.py: the same update, a fraction of the host time per step).
    """
    hyper = {"lr": lr, "weight_decay": weight_decay, "betas": (0.9, 0.95), "fused": True}
    if flat_grads is None:
        return torch.optim.AdamW(params, **hyper)
    return FlatAdamW(params, flatten_parameters(params, flat_grads.buffer), **hyper)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in backward instead of keeping them (transformers' switch,
    renamed from gradient_checkpointing_enable in recent versions; non-reentrant, so frozen inputs work)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compiler_settings() -> None:
    """Two settings of the compile stack for the trainer's compiled layers, process-wide (docs/PERF.md, "A warm
    start from AOTAutograd's cache; pointwise kernels untimed")."""
    # AOTAutograd's cache skips a graph holding a custom autograd.Function (the fused LoRA layer) unless this is
    # set, so every warm start traced and partitioned the layer again. Its key holds the Function's traced
    # forward and backward, so an edited Function misses (tests/test_train_engine.py).
    if hasattr(torch._functorch.config, "autograd_cache_allow_custom_autograd_functions"):  # torch >= 2.7
        torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
    # Pointwise kernels take Inductor's own block sizes instead of timing every candidate on their first run:
    # a shorter cold compile at the same step time. Pointwise kernels hold no reduction, so the math is the same.
    torch._inductor.config.triton.autotune_pointwise = False


def compile_decoder(model: nn.Module, cuda_graphs: bool, per_layer: bool = False) -> str:
    """torch.compile the decoder in place (parameter names, and so the saved files, stay unchanged).

    `per_layer`: each decoder layer is compiled on its own; the layers share one code object, so Dynamo
    traces and Inductor compiles one layer and every other layer reuses that graph (seconds instead of
    minutes at 28 layers; docs/PERF.md). Otherwise the whole decoder is one graph (fewest launches).
    With `cuda_graphs` the compiled forward and backward are also recorded once as CUDA graphs and then
    replayed (mode "reduce-overhead"), so a slow or busy host no longer stalls the GPU. Replaying needs the
    same shapes every step, which packed batches of fixed rows × --max_seq_len give. Returns how it was
    compiled, for the start-up line.
    """
    compiler_settings()
    mode = "reduce-overhead" if cuda_graphs else None
    if per_layer and cuda_graphs:
        # During the warm-up steps the next layer's forward runs while an earlier layer's backward is pending,
        # so those steps run without graphs; the steady steps replay them. Not worth a line in users' logs.
        warnings.filterwarnings("ignore", message="Unable to hit fast path of CUDAGraphs")
    layers = getattr(model.model, "layers", None)
    if per_layer and layers is not None:
        if hasattr(model.model, "layers_share_graph"):  # MiniMind's decoder: one graph, not two (its forward)
            model.model.layers_share_graph = True
        for layer in layers:
            layer.compile(mode=mode)
    else:
        model.model.compile(mode=mode)
    scope = " per layer" if per_layer and layers is not None else ""
    return f"compiled{scope}{', CUDA graphs' if cuda_graphs else ''}"


class CompileWorkers:
    """Lets Inductor's compile worker processes go, in a thread, once a run has compiled all it will.

    Inductor keeps its pool (a helper process and one worker per core: 6 GB of host memory on a 16-core GPU
    machine) for the whole run, and at exit waits 0.8-1.0 s for it to stop. A run whose steps keep one shape
    compiles nothing after its warm-up steps: the pool can stop while the GPU trains. A stop still in flight is
    waited for before a new epoch, whose packing may bring a new shape (that one then compiles in this process
    while a new pool starts)."""

    def __init__(self, release_after: int | None) -> None:
        self.release_after = release_after  # steps done before the release; None: never
        self.thread: threading.Thread | None = None
        self.epoch: int | None = None

    def before_step(self, done: int, epoch: int) -> None:
        """Call before each optimizer step, with the steps done so far and the step's epoch."""
        if self.epoch is not None and epoch != self.epoch:
            self.join()
        self.epoch = epoch
        if self.release_after is not None and done >= self.release_after and self.thread is None:
            try:
                from torch._inductor.async_compile import shutdown_compile_workers
            except ImportError:  # a torch without this call keeps its pool
                self.release_after = None
                return
            self.thread = threading.Thread(target=shutdown_compile_workers, name="release-compile-workers",
                                           daemon=True)
            self.thread.start()

    def join(self) -> None:
        """Wait for a stop in flight (before anything that may compile, and before leaving)."""
        if self.thread is not None:
            self.thread.join()


FLEX_BLOCK = 128  # FlexAttention's default tile of queries and keys: rows of other lengths are padded to it

PACKED_ATTENTION_NOTES = {"varlen": "packed rows attend through Flash attention's varlen kernel",
                          "flex": "packed rows attend through FlexAttention",
                          "sdpa": "packed rows attend through SDPA with a block-diagonal mask"}


def attention_line(attention: str, flag: str) -> str:
    """The start-up line on how packed rows attend (`attention`, pick_packed_attention's answer to `--attention flag`)."""
    return f"attention: {PACKED_ATTENTION_NOTES[attention]} (--attention {flag})"


def pick_packed_attention(model: nn.Module, choice: str, packing: bool, compiled: bool, device: torch.device,
                          per_layer: bool = False, dtype: torch.dtype = torch.bfloat16,
                          whole_steps: bool = False, row_length: int = 0) -> str:
    """Set how packed rows attend (--attention) and return it: "varlen" (Flash attention's varlen kernel over
    the samples' boundaries, which the data pipeline then sends as `cu_seqlens`), "flex" (FlexAttention,
    block mask) or "sdpa" (dense block-diagonal mask); see MiniMindModel.forward and .packed_attention.

    Flex needs its block mask built once per step where no host waits on it: inside the whole compiled decoder,
    or, with each layer compiled (`per_layer`), in the decoder's eager part while a CUDA graph of the whole
    micro-step records it (`whole_steps`, trainer/step_graphs.py). "auto" takes Flex first there when packed rows
    of `row_length` tokens fill whole Flex blocks (rows of 512: 125k against 119k tokens/s with varlen on one
    H200; rows of 1024: 120k against 112k; rows of 340, padded to 384 inside Flex: 114k against 117k;
    docs/PERF.md), else varlen (packed rows on a CUDA device with torch's varlen_attn, autocast `dtype` bf16 or
    fp16, MiniMind's decoder: transformers' own classes keep their own attention), else Flex where it runs,
    else sdpa.
    """
    decoder = getattr(model, "model", None)
    minimind = hasattr(decoder, "packed_attention")
    needs = {
        "varlen": {"--packing": packing, "a CUDA device": device.type == "cuda",
                   "--dtype bfloat16 or float16": dtype in VARLEN_DTYPES,
                   "torch >= 2.9 (torch.nn.attention.varlen)": varlen_attn is not None,
                   "MiniMind's decoder (transformers' own classes keep their own attention)": minimind},
        "flex": {"--packing": packing, "--use_compile 1": compiled, "a CUDA device": device.type == "cuda",
                 "MiniMind's decoder (transformers' own classes keep their own attention)": minimind,
                 "--compile_scope model, or CUDA graphs of whole micro-steps (not --cuda_graphs 0, not --dtype "
                 "float16)": not per_layer or whole_steps},
    }
    missing = {kind: [what for what, ok in need.items() if not ok] for kind, need in needs.items()}
    if choice in needs and missing[choice]:
        raise UserError(f"--attention {choice} needs {', '.join(missing[choice])}; use --attention auto or sdpa")
    if choice == "auto":
        whole_blocks = row_length > 0 and row_length % FLEX_BLOCK == 0
        order = ("flex", "varlen") if per_layer and whole_blocks else ("varlen", "flex")
        choice = next((kind for kind in order if not missing[kind]), "sdpa")
    if hasattr(decoder, "packed_attention"):
        decoder.packed_attention = "flex" if choice == "flex" else "sdpa"
    return choice


def wrap_ddp(module: nn.Module, info: DistInfo, find_unused: bool) -> nn.Module:
    """DDP over the loss module when several ranks run (gradients of trainable parameters are averaged).

    Full training, and LoRA on an MoE base (train_lora.py says why); dense LoRA uses FlatGradients.
    gradient_as_bucket_view: a gradient becomes a view of the all-reduce bucket it travels in, so the
    reducer does not copy each one into its bucket and back out after the all-reduce.
    """
    if not info.distributed:
        return module
    ids = [info.device.index] if info.device.type == "cuda" else None
    # MoE: experts that a micro-batch never routes to get no gradient, which DDP must be told about.
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused, gradient_as_bucket_view=True)


# ------------------------------------------------------------------------- one optimizer step

def step_begin(micro_batches: list[dict], stop_requested: bool, info: DistInfo) -> tuple[int, int, bool]:
    """(supervised tokens, input tokens, stop?) summed over all ranks: one host all_reduce per step.

    The token counts are known on the CPU before any forward pass, so the loss can be normalised by
    the whole step's count up front; the stop flag rides along so that all ranks stop together.
    """
    sup = sum(b["sup_targets"].numel() for b in micro_batches)
    tokens = sum(b["n_tokens"] for b in micro_batches)
    sup, tokens, stop = host_sum([sup, tokens, float(stop_requested)], info)
    return int(sup), int(tokens), stop > 0


def forward_backward(step_module: nn.Module, batch: dict, scales: torch.Tensor | tuple[float, float],
                     device: torch.device, amp_dtype: torch.dtype,
                     scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One micro-batch's forward and backward, its gradients added to `.grad`; returns its loss, detached.

    loss = summed CE · scales[0] + MoE aux loss · scales[1]. `scales` may be a device tensor, so that a CUDA
    graph of this call (trainer/step_graphs.py) reads each step's values.
    """
    with autocast(device, amp_dtype):
        ce_sum, aux = step_module(batch["input_ids"], batch["sup_index"], batch["sup_targets"],
                                  attention_mask=batch.get("attention_mask"),
                                  position_ids=batch.get("position_ids"), cu_seqlens=batch.get("cu_seqlens"))
    loss = ce_sum * scales[0] + aux * scales[1]
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return loss.detach()


def train_step(step_module: nn.Module, micro_batches: list[dict], n_supervised: int, info: DistInfo,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, params: list[nn.Parameter],
               lr: float, grad_clip: float, amp_dtype: torch.dtype, flat_grads: FlatGradients | None = None,
               graphs: MicroStepGraphs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over the step's micro-batches, then one (skippable) optimizer update.

    Each micro-batch's summed token loss is divided by the step's supervised-token count over all
    micro-batches and ranks, and multiplied by world_size because the ranks' gradients are averaged: the
    result is the gradient of one big batch. Returns this rank's share of the loss and the gradient
    norm, both still on the device (no host sync here). `graphs`: the micro-batches run through their
    CUDA graphs (GPU runs, compiled or not; trainer/step_graphs.py).

    `flat_grads`: the gradients live in one buffer across steps (zeroed, never freed). Several ranks
    average their gradients either there, after the last micro-batch, or in DDP's backward (`step_module`
    is DDP). CUDA graphs need such buffers: a replayed backward writes its gradients to the same memory
    every time; without own buffers, `.grad` would be that memory, and the next micro-batch's replay would
    overwrite the gradient it is meant to add to.
    """
    is_ddp = isinstance(step_module, DDP)
    if info.distributed and not is_ddp and flat_grads is None:
        raise ValueError("several ranks without DDP average their gradients with flat_grads, and none was given")
    for group in optimizer.param_groups:
        group["lr"] = lr
    scale = info.world_size / max(n_supervised, 1)
    n_micro = len(micro_batches)
    total = torch.zeros((), device=info.device)
    for i, cpu_batch in enumerate(micro_batches):
        if graphs is not None:
            total += graphs(cpu_batch, (scale, 1 / n_micro))
            continue
        # DDP all-reduces in the last micro-batch's backward only (no_sync on the others).
        sync = contextlib.nullcontext() if i == n_micro - 1 or not is_ddp else step_module.no_sync()
        with sync:
            total += forward_backward(step_module, to_device(cpu_batch, info.device), (scale, 1 / n_micro),
                                      info.device, amp_dtype, scaler)
    if flat_grads is not None:
        flat_grads.average_(info)  # one all-reduce of all the gradients, where DDP would in the last backward
    if scaler is not None:
        scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = (flat_grads.clip_(max_norm) if flat_grads is not None else
                 torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
    if scaler is not None:
        scaler.step(optimizer)  # skips on inf/nan gradients and lowers the scale (normal in float16)
        scaler.update()
    else:
        # Fused AdamW reads `found_inf`: a nan/inf step leaves weights and moments untouched, decided
        # on the device, so the host never waits for the GPU here.
        optimizer.found_inf = (~torch.isfinite(grad_norm)).float()
        optimizer.step()
        del optimizer.found_inf
    if flat_grads is not None:
        flat_grads.zero_()
    else:
        optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


# ------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(loss_module: nn.Module, batches: Iterable[dict], info: DistInfo, amp_dtype: torch.dtype) -> float:
    """Token-weighted mean loss over the validation set (all ranks' shares together)."""
    was_training = loss_module.training
    loss_module.eval()
    sums = torch.zeros(2, device=info.device, dtype=torch.float64)
    for cpu_batch in batches:
        batch = to_device(cpu_batch, info.device)
        # Eager even under --use_compile: validation batches come in many shapes (and eval mode is another
        # guard), each of which would compile (and record a CUDA graph) once, for a few forward passes.
        with autocast(info.device, amp_dtype), torch.compiler.set_stance("force_eager"):
            ce_sum, _ = loss_module(batch["input_ids"], batch["sup_index"], batch["sup_targets"],
                                    attention_mask=batch.get("attention_mask"),
                                    position_ids=batch.get("position_ids"), cu_seqlens=batch.get("cu_seqlens"))
        sums[0] += ce_sum.double()
        sums[1] += batch["sup_targets"].numel()
    loss_module.train(was_training)
    total, count = device_sum_(sums, info).tolist()
    return total / max(count, 1)


# ------------------------------------------------------------------------- stopping and the entry point

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

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True
        # The next signal takes the default action (the process ends), even while the main thread is stuck
        # in C++ (a collective, a kernel), where a Python handler would not run until it returned.
        for s in self.signals:
            signal.signal(s, signal.SIG_DFL)
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving a resume checkpoint "
              "(a second Ctrl-C or kill aborts without saving)", flush=True)
        if launched_by_torchrun():
            rank = os.environ.get("RANK")
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
    launcher = ["python"] if not info.distributed else ["torchrun", f"--nproc_per_node={info.world_size}"]
    return shlex.join([*launcher, sys.argv[0], *out])


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
        print_error(err)
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
        if "TORCHELASTIC_RUN_ID" in os.environ:
            # Leaving must not hang a rank (seen once, on torch 2.6 under load, blocked in native code where
            # no Python timer runs): faulthandler's own thread dumps the stacks and exits past the limit.
            faulthandler.dump_traceback_later(2 * EXIT_GRACE_S, exit=True)
        _leave_process_group(code)
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if not teardown or "TORCHELASTIC_RUN_ID" in os.environ:
        # Under torchrun, interpreter shutdown could also abort a rank that had finished cleanly (SIGABRT,
        # "terminate called without an active exception": C++ threads torn down with the interpreter), and
        # torchrun then fails the job. Run the exit handlers, flush, and leave without that teardown.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


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
        line += " (a collective failed: another rank probably failed first; see its message)"
    return line


# ------------------------------------------------------------------------- what a checkpoint says about itself

def autocast_note(amp_dtype: torch.dtype, base_dtype: torch.dtype) -> str:
    """One line on precision for the start-up banner."""
    if amp_dtype == torch.float32:
        return "float32"
    return f"autocast {str(amp_dtype).removeprefix('torch.')}, base weights {str(base_dtype).removeprefix('torch.')}"


def run_config(args: object, info: DistInfo, source: str, model: nn.Module, step: int, total_steps: int,
               **extra: object) -> dict:
    """The run's full config for the JSON beside every checkpoint: flags, model config, progress, versions."""
    cfg = getattr(model, "config", None)
    return {
        "args": vars(args), "base_model": source, "world_size": info.world_size, "step": step,
        "total_steps": total_steps, "model_config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
        **extra, "torch": torch.__version__,
    }
