"""The loop pieces the training jobs share: precision, the optimizer, one optimizer step, evaluation, and the config
written beside each checkpoint (the compiled decoder: trainer/compiling.py; the entry point: trainer/job.py)."""

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.data import to_device
from trainer.distributed import DistInfo, FlatGradients, device_sum_, host_sum
from trainer.flat_adamw import FlatAdamW, flatten_parameters
from trainer.step_graphs import MicroStepGraphs

PATH_FLAGS = ("data_path", "val_data_path", "chat_template", "init_lora", "tokenizer_path")  # (run_config)
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


# ------------------------------------------------------------------------- memory and several ranks

def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in backward instead of keeping them (transformers' switch,
    renamed from gradient_checkpointing_enable in recent versions; non-reentrant, so frozen inputs work)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
    flags = vars(args)
    # Absolute paths, so that a resume from another folder (inside trainer/: ../dataset/...) is the same run
    paths = {k: str(Path(v).resolve()) for k in ("base_model", *PATH_FLAGS)
             if (v := source if k == "base_model" else flags.get(k)) and Path(v).exists()}
    return {
        "args": flags, "base_model": source, "world_size": info.world_size, "step": step,
        "total_steps": total_steps, "model_config": cfg.to_dict() if hasattr(cfg, "to_dict") else None,
        "paths": paths, **extra, "torch": torch.__version__,
    }
