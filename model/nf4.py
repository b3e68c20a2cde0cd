"""NF4, the QLoRA paper's 4-bit NormalFloat storage for a frozen base (Dettmers et al. 2023), in plain PyTorch.

Each block of 64 weights stores 4-bit indices into 16 levels (bitsandbytes' NF4 code book: quantiles of a
normal distribution scaled to [-1, 1], with an exact 0) and the block's absmax. Double quantization: the
absmax scales are stored as int8 around their mean, with one fp32 factor per 256 of them (as torchao's
NF4Tensor; bitsandbytes codes them with its dynamic 8-bit float map instead), 4.127 bits per weight in all.

The weight is dequantized on the fly inside the layer's matmul, in forward and again in backward, so only
the 4-bit codes are kept: a dense weight exists one layer at a time. All of it is ordinary tensor code, so
torch.compile traces and fuses it (no custom kernel, no extra package).
"""

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 64  # weights per absmax (QLoRA, bitsandbytes)
SCALE_BLOCK = 256  # absmax values per fp32 factor in the double quantization (QLoRA)

# bitsandbytes' NF4 code book (functional.py, get_4bit_type("nf4")); index 7 is the exact zero.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def _pad_to(t: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
    return F.pad(t, (0, (-t.numel()) % multiple), value=value)


def byte_table() -> torch.Tensor:
    """[256, 2]: the two levels one byte codes (first weight in the high nibble, as bitsandbytes packs them)."""
    return torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)


def dequantize_nf4(codes: torch.Tensor, scale_codes: torch.Tensor, scale_factors: torch.Tensor,
                   scale_offset: torch.Tensor, table: torch.Tensor, shape: tuple[int, ...],
                   dtype: torch.dtype) -> torch.Tensor:
    """The dense weight from its NF4 parts (`table` = byte_table() on the weight's device), computed in fp32 and
    rounded once to `dtype`."""
    values = table[codes.to(torch.int32)].view(-1, BLOCK)  # one gather per byte
    absmax = (scale_codes.view(-1, SCALE_BLOCK).float() * (scale_factors[:, None] / 127) + scale_offset).view(-1)
    numel = shape[0] * shape[1]
    return (values * absmax[:values.shape[0], None]).view(-1)[:numel].view(shape).to(dtype)


class NF4Weight(nn.Module):
    """A frozen [out, in] weight held in NF4 with double-quantized scales (buffers, so .to() and broadcasts move it)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype  # the precision it came in (the dense weight's dtype in reports)
        blocks = _pad_to(weight.detach().float().reshape(-1), BLOCK).view(-1, BLOCK)
        absmax = blocks.abs().amax(dim=1)
        normalized = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        code = NF4_CODE.to(weight.device)
        index = torch.bucketize(normalized, (code[1:] + code[:-1]) / 2).to(torch.uint8).view(-1, 2)  # nearest level
        self.register_buffer("codes", (index[:, 0] << 4) | index[:, 1])
        # Double quantization: absmax - mean, as int8 per group of 256 with the group's max |.| / 127 as step.
        offset = absmax.mean()
        centered = _pad_to(absmax - offset, SCALE_BLOCK).view(-1, SCALE_BLOCK)
        factors = centered.abs().amax(dim=1)
        steps = factors.clamp_min(torch.finfo(torch.float32).tiny)[:, None] / 127
        self.register_buffer("scale_codes", torch.round(centered / steps).to(torch.int8).view(-1))
        self.register_buffer("scale_factors", factors)
        self.register_buffer("scale_offset", offset.reshape(1))
        # A buffer, so it lives on the weight's device: no host-to-device copy per call (CUDA graphs need that).
        self.register_buffer("table", byte_table().to(weight.device), persistent=False)

    def parts(self) -> tuple[torch.Tensor, ...]:
        """The stored tensors, in dequantize_nf4's order."""
        return self.codes, self.scale_codes, self.scale_factors, self.scale_offset, self.table

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense [out, in] weight in `dtype`."""
        return dequantize_nf4(*self.parts(), self.shape, dtype)

    def nbytes(self) -> int:
        """Bytes of the codes and scales: 4.127 bits per weight (the 2 KiB level table aside)."""
        return sum(t.numel() * t.element_size() for t in self.parts()[:4])

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, block={BLOCK}, scale_block={SCALE_BLOCK}"


class _NF4Linear(torch.autograd.Function):
    """y = x·Wᵀ + b with W dequantized in forward and again in backward: only the 4-bit codes are saved."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, bias: torch.Tensor | None,
                shape: tuple[int, ...], *parts: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*parts)
        ctx.shape = shape
        return F.linear(x, dequantize_nf4(*parts, shape, x.dtype), bias)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor) -> tuple:
        parts = ctx.saved_tensors  # read once: activation checkpointing allows a single unpack
        weight = dequantize_nf4(*parts, ctx.shape, grad_y.dtype)
        return (grad_y @ weight, None, None, *([None] * len(parts)))  # W and b are frozen


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear with an NF4 weight, in the dtype autocast would use (else x's)."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        return _NF4Linear.apply(x.to(dtype), None if bias is None else bias.to(dtype), weight.shape, *weight.parts())


class NF4Linear(nn.Module):
    """A frozen nn.Linear held in NF4 (the base's layers that carry no LoRA)."""

    def __init__(self, linear: nn.Linear, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_nf4 = NF4Weight(linear.weight.detach().to(device))
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ + b."""
        return nf4_linear(x, self.weight_nf4, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_base(model: nn.Module, device: torch.device | str | None = None) -> tuple[int, int]:
    """Hold the frozen weight of every LoRA layer, and of every other linear layer but the output head and MoE
    routers, in NF4 on `device`; LoRA tensors keep their precision. Returns (layers, bytes now held in NF4).

    Call it after apply_lora / load_lora. Weights tied to another module (an lm_head tied to the embeddings)
    stay as they are.
    """
    from model.model_lora import LoRALinear, find_targets

    seen, tied = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    count, held = 0, 0
    for module in list(model.modules()):
        if isinstance(module, LoRALinear) and module.weight_nf4 is None and id(module.weight) not in tied:
            module.weight_nf4 = NF4Weight(module.weight.detach().to(device))
            module.weight = None
            if module.use_dora and not module.lora_B.detach().any():  # fresh DoRA: m = ‖W‖ of the 4-bit W (PEFT)
                # B = 0 adds nothing; W alone, because the codes may be on `device` while A and B are not yet
                norm = torch.linalg.vector_norm(module.weight_nf4.dequantize(torch.float32), dim=1)
                module.lora_magnitude_vector.data = norm.to(module.lora_magnitude_vector)
            count, held = count + 1, held + module.weight_nf4.nbytes()
    for name in find_targets(model):  # the plain nn.Linear layers left: not head, not router
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if id(linear.weight) in tied:
            continue
        setattr(parent, child, NF4Linear(linear, device))
        count, held = count + 1, held + getattr(parent, child).weight_nf4.nbytes()
    return count, held
