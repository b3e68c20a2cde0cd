"""LoRA by module replacement: each targeted nn.Linear becomes a LoRALinear, visible in print(model).

    y = x Wᵀ + b + scale · dropout(x) Aᵀ Bᵀ,   scale = alpha / r   (alpha / √r with rsLoRA)

W and b stay the base layer's own Parameters under the names `weight` and `bias`, so a base checkpoint
loads into a LoRA model with no key remapping, and a tied lm_head stays tied. Only `lora_A` / `lora_B`
train (and, with DoRA, the magnitude `lora_magnitude_vector`). With a 4-bit base (model/nf4.py) `weight`
is None and `weight_nf4` holds W. Files: `*.pth` is MiniMind's LoRA layout; any other path is a PEFT
adapter directory.
"""

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from model.atomic import atomic_write, atomic_write_bytes, atomic_write_text
from model.errors import UserError, is_out_of_memory, unreadable_checkpoint
from model.nf4 import dequantize_nf4, nf4_linear

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ROUTER_NAMES = ("gate", "router")  # MoE routers pick experts; a low-rank update to them is not LoRA's job


class LoRAError(UserError):
    """A LoRA file or option that does not fit the model."""


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor on B·A: alpha/r, or alpha/√r with rsLoRA (keeps the update's size stable as r grows)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class _FusedLoRA(torch.autograd.Function):
    """Training-time LoRA with no extra pass over the big activations: y = x·(W + s·B·A)ᵀ + b, for one layer
    or for several that read the same x (q/k/v, gate/up), their outputs side by side.

    The plain path reads x and writes [N, out] tensors for the update, its add and their gradients
    (several passes per layer, memory-bound). Here forward is one base-sized GEMM on the merged weight
    plus z = x·Aᵀ ([N, r]); backward reuses the merged weight for dx (so the LoRA branch's share of dx
    is free) and gets dA, dB from rank-r products. The full-size weight gradient is never formed. The
    merged weight is rebuilt in backward rather than kept (an in×out addmm, ~1 ms per step at 0.6B).
    Several layers stack their merged weights and their A: one GEMM for y, one for z, and in backward one
    each for dx, dy·B (block-diagonal B), dA and dB (whose off-diagonal blocks, rank-r products, are
    dropped): fewer and larger kernels than one call per layer.
    All math runs in x's dtype (bf16 next to a bf16 base, like PEFT under autocast). A 4-bit base comes
    as `weight` None plus its NF4 parts, dequantized in forward and again in backward.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, layout: tuple,
                *tensors: torch.Tensor | None) -> torch.Tensor:
        """layout: per layer (scale, NF4 shape or None, number of NF4 parts); tensors: per layer its weight
        (None when NF4), bias (or None), lora_A, lora_B and NF4 parts (LoRALinear._fused_inputs)."""
        layers = _fused_layers(layout, tensors)
        A = _stack([layer.A for layer in layers]).to(x.dtype)  # stacked, then cast once: fewer launches
        Bs = [layer.B.to(x.dtype) for layer in layers]
        bias = None if layers[0].bias is None else _stack([layer.bias.to(x.dtype) for layer in layers])
        y = F.linear(x, _merged_weight(layers, A, Bs, x.dtype), bias)
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, A, x2 @ A.t(), *Bs, *tensors)
        ctx.x_shape, ctx.layout = x.shape, layout
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor) -> tuple:
        x2, A, z, *rest = ctx.saved_tensors
        Bs, tensors = rest[:len(ctx.layout)], rest[len(ctx.layout):]
        layers = _fused_layers(ctx.layout, tensors)
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(x2.dtype)
        B = _block_diagonal(Bs)
        gB = g @ B  # [N, Σr] = dy·B, layer by layer
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ _merged_weight(layers, A, Bs, x2.dtype, B)).view(ctx.x_shape)
        # In the adapters' dtype (fp32 next to a bf16 base), cast once for the whole group.
        grad_A = (gB.t() @ x2).to(layers[0].A.dtype)  # [Σr, in]
        grad_B = (g.t() @ z).to(layers[0].B.dtype)  # [Σout, Σr]: each layer's dB is its diagonal block
        grads: list[torch.Tensor | None] = [grad_x, None]
        r0 = o0 = 0
        for layer in layers:
            o, r = layer.B.shape
            grads += [None, None, _scaled(grad_A[r0:r0 + r], layer.scale),
                      _scaled(grad_B[o0:o0 + o, r0:r0 + r], layer.scale), *[None] * len(layer.nf4_parts)]
            r0, o0 = r0 + r, o0 + o
        return tuple(grads)


class _FusedInput(NamedTuple):
    """One layer's share of _FusedLoRA's inputs."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    nf4_shape: tuple[int, int] | None
    nf4_parts: tuple[torch.Tensor, ...]


def _fused_layers(layout: tuple, tensors: tuple) -> list[_FusedInput]:
    """_FusedLoRA's flat inputs back into one record per layer."""
    layers, i = [], 0
    for scale, nf4_shape, n_parts in layout:
        weight, bias, A, B = tensors[i:i + 4]
        layers.append(_FusedInput(weight, bias, A, B, scale, nf4_shape, tuple(tensors[i + 4:i + 4 + n_parts])))
        i += 4 + n_parts
    return layers


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along dim 0, without a copy for a single tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    """t · scale, with no operator at all for the default scale 1 (alpha = r)."""
    return t if scale == 1 else t * scale


def _block_diagonal(Bs: list[torch.Tensor]) -> torch.Tensor:
    """The layers' B as one block-diagonal [Σout, Σr] matrix (B itself for a single layer)."""
    return Bs[0] if len(Bs) == 1 else torch.block_diag(*Bs)


def _merged_weight(layers: list[_FusedInput], A: torch.Tensor, Bs: list[torch.Tensor], dtype: torch.dtype,
                   block: torch.Tensor | None = None) -> torch.Tensor:
    """The layers' W + s·B·A stacked by output rows, in `dtype` (each rounded once); A is their stacked A.

    Layers of one scale (the usual case) merge in one addmm over their stacked W and block-diagonal B (`block`
    when the caller has it: _block_diagonal(Bs)): the zero blocks add exact zeros, so each entry is the same
    sum, in one GEMM instead of one per layer."""
    dense = [layer.weight.to(dtype) if layer.weight is not None else
             dequantize_nf4(*layer.nf4_parts, layer.nf4_shape, dtype) for layer in layers]
    if len({layer.scale for layer in layers}) == 1:
        B = _block_diagonal(Bs) if block is None else block
        return torch.addmm(_stack(dense), B, A, alpha=layers[0].scale)
    As = A.split([layer.A.shape[0] for layer in layers])
    return _stack([torch.addmm(w, b, a, alpha=layer.scale) for layer, w, a, b in zip(layers, dense, As, Bs,
                                                                                       strict=True)])


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update B·A (with DoRA, also a per-row magnitude m)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 use_dora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        # The base Parameters themselves, not copies: same state-dict keys, same storage, ties kept.
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # Set by model.nf4.quantize_base: the frozen weight in 4 bits (then `weight` is None).
        self.weight_nf4: nn.Module | None = None
        # Like PEFT's autocast_adapter_dtype: a bf16/fp16 base gets fp32 adapters, because the small
        # updates to A and B would round away in half precision.
        dtype = base.weight.dtype if base.weight.dtype in (torch.float32, torch.float64) else torch.float32
        factory = {"device": base.weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        # PEFT's init (kaiming-uniform, i.e. nn.Linear's default, std 1/√(3·in)) rather than MiniMind's
        # N(0, 0.02): it scales with the fan-in, so it suits 4096-wide Qwen layers as well as 512-wide
        # MiniMind ones (where the two nearly agree), and lr/alpha recipes from PEFT carry over.
        # B = 0 makes a fresh LoRA model compute exactly the base model's function.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank, self.alpha, self.dropout_p, self.use_rslora = rank, alpha, dropout, use_rslora
        self.scale = lora_scale(rank, alpha, use_rslora)
        self.use_dora = use_dora
        if use_dora:
            # DoRA (Liu et al. 2024): W' = m · (W + s·B·A) / ‖W + s·B·A‖ per output row; m starts at ‖W‖,
            # so a fresh layer is still the base. PEFT's name, so its files map one to one.
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm(torch.float32).to(dtype))
        self.merged = False
        # Opt-in (set_lora_fused): training through _FusedLoRA, with the LoRA math in the base dtype.
        self.fused = False

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen W as a dense [out, in] tensor in `dtype` (dequantized when it is held in 4 bits)."""
        return self.weight.to(dtype) if self.weight_nf4 is None else self.weight_nf4.dequantize(dtype)

    def _base_forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        b = self.bias if bias else None
        if self.weight_nf4 is None:
            return F.linear(x, self.weight, b)
        return nf4_linear(x, self.weight_nf4, b)

    @torch.no_grad()
    def weight_norm(self, dtype: torch.dtype) -> torch.Tensor:
        """‖W + s·B·A‖ per output row (DoRA's denominator), computed in `dtype`; no gradient, as in the paper."""
        return torch.linalg.vector_norm(self.base_weight(dtype) + self.delta_weight(dtype), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the scaled low-rank update (skipped once merged into the weight)."""
        if self.fused_ready():
            return LoRALinear.fused_forward(x, (self,))
        if self.merged:
            return self._base_forward(x)
        if self.use_dora:
            return self._dora_forward(x)
        y = self._base_forward(x)
        # Dropout on the LoRA input only (as PEFT); the functional form keeps print(model) free of an
        # Identity child when it is off.
        z = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        return y + self._update(z).to(y.dtype)

    def fused_ready(self) -> bool:
        """Whether this call trains through _FusedLoRA (set_lora_fused; training with grad, dropout 0, unmerged)."""
        return (self.fused and self.training and not self.merged and self.dropout_p == 0 and not self.use_dora
                and torch.is_grad_enabled())

    def _fused_inputs(self) -> tuple[tuple, tuple]:
        """This layer's entry in _FusedLoRA's layout, and its tensors."""
        nf4 = self.weight_nf4
        parts = () if nf4 is None else nf4.parts()
        return (self.scale, None if nf4 is None else nf4.shape, len(parts)), (self.weight, self.bias, self.lora_A,
                                                                              self.lora_B, *parts)

    @staticmethod
    def fused_forward(x: torch.Tensor, layers: tuple["LoRALinear", ...]) -> torch.Tensor:
        """`layers` (fused_ready, all reading x) through one _FusedLoRA: their outputs side by side, computed
        in the dtype autocast would run the GEMMs in."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        layout, tensors = zip(*(layer._fused_inputs() for layer in layers), strict=True)
        with torch.autocast(x.device.type, enabled=False):
            return _FusedLoRA.apply(x.to(dtype), layout, *(t for group in tensors for t in group))

    @staticmethod
    def project_together(x: torch.Tensor, layers: tuple["LoRALinear", ...]) -> tuple[torch.Tensor, ...] | None:
        """x through several LoRA layers that all read it (q/k/v, gate/up): one fused call when every one
        trains fused and they agree on having a bias, else None (the caller then runs them one by one)."""
        if not all(layer.fused_ready() for layer in layers) or len({layer.bias is None for layer in layers}) > 1:
            return None
        return LoRALinear.fused_forward(x, layers).split([layer.out_features for layer in layers], dim=-1)

    def _update(self, z: torch.Tensor) -> torch.Tensor:
        """s · z Aᵀ Bᵀ in the adapter's dtype (fp32 next to a bf16 base)."""
        z = z.to(self.lora_A.dtype)
        # Scale the [N, r] intermediate rather than the [N, out] result: r is the small side.
        return F.linear(F.linear(z, self.lora_A) * self.scale, self.lora_B)

    def _dora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's DoRA: y = x Wᵀ + b + (m/‖·‖ − 1) · z Wᵀ + (m/‖·‖) · s · z Aᵀ Bᵀ, with z = dropout(x)."""
        y = self._base_forward(x, bias=False)
        ratio = self.lora_magnitude_vector / self.weight_norm(self.lora_A.dtype)  # norm detached (paper §4.3)
        z = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        zw = y if z is x else self._base_forward(z, bias=False)
        out = y + ((ratio - 1) * zw.to(ratio.dtype) + ratio * self._update(z)).to(y.dtype)
        return out if self.bias is None else out + self.bias

    def delta_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """scale · B A as a dense [out, in] matrix, computed in `dtype`."""
        return (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` (summed in at least fp32, rounded once to the weight's dtype)."""
        if self.merged:
            return
        if self.weight_nf4 is not None:
            raise LoRAError("cannot merge LoRA into a 4-bit base; load the adapter on the unquantized base and "
                            "merge there")
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        merged = self.weight.to(acc) + self.delta_weight(acc)
        if self.use_dora:  # W' = m/‖W + sBA‖ · (W + sBA); the factor is kept so unmerge can divide it out
            self.dora_factor = (self.lora_magnitude_vector.to(acc) / self.weight_norm(acc))[:, None]
            merged = merged * self.dora_factor
        self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from `weight` again (exact up to one rounding in the weight's dtype)."""
        if self.merged:
            acc = torch.promote_types(self.weight.dtype, torch.float32)
            weight = self.weight.to(acc)
            if self.use_dora:
                weight = weight / self.dora_factor
            self.weight.copy_(weight - self.delta_weight(acc))
            self.merged = False

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """This layer's trainable tensors by attribute name (the base weight and bias are not among them)."""
        extra = {"lora_magnitude_vector": self.lora_magnitude_vector} if self.use_dora else {}
        return {"lora_A": self.lora_A, "lora_B": self.lora_B, **extra}

    def extra_repr(self) -> str:
        rs = (", rslora=True" if self.use_rslora else "") + (", dora=True" if self.use_dora else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}{rs}, scale={self.scale:g}, dropout={self.dropout_p:g}"
                f"{', merged' if self.merged else ''}{', fused' if self.fused else ''}")


# ------------------------------------------------------------------------- choosing the layers

def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile / DDP wrappers, so module names carry no prefix."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _clean_name(name: str) -> str:
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) parts that wrappers add to key names."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name.replace("_orig_mod.", "")


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if head is not None else getattr(model, "lm_head", None)


def _names_match(name: str, target: str) -> bool:
    """PEFT's target_modules rule: the full module path, or its trailing dotted components."""
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: str | list[str] | None = None) -> list[str]:
    """Names of the nn.Linear modules that `targets` selects (see apply_lora)."""
    # Exactly nn.Linear: subclasses such as MultiheadAttention's out_proj are read via .weight, not called.
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    _refuse_other_projections(model, linears, targets)
    head = _output_head(model)
    eligible = [n for n, m in linears.items() if m is not head and _leaf(n) not in ROUTER_NAMES]
    if targets is None or targets == "all-linear":
        return eligible
    if targets == "square":  # MiniMind's own choice; with GQA that means q_proj and o_proj only
        return [n for n in eligible if linears[n].in_features == linears[n].out_features]
    wanted = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    for t in wanted:
        if not any(_names_match(n, t) for n in linears):
            leaves = ", ".join(sorted({_leaf(n) for n in linears}))
            raise LoRAError(f"LoRA target '{t}' names no nn.Linear in the model; its linear layers are: {leaves}")
    return [n for n in linears if any(_names_match(n, t) for t in wanted)]


def _refuse_other_projections(model: nn.Module, linears: dict[str, nn.Module], targets: object) -> None:
    """GPT-2-style bases project with transformers' Conv1D (weight stored [in, out]), not nn.Linear: say so."""
    others = {n: m for n, m in model.named_modules() if type(m).__name__ in ("Conv1D", "Conv1d") and n}
    wanted = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets or [])
    head = _output_head(model)
    asked = [n for n in others if any(_names_match(n, t) for t in wanted)]
    if asked or (others and not [n for n, m in linears.items() if m is not head]):
        kinds = sorted({type(m).__name__ for m in others.values()})
        leaves = ", ".join(sorted({_leaf(n) for n in others}))
        raise LoRAError(f"the model's projection layers ({leaves}) are {'/'.join(kinds)}, not nn.Linear; LoRA here "
                        f"adapts nn.Linear layers, as in MiniMind, Qwen, Llama and Mistral models "
                        f"(GPT-2-style Conv1D layers are not supported)")


def _pattern_match(pattern: str, name: str, parents: bool = True) -> bool:
    """PEFT's rank_pattern rule (the pattern matches the path's trailing components); with `parents`,
    a pattern may also name an enclosing module, so {"mlp": 32} covers every layer under `mlp`."""
    tail = r"(\..*)?" if parents else ""
    return re.match(rf"(.*\.)?({pattern}){tail}$", name) is not None


def _pattern_value(patterns: dict | None, name: str, default: float, parents: bool = True) -> float:
    for pattern, value in (patterns or {}).items():  # first match wins, as in PEFT
        if _pattern_match(pattern, name, parents):
            return value
    return default


def largest_useful_ranks(model: nn.Module, targets: str | list[str] | None,
                         rank_pattern: dict[str, int] | None) -> dict[str | None, tuple[int, str]]:
    """For the default rank (key None) and each rank_pattern key, over the targeted layers it sets: the largest
    min(in_features, out_features) and that layer's name. B·A has no higher rank, so a rank above it only adds
    memory."""
    model = _unwrap(model)
    largest: dict[str | None, tuple[int, str]] = {}
    for name in find_targets(model, targets):
        key = next((k for k in rank_pattern or {} if _pattern_match(k, name)), None)  # first match wins
        layer = model.get_submodule(name)
        useful = min(layer.in_features, layer.out_features)
        if useful > largest.get(key, (0, ""))[0]:
            largest[key] = (useful, name)
    return largest


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _inject(model: nn.Module, plan: dict[str, tuple[int, float]], dropout: float, use_rslora: bool,
            use_dora: bool = False) -> None:
    """Swap each named nn.Linear for a LoRALinear of the planned (rank, alpha); freeze all but LoRA."""
    for name, (rank, alpha) in plan.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        layer = LoRALinear(base, rank, alpha, dropout, use_rslora, use_dora)
        layer.train(base.training)  # a model in eval mode stays there: no LoRA dropout when answering
        setattr(parent, child, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):  # by module type: a base parameter named "lora_..." stays frozen
        p.requires_grad_(True)


def apply_lora(model: nn.Module, rank: int = 16, alpha: float | None = None, dropout: float = 0.0,
               targets: str | list[str] | None = None, use_rslora: bool = False,
               rank_pattern: dict[str, int] | None = None,
               alpha_pattern: dict[str, float] | None = None, use_dora: bool = False) -> list[str]:
    """Put LoRA on the targeted linear layers, freeze everything else, and return the adapted module names.

    targets: None / "all-linear" = every nn.Linear except the output head and MoE routers; "square" =
    MiniMind's choice (in == out); or names like "q_proj,v_proj" matched against the end of module paths.
    alpha None means alpha = rank (scale 1, as MiniMind). rank_pattern / alpha_pattern map a name regex
    (matched like PEFT's, or naming a parent such as "mlp") to a per-module rank / alpha. use_dora adds
    DoRA's trainable magnitude per output row (PEFT's DoRA).
    """
    model = _unwrap(model)
    if _lora_layers(model):
        raise LoRAError("the model already has LoRA layers; apply_lora once (load_lora fills existing ones)")
    if rank < 1 or (alpha is not None and not (math.isfinite(alpha) and alpha > 0)) or not 0 <= dropout < 1:
        raise LoRAError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1; got rank={rank}, "
                        f"alpha={alpha}, dropout={dropout}")
    names = find_targets(model, targets)
    if not names:
        raise LoRAError(f"LoRA targets {targets!r} select no linear layer of the model")
    for kind, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for pattern in patterns or {}:
            if not any(_pattern_match(pattern, n) for n in names):
                raise LoRAError(f"LoRA {kind} key '{pattern}' matches none of the targeted layers, e.g. {names[0]}")
    for kind, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for pattern, value in (patterns or {}).items():
            if not (math.isfinite(value) and value > 0) or (kind == "rank_pattern" and value != int(value)):
                raise LoRAError(f"LoRA {kind} '{pattern}': {value} is not a positive {'integer' if kind[0] == 'r' else 'number'}")
    plan = {}
    for name in names:
        r = int(_pattern_value(rank_pattern, name, rank))
        plan[name] = (r, _pattern_value(alpha_pattern, name, r if alpha is None else alpha))
    _inject(model, plan, dropout, use_rslora, use_dora)
    return names


# ------------------------------------------------------------------------- training-time helpers

def set_lora_fused(model: nn.Module, enabled: bool = True) -> None:
    """Train every LoRA layer through _FusedLoRA (faster, leaner; LoRA math in the base dtype, e.g. bf16).

    Applies in training mode with grad enabled, dropout 0 and the weight unmerged; otherwise (eval,
    generation, dropout) the plain path runs. Off by default: the plain path keeps LoRA math in fp32.
    """
    for layer in _lora_layers(_unwrap(model)).values():
        layer.fused = enabled


def _named_lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """`<module>.<name>` -> each LoRALinear's own trainable tensors, found by module type, not by name."""
    return {f"{module}.{n}": p for module, layer in _lora_layers(_unwrap(model)).items()
            for n, p in layer.adapter_parameters().items()}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors (the only parameters the optimizer should see)."""
    return list(_named_lora_parameters(model).values())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors of the model's state dict (for the trainer's checkpoints)."""
    return {k: p.detach() for k, p in _named_lora_parameters(model).items()}


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "LoRA state dict") -> None:
    """Copy a lora_state_dict() back into a model with the same LoRA layers; mismatches raise LoRAError."""
    own = lora_state_dict(model)
    sd = {_clean_name(k): v for k, v in sd.items()}
    for key, value in sd.items():
        if key not in own:
            raise LoRAError(f"{source}: key '{key}' is not a LoRA parameter of the model")
        if value.shape != own[key].shape:
            raise LoRAError(f"{source}: key '{key}' has shape {list(value.shape)}, "
                            f"the model's is {list(own[key].shape)} (different rank or model size?)")
    missing = [k for k in own if k not in sd]
    if missing:
        raise LoRAError(f"{source}: no value for the model's LoRA parameter '{missing[0]}'")
    with torch.no_grad():
        for key, value in sd.items():
            own[key].copy_(value)


def merge_lora(model: nn.Module, unload: bool = False) -> None:
    """Fold every LoRA update into its base weight; with `unload`, also swap the layers back to nn.Linear."""
    model = _unwrap(model)
    layers = _lora_layers(model)
    tied = _shared_weights(model)
    for name, layer in layers.items():
        if id(layer.weight) in tied:
            raise LoRAError(f"cannot merge LoRA into '{name}': its weight is shared with another module (a tied "
                            "lm_head and embed_tokens), which would change too; the adapter works unmerged "
                            "(chat.py, eval_lora.py, PEFT), and a LoRA trained without that layer merges")
    for name, layer in layers.items():
        layer.merge()
        if unload:
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            linear.weight, linear.bias = layer.weight, layer.bias
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, linear)


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora (not after unload): the weights go back and the LoRA branch runs again."""
    for layer in _lora_layers(_unwrap(model)).values():
        layer.unmerge()


def _shared_weights(model: nn.Module) -> set[int]:
    seen, shared = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (shared if id(p) in seen else seen).add(id(p))
    return shared


# ------------------------------------------------------------------------- files

@dataclass
class _Adapter:
    """One layer's factors as a file holds them, with the scale the file means them to be used at."""

    key: str  # the file's key for lora_A, for error messages
    B_key: str  # and for lora_B
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None  # DoRA's m
    base_copy: torch.Tensor | None = None  # the layer's base weight, which PEFT saves for an lm_head it adapts


class _LoRAFile(NamedTuple):
    """A LoRA file as read: each layer's factors, the switches that say how to use them, and the whole base layers
    PEFT saved beside them (save_embedding_layers: module name -> (key, tensor)), which must be the base's own."""

    adapters: dict[str, _Adapter]
    use_rslora: bool
    dropout: float
    use_dora: bool
    base_layers: dict[str, tuple[str, torch.Tensor]]


def save_lora(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Save only the LoRA factors: `*.pth` in MiniMind's layout, any other path as a PEFT adapter directory."""
    model, path = _unwrap(model), Path(path)
    layers = _lora_layers(model)
    if not layers:
        raise LoRAError(f"{path}: the model has no LoRA layers to save")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pth":
        atomic_write(path, lambda f: torch.save(_minimind_state_dict(layers), f))
    else:
        _save_peft(model, layers, path, base_model_name_or_path)


def _minimind_state_dict(layers: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    # MiniMind's loader always uses scale 1, so our scale goes into B; fp16 like MiniMind's own files.
    sd = {}
    if any(layer.use_dora for layer in layers.values()):
        raise LoRAError("MiniMind's .pth LoRA layout has no place for DoRA's magnitude; save a PEFT directory")
    for name, layer in layers.items():
        name = _clean_name(name)
        sd[f"{name}.lora.A.weight"] = layer.lora_A.detach().to("cpu", torch.float16)
        sd[f"{name}.lora.B.weight"] = (layer.lora_B.detach().float() * layer.scale).to("cpu", torch.float16)
    return sd


def _most_common(values: list) -> float:
    return Counter(values).most_common(1)[0][0]  # ties go to the first layer's value


def _save_peft(model: nn.Module, layers: dict[str, LoRALinear], path: Path, base_name: str | None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    names = [_clean_name(n) for n in layers]
    rank = _most_common([m.rank for m in layers.values()])
    alpha = _most_common([m.alpha for m in layers.values()])
    # Per-module exceptions as full module paths, so PEFT's own pattern matching can only pick that module.
    rank_pattern = {n: m.rank for n, m in zip(names, layers.values()) if m.rank != rank}
    alpha_pattern = {n: _json_number(m.alpha) for n, m in zip(names, layers.values()) if m.alpha != alpha}
    # PEFT re-finds the layers by target_modules: short names when they select exactly our layers,
    # otherwise a regex of the full paths (PEFT full-matches a string target).
    leaves = sorted({_leaf(n) for n in names})
    selected = {n for n, _ in model.named_modules() if _leaf(n) in leaves}
    target_modules = leaves if selected == set(layers) else "|".join(re.escape(n) for n in names)
    first = next(iter(layers.values()))
    if base_name is None:
        base_name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None),
                                                                    "_name_or_path", None) or None
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": rank, "lora_alpha": _json_number(alpha), "lora_dropout": first.dropout_p,
        "target_modules": target_modules, "use_rslora": first.use_rslora,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "use_dora": first.use_dora, "lora_bias": False, "modules_to_save": None, "exclude_modules": None,
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    tensors = {}
    for name, layer in zip(names, layers.values()):
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
        if layer.use_dora:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach().cpu()
    atomic_write_bytes(path / PEFT_WEIGHTS, save_safetensors(tensors, metadata={"format": "pt"}))
    atomic_write_text(path / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict; a truncated or foreign file is a LoRAError that says which and why."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if is_out_of_memory(e):  # not a damaged file: say so (run_job), keep it
            raise
        raise LoRAError(f"{path}: cannot read it as a LoRA: {unreadable_checkpoint(path, e)}") from None


def minimind_lora_key(key: str) -> tuple[str, str] | None:
    """(module path, "A" or "B") of MiniMind's LoRA key `<module>.lora.A.weight` / `.lora.B.weight`; None for any
    other key."""
    m = re.fullmatch(r"(.+)\.lora\.([AB])\.weight", key)
    return None if m is None else (m.group(1), m.group(2))


def _read_minimind(path: Path) -> _LoRAFile:
    """MiniMind's `<module>.lora.A.weight` / `.lora.B.weight` file, meant at scale 1."""
    sd = _load_tensors(path)
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in sd.items():
        parsed = minimind_lora_key(_clean_name(key))
        if parsed is None:
            raise LoRAError(f"{path}: key '{key}' is not a MiniMind LoRA key (<module>.lora.A.weight); "
                            f"is this a full model checkpoint?")
        module, factor = parsed
        pairs.setdefault(module, {})[factor] = (key, value)
    return _LoRAFile(_pair_up(path, pairs, alpha_of=lambda name, rank: rank), False, 0.0, False, {})


# PEFT inits that also rewrite the base weights (W minus the initial B·A, or a quantized W): PEFT repeats them when
# it loads such an adapter, so the factors alone describe the trained model only on that rewritten base.
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _refuse_other_functions(cfg: dict, config: Path) -> None:
    """Refuse the PEFT settings under which the factors on the plain base compute another function than PEFT's."""
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise LoRAError(f"{config}: init_lora_weights={init!r} trains against a base that PEFT rewrites (W minus "
                        "the initial adapter), so on the base itself this adapter is another model; convert it to a "
                        "plain LoRA with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=<the "
                        "adapter as initialised>), or merge it with PEFT's merge_and_unload() and pass the merged "
                        "model as --from_weight")
    if cfg.get("alora_invocation_tokens"):
        raise LoRAError(f"{config}: alora_invocation_tokens is set: an activated LoRA acts only from its invocation "
                        "tokens on, and here a LoRA acts on every token; run this adapter with PEFT")


MERGE_WITH_PEFT = "merge the adapter with PEFT's merge_and_unload() and pass the merged model as --from_weight"
# A whole layer's weight that no other setting explains: PEFT's save_embedding_layers saved the embedding or head
SAVED_LAYER = ("PEFT saved that whole layer (save_pretrained with save_embedding_layers, as for a resized "
               "vocabulary)")


def _why_not_lora(key: str, cfg: dict) -> str:
    """What a tensor of a PEFT file other than LoRA factors holds, by the setting that made PEFT save it, and the
    way out: only LoRA factors load here, and PEFT itself can fold the rest into a model to use as the base.
    A saved embedding layer's reason is SAVED_LAYER alone: it loads where it is the base's own."""
    merge = f"or {MERGE_WITH_PEFT}"
    name = key.removeprefix(PEFT_PREFIX)
    layer = name.removesuffix(".weight").removesuffix(".modules_to_save").removesuffix(".original_module")
    saved_whole = [t for t in cfg.get("modules_to_save") or [] if layer.endswith(t)]
    if name.endswith(".bias") and cfg.get("bias", "none") != "none":
        return (f"{PEFT_CONFIG} says bias={cfg['bias']!r}, so PEFT trained and saved the base's biases, which do not "
                f"load here; train with bias='none', {merge}")
    if ".token_adapter." in name:
        return (f"{PEFT_CONFIG} sets trainable_token_indices, so PEFT trained single embedding rows, which do not "
                f"load here; train without it, {merge}")
    if ".lora_embedding_" in name:
        return (f"the target_modules of {PEFT_CONFIG} include an embedding layer, and LoRA here adapts linear layers "
                f"only; train with linear target_modules, {merge}")
    if saved_whole:
        return (f"{PEFT_CONFIG} lists {saved_whole[0]!r} in modules_to_save, so PEFT trained and saved a whole copy "
                f"of that layer, which does not load here; train without modules_to_save, {merge}")
    if name.endswith(".weight"):
        return SAVED_LAYER
    return "bias, embedding and modules_to_save tensors do not load here"


def _read_peft(path: Path) -> _LoRAFile:
    """A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    if path.is_file():
        inside = f": pass the folder {path.parent}" if (path.parent / PEFT_CONFIG).is_file() else ""
        raise LoRAError(f"{path}: a LoRA is a MiniMind .pth file or a PEFT adapter folder, not a file of one{inside}")
    if not (path / PEFT_CONFIG).is_file():
        raise LoRAError(f"{path}: no {PEFT_CONFIG} there; give a PEFT adapter directory or a MiniMind .pth file")
    try:
        cfg = json.loads((path / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoRAError(f"{path / PEFT_CONFIG}: not valid JSON ({err}); the file is damaged: save the adapter "
                        "again or restore it") from None
    if not isinstance(cfg, dict):
        raise LoRAError(f"{path / PEFT_CONFIG}: holds a JSON {type(cfg).__name__}, not PEFT's config object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{path / PEFT_CONFIG}: peft_type is {cfg.get('peft_type')!r}; only LORA is supported")
    if cfg.get("lora_bias"):
        raise LoRAError(f"{path / PEFT_CONFIG}: lora_bias=true is not supported; train with it off")
    # fan_in_fan_out only transposes the merge into a Conv1D weight: PEFT turns it off for nn.Linear targets (with a
    # warning), so the factors mean the same either way; a Conv1D target is refused where the layers are known.
    _refuse_other_functions(cfg, path / PEFT_CONFIG)
    if (path / PEFT_WEIGHTS).is_file():
        try:
            sd = load_file(path / PEFT_WEIGHTS)
        except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
            if is_out_of_memory(err):  # not a damaged file: say so (run_job), keep it
                raise
            raise LoRAError(f"{path / PEFT_WEIGHTS}: cannot be read as safetensors ({err}); the file is damaged "
                            "or truncated: save the adapter again or restore it") from None
    elif (path / "adapter_model.bin").is_file():  # adapters from PEFT versions before safetensors
        sd = _load_tensors(path / "adapter_model.bin")
    else:
        raise LoRAError(f"{path}: no {PEFT_WEIGHTS} there")
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    base_layers: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(?:lora_([AB])\.weight|lora_(magnitude)_vector(?:\.weight)?"
                         r"|(base)_layer\.weight)", key)
        if m is None:
            why = _why_not_lora(key, cfg)
            if why is not SAVED_LAYER:
                raise LoRAError(f"{path / PEFT_WEIGHTS}: key '{key}' is not a LoRA or DoRA tensor: {why}")
            base_layers[_clean_name(key.removeprefix(PEFT_PREFIX).removesuffix(".weight"))] = (key, value)
            continue
        pairs.setdefault(_clean_name(m.group(1)), {})[m.group(2) or m.group(3) or m.group(4)] = (key, value)
    alpha, alpha_pattern = cfg.get("lora_alpha", 8), cfg.get("alpha_pattern") or {}

    def alpha_of(name: str, rank: int) -> float:  # PEFT's own matching, so PEFT's files mean what PEFT means
        return _pattern_value(alpha_pattern, name, alpha, parents=False)

    selects = _peft_selector(cfg, path / PEFT_CONFIG)
    for name, parts in pairs.items():  # PEFT adapts what target_modules select: other tensors it would not load
        if selects is not None and not selects(name):
            raise LoRAError(f"{path / PEFT_WEIGHTS}: key '{next(iter(parts.values()))[0]}': the target_modules of "
                            f"{PEFT_CONFIG} ({cfg['target_modules']}) do not select '{name}'; the config and weights "
                            "come from different adapters")
    use_dora = bool(cfg.get("use_dora", False))
    for name, parts in pairs.items():
        if ("magnitude" in parts) != use_dora:
            key = next(iter(parts.values()))[0]
            raise LoRAError(f"{path / PEFT_WEIGHTS}: key '{key}': {PEFT_CONFIG} says use_dora={use_dora}, but "
                            f"'{name}' {'has no' if use_dora else 'has a'} lora_magnitude_vector")
    adapters = _pair_up(path / PEFT_WEIGHTS, pairs, alpha_of)
    if "r" in cfg:   # PEFT sizes the layers from the config, so a config that disagrees would not load there
        for name, adapter in adapters.items():
            rank = _pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"], parents=False)
            if adapter.A.shape[0] != rank:
                raise LoRAError(f"{path / PEFT_CONFIG}: says rank {rank} for '{name}', but {PEFT_WEIGHTS} holds "
                                f"rank {adapter.A.shape[0]}; the config and weights come from different adapters")
    return _LoRAFile(adapters, bool(cfg.get("use_rslora", False)), float(cfg.get("lora_dropout", 0.0)), use_dora,
                     base_layers)


def _peft_selector(cfg: dict, config: Path) -> Callable[[str], bool] | None:
    """PEFT's target_modules rule (of the file `config`) as a test on module paths; None where PEFT would pick the
    layers itself."""
    targets = cfg.get("target_modules")
    if not targets or targets == "all-linear":
        return None
    if isinstance(targets, str):  # PEFT full-matches a string as a regex
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise LoRAError(f"{config}: target_modules {targets!r} is not a regular expression ({err}); the file "
                            "is damaged or was edited by hand: save the adapter again or restore it") from None
        return lambda name: pattern.fullmatch(name) is not None
    return lambda name: any(_names_match(name, t) for t in targets)


def _layer_count(names: Iterable[str]) -> int:
    """How many decoder layers (`...layers.N...`) the module names reach: the highest N plus 1 (0 for none)."""
    return max((int(m.group(2)) + 1 for m in map(_in_layer, names) if m), default=0)


def _in_layer(name: str) -> re.Match | None:
    """`<list>.layers.<N>.<module>` split into its three parts, or None for a module outside the layers."""
    return re.fullmatch(r"(.*\.layers)\.(\d+)\.(.+)", name)


def _check_coverage(model: nn.Module, path: Path, adapted: set[str], base: str | None) -> None:
    """Every layer of the base that the LoRA was made for must have factors in it: a gap means another base (one
    with more layers), whose extra layers would run bare. Those layers are what a PEFT folder's target_modules
    select (PEFT's own loader finds them so), also from the folder the trainer writes beside a `.pth`; for a `.pth`
    alone, the layers past the file's last that hold a module the file adapts in its own layers."""
    modules = dict(_unwrap(model).named_modules())
    k, n = _layer_count(adapted), _layer_count(modules)
    config = lora_folder(path) / PEFT_CONFIG
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a .pth alone (or a folder beside it that is no adapter's: not needed to load)
        cfg = None
    if isinstance(cfg, dict):
        selects = _peft_selector(cfg, config)
        if selects is None or any(cfg.get(rule) for rule in ("layers_to_transform", "layers_pattern", "exclude_modules")):
            return  # PEFT narrows the selection by more rules than target_modules: not repeated here
        rule = f"the target_modules of {config if path.suffix == '.pth' else PEFT_CONFIG} select its"
    else:
        kinds = {(m.group(1), m.group(3)) for m in map(_in_layer, adapted) if m}  # e.g. (model.layers, mlp.up_proj)

        def selects(name: str) -> bool:
            m = _in_layer(name)
            return m is not None and int(m.group(2)) >= k and (m.group(1), m.group(3)) in kinds

        rule = "the LoRA's layers end before its"
    for name, module in modules.items():
        if isinstance(module, (nn.Linear, LoRALinear)) and selects(name) and name not in adapted:
            why = (f"the LoRA has factors for {k} layer{'s' if k > 1 else ''} and the base has {n}" if 0 < k < n
                   else "a partly written adapter, or one of another base")
            raise LoRAError(f"{path}: does not fit the base {_base_name(model, base)}: {rule} '{name}', which the "
                            f"adapter has no factors for ({why}); pass the base it was trained on")


def lora_folder(lora: Path) -> Path:
    """A PEFT adapter folder as given; for a MiniMind .pth LoRA, the folder of the same name the trainer writes
    beside it (adapter_config.json, and the chat template the run learned)."""
    return lora if lora.is_dir() else lora.with_suffix("")


def _pair_up(path: Path, pairs: dict, alpha_of: Callable[[str, int], float]) -> dict[str, _Adapter]:
    adapters = {}
    for name, ab in pairs.items():
        if not {"A", "B"} <= set(ab):
            key = next(iter(ab.values()))[0]
            raise LoRAError(f"{path}: key '{key}' has no matching {'B' if 'A' in ab else 'A'} factor")
        (key, A), (B_key, B) = ab["A"], ab["B"]
        magnitude = ab["magnitude"][1] if "magnitude" in ab else None
        adapters[name] = _Adapter(key, B_key, A, B, alpha_of(name, A.shape[0]), magnitude,
                                  ab.get("base", (None, None))[1])
    return adapters


def read_lora(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Each adapted module's (A, B, scale) as a `.pth` file or PEFT directory means them, without a model."""
    path = Path(path)
    if not path.exists():
        raise LoRAError(f"{path}: no such LoRA file or adapter directory")
    lora = _read_minimind(path) if path.suffix == ".pth" else _read_peft(path)
    return {n: (a.A, a.B, lora_scale(a.A.shape[0], a.alpha, lora.use_rslora)) for n, a in lora.adapters.items()}


def read_lora_plan(path: str | os.PathLike) -> tuple[dict[str, tuple[int, float | None]], bool, bool]:
    """Each adapted module's (rank, alpha) and the file's rsLoRA and DoRA switches, without a model.

    A MiniMind `.pth` holds no alpha (its scale is folded into B): its alphas are None.
    """
    path = Path(path)
    if not path.exists():
        raise LoRAError(f"{path}: no such LoRA file or adapter directory")
    if path.suffix == ".pth":
        return {n: (a.A.shape[0], None) for n, a in _read_minimind(path).adapters.items()}, False, False
    lora = _read_peft(path)
    return {n: (a.A.shape[0], a.alpha) for n, a in lora.adapters.items()}, lora.use_rslora, lora.use_dora


def _base_name(model: nn.Module, base: str | None) -> str:
    """The base as errors name it: `base`, else the path it was loaded from (trainer/base_model.py sets it)."""
    return base or getattr(model, "name_or_path", "") or "the model"


def _moe_by_file_name(path: Path, model: nn.Module) -> bool | None:
    """Whether a LoRA named the MiniMind way, `{name}_{hidden_size}{_moe}`, says it is for an MoE base; None for
    other names or non-MiniMind bases. Such a file with attention-only keys fits dense and MoE bases alike."""
    cfg = getattr(model, "config", None)
    if not hasattr(cfg, "use_moe"):
        return None
    m = re.fullmatch(rf".+_{cfg.hidden_size}(_moe)?", path.name.removesuffix(".pth"))
    return None if m is None else m.group(1) is not None


def _why_no_place(modules: dict[str, nn.Module], name: str) -> str:
    """Why the base has no linear layer `name`, in the terms that tell the two models apart."""
    module = modules.get(name)
    if module is not None:
        return f"the base's '{name}' is a {type(module).__name__}, not a linear layer"
    base_moe = any(".experts." in n for n in modules)
    if ".experts." in name and not base_moe:
        return "the LoRA has expert layers (MoE) and the base is dense"
    if re.search(r"\.mlp\.(gate|up|down)_proj$", name) and base_moe:
        return "the LoRA is for a dense MLP and the base has expert layers (MoE)"
    m = _in_layer(name)
    if m is not None:
        count = sum(re.fullmatch(rf"{re.escape(m.group(1))}\.\d+", n) is not None for n in modules)
        if count and int(m.group(2)) >= count:
            return f"the LoRA has layer {m.group(2)} and the base has {count} layers"
    return f"the base has no layer '{name}'"


def check_lora_fits(model: nn.Module, path: str | os.PathLike, keys: dict[str, str],
                    base: str | None = None) -> None:
    """Raise a LoRAError naming the file, the base and what differs unless every module the LoRA adapts is a
    linear layer of `model` and a MiniMind file name's `_moe` agrees with the base. `keys` maps each adapted
    module to the file's key for it (or to itself), for the message."""
    model, path = _unwrap(model), Path(path)
    modules = dict(model.named_modules())
    for name, key in keys.items():
        if not isinstance(modules.get(name), (nn.Linear, LoRALinear)):
            where = f"key '{key}'" if key != name else f"layer '{name}'"
            if type(modules.get(name)).__name__ == "Conv1D":  # the base is right: its layer kind is not supported
                raise LoRAError(f"{path}: the base's '{name}' ({where}) is a GPT-2-style Conv1D (weight stored "
                                "[in, out], which PEFT adapts with fan_in_fan_out), and LoRA here adapts nn.Linear "
                                "layers only; run this adapter with PEFT")
            raise LoRAError(f"{path}: does not fit the base {_base_name(model, base)}: {_why_no_place(modules, name)} "
                            f"({where}); pass the base it was trained on")
    # Attention-only keys fit dense and MoE bases alike: the MiniMind file name still tells them apart.
    file_moe, base_moe = _moe_by_file_name(path, model), getattr(getattr(model, "config", None), "use_moe", None)
    if file_moe is not None and file_moe != bool(base_moe):
        what = ("the LoRA's name says MoE (MiniMind names it {name}_{hidden_size}_moe) and the base is dense"
                if file_moe else "the LoRA's name says dense (MiniMind adds _moe for an MoE base) and the base is MoE")
        raise LoRAError(f"{path}: does not fit the base {_base_name(model, base)}: {what}; pass the base it was "
                        "trained on (or rename the file if its name is wrong)")


def _same_as_base(saved: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a base tensor a PEFT file saved is `weight` itself: the same shape and values to within one step of
    the coarser of the two dtypes (the file may hold a float32 copy of a bf16 base, or an fp16 copy that rounds to
    bf16 a step away from the bf16 base)."""
    if saved.shape != weight.shape:
        return False
    coarse = torch.finfo(max(saved.dtype, weight.dtype, key=lambda d: torch.finfo(d).eps))
    return torch.allclose(saved.float(), weight.detach().to("cpu", torch.float32), rtol=coarse.eps,
                          atol=coarse.smallest_normal)


def _check_base_layers(model: nn.Module, where: Path, lora: _LoRAFile, base: str | None) -> None:
    """The whole layers PEFT saved with save_embedding_layers must be the base's own: then loading them changes
    nothing; a resized or trained embedding or head is another model, which does not load here."""
    modules = dict(model.named_modules())
    for name, (key, saved) in lora.base_layers.items():
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor):
            differs = f"the base {_base_name(model, base)} has no layer '{name}'"
        elif saved.shape != weight.shape:
            differs = f"its shape {list(saved.shape)} is not that of the base's '{name}' {list(weight.shape)}"
        elif not _same_as_base(saved, weight):
            differs = f"its values differ from the base's '{name}' (a trained or replaced layer)"
        else:
            continue
        raise LoRAError(f"{where}: key '{key}' is not a LoRA or DoRA tensor: {SAVED_LAYER}, and {differs}, which does "
                        f"not load here; pass the base it was saved from, or {MERGE_WITH_PEFT}")


def _read_fitting(model: nn.Module, path: Path, base: str | None) -> _LoRAFile:
    """The LoRA at `path` as _read_minimind / _read_peft return it, once every tensor is known to fit `model`."""
    if not path.exists():
        raise LoRAError(f"{path}: no such LoRA file or adapter directory")
    lora = _read_minimind(path) if path.suffix == ".pth" else _read_peft(path)
    adapters = lora.adapters
    where = path if path.suffix == ".pth" else path / PEFT_WEIGHTS
    check_lora_fits(model, path, {name: ad.key for name, ad in adapters.items()}, base)
    _check_coverage(model, path, set(adapters), base)
    modules = dict(model.named_modules())
    for name, ad in adapters.items():
        module = modules[name]
        rank = ad.A.shape[0]
        shapes = [(ad.key, ad.A.shape, (rank, module.in_features)),
                  (ad.B_key, ad.B.shape, (module.out_features, rank))]  # B's rank must be A's
        if ad.magnitude is not None:  # copy_ would broadcast a wrong-sized DoRA magnitude without a word
            shapes.append((f"{name}.lora_magnitude_vector", ad.magnitude.shape, (module.out_features,)))
        for key, got, wanted in shapes:
            if got != wanted:
                raise LoRAError(f"{where}: does not fit the base {_base_name(model, base)}: '{key}' has shape "
                                f"{list(got)}, the base's '{name}' ({module.in_features} -> {module.out_features}) "
                                f"needs {list(wanted)}; pass the base it was trained on")
        # PEFT saves an adapted lm_head's base weight too: it must be this model's, not a resized or retrained one
        if ad.base_copy is not None and not _same_as_base(ad.base_copy, module.weight):
            raise LoRAError(f"{where}: '{name}.base_layer.weight' differs from the model's '{name}' weight (a "
                            "resized vocabulary?); the adapter needs the base it was trained on")
    _check_base_layers(model, where, lora, base)
    return lora


def check_lora(model: nn.Module, path: str | os.PathLike, base: str | None = None) -> None:
    """Raise the LoRAError load_lora would raise for a file that does not fit `model`'s layers, leaving the model
    as it is: a script that runs the base alone first (eval_lora.py) says so before that slow work, not after."""
    _read_fitting(_unwrap(model), Path(path), base)


def load_lora(model: nn.Module, path: str | os.PathLike, base: str | None = None) -> list[str]:
    """Load a MiniMind `.pth` LoRA file or a PEFT adapter directory; return the adapted module names.

    A model without LoRA gets it on exactly the file's layers, with the file's ranks, alphas, rsLoRA and
    dropout. A model with LoRA must have it on the same layers with the same ranks; it keeps its own
    alpha, and B is rescaled so the output is the one the file describes. Every tensor must fit the base;
    errors name it as `base` (default: the path it was loaded from).
    """
    model, path = _unwrap(model), Path(path)
    adapters, use_rslora, dropout, use_dora, _ = _read_fitting(model, path, base)
    where = path if path.suffix == ".pth" else path / PEFT_WEIGHTS
    layers = _lora_layers(model)
    if not layers:
        _inject(model, {n: (ad.A.shape[0], ad.alpha) for n, ad in adapters.items()}, dropout, use_rslora, use_dora)
        layers = _lora_layers(model)
    for name, layer in layers.items():
        if name not in adapters:
            raise LoRAError(f"{where}: has no factors for the model's LoRA layer '{name}'")
        if adapters[name].A.shape[0] != layer.rank or layer.merged:
            raise LoRAError(f"{where}: key '{adapters[name].key}' has rank {adapters[name].A.shape[0]}, "
                            f"the model's LoRA layer has rank {layer.rank}{' and is merged' if layer.merged else ''}")
        if layer.use_dora != use_dora:
            raise LoRAError(f"{where}: the file is {'' if use_dora else 'not '}DoRA, the model's LoRA layer "
                            f"'{name}' is {'' if layer.use_dora else 'not '}DoRA")
    for name, ad in adapters.items():
        if name not in layers:
            raise LoRAError(f"{where}: key '{ad.key}' names '{name}', which has no LoRA in this model")
    with torch.no_grad():
        for name, ad in adapters.items():
            layer = layers[name]
            ratio = lora_scale(ad.A.shape[0], ad.alpha, use_rslora) / layer.scale
            layer.lora_A.copy_(ad.A)
            layer.lora_B.copy_(ad.B.to(torch.float64) * ratio if ratio != 1 else ad.B)
            if use_dora:
                layer.lora_magnitude_vector.copy_(ad.magnitude)
    return list(adapters)
