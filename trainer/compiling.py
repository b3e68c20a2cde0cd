"""The compiled decoder: the compiler's settings, compiling the layers, letting the compile workers go once
nothing is left to compile, and how packed rows attend (which kernel each path can run)."""

import threading
import warnings

import torch
from torch import nn

from model.errors import UserError
from model.varlen import VARLEN_DTYPES, varlen_attn


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
