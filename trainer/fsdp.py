"""--fsdp: the frozen base sharded over the ranks with FSDP2 (`fully_shard`), the LoRA factors kept whole.

Under DDP every GPU holds the whole frozen base. With --fsdp each decoder layer, and the rest of the
model (embeddings, final norm, head: the root group), is one FSDP2 group: its frozen weights live as
1/world_size shards (DTensors) and are all-gathered just for that group's forward and backward. So a
base too large for one GPU still trains, one layer unsharded at a time.

The LoRA factors are left out of FSDP (`ignored_params`). They are small (rank 16 on every linear layer
of an 8B base: 44M parameters, 0.6%), so every rank keeps them whole: the optimizer, the LoRA files and
the resume file are exactly the ones DDP and a single process write (a run may switch between them on
resume), and saving needs no gather. Their gradients are averaged over the ranks with one all-reduce per
optimizer step (`FlatGradients`), as without --fsdp.
"""

import inspect

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from model.model_lora import lora_parameters
from trainer.distributed import DistInfo, DistributedError, broadcast_from_rank0_

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6; shard_frozen_base says what to do
    fully_shard = None


def fsdp_supported() -> bool:
    """Whether this torch has what --fsdp uses: FSDP2's fully_shard with ignored_params (torch >= 2.7)."""
    return fully_shard is not None and "ignored_params" in inspect.signature(fully_shard).parameters


def shard_frozen_base(loss_module: nn.Module, info: DistInfo) -> nn.Module:
    """Shard `loss_module.model`'s frozen weights over the ranks (FSDP2), LoRA factors replicated on each.

    Returns the module to call for a training step (the loss module itself, now the FSDP root: a step
    calls the loss module, not model.forward, so the root's hooks must sit there). Each rank's shards
    go to its device; a model built on the meta device stays there (materialise it with to_empty).
    """
    model = loss_module.model
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not info.distributed:
        raise DistributedError("--fsdp shards the base over several processes; start it with torchrun, e.g.\n"
                               "  torchrun --nproc_per_node 2 trainer/train_lora.py --fsdp <your flags>")
    if not isinstance(layers, nn.ModuleList):
        raise DistributedError(f"--fsdp shards the decoder layers model.model.layers, which "
                               f"{type(model).__name__} does not have")
    if not fsdp_supported():
        raise DistributedError(f"--fsdp needs torch >= 2.7 (FSDP2 with ignored_params); this is {torch.__version__}")
    lora = lora_parameters(model)  # a list: every rank must broadcast in the same order
    with torch.no_grad():
        for p in lora:
            if not p.is_meta:
                p.data = p.data.to(info.device)
    # Ranks seed differently (dropout), so their fresh LoRA inits differ: take rank 0's, as DDP does.
    broadcast_from_rank0_([p for p in lora if not p.is_meta], info)
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=set(lora))
    # The root group: the rest (embeddings, final norm, head). It is the loss module, which a step calls.
    fully_shard(loss_module, mesh=mesh, ignored_params=set(lora))
    return loss_module


def parameters_held(module: nn.Module) -> int:
    """Parameters this rank actually stores: its shard of each sharded one, all of the others."""
    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in module.parameters())
