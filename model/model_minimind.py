"""MiniMind in plain PyTorch: both checkpoint generations (minimind2, minimind-3), dense and MoE.

Parameter names are MiniMind's own (`model.layers.N.self_attn.q_proj`, ...), so its `.pth` state dicts
load with no key remapping; `load_minimind` reads such a file and infers the architecture from its
tensor shapes. Importing this module registers the model with `AutoConfig` / `AutoModelForCausalLM`.

Attention masks follow the repo convention (DEVELOPERS.md): a 2-D `attention_mask` (1 = token, 0 = pad)
for padded batches, or no mask plus `position_ids` that restart at 0 for packed rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence  # noqa: UP035  (the forms torch 2.6 reads in a custom op signature)

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from model.errors import UserError, is_out_of_memory, unreadable_checkpoint
from model.hf_compat import CACHE_NAME
from model.varlen import PackedSegments, attend_segments, sample_starts


class ModelConfigError(UserError):
    """A model setting or checkpoint that does not fit: wrong size flags, missing or foreign file."""


# ----------------------------------------------------------------------------------------------------
# Config

# What the two checkpoint generations use when a field is left as None.
GENERATION_DEFAULTS = {
    2: dict(hidden_size=512, num_key_value_heads=2, rms_norm_eps=1e-5,
            num_experts_per_tok=2, n_shared_experts=1, aux_loss_coef=0.01),
    3: dict(hidden_size=768, num_key_value_heads=4, rms_norm_eps=1e-6,
            num_experts_per_tok=1, n_shared_experts=0, aux_loss_coef=5e-4),
}


def default_intermediate_size(hidden_size: int, generation: int) -> int:
    """MiniMind's MLP width: 8/3·hidden (minimind2) or π·hidden (minimind-3), rounded up to 64."""
    if generation == 2:
        return 64 * math.ceil(int(hidden_size * 8 / 3) / 64)
    return 64 * math.ceil(hidden_size * math.pi / 64)


class MiniMindConfig(PretrainedConfig):
    """MiniMind's architecture; `generation` (2 = minimind2, 3 = minimind-3) picks the defaults and q/k norm.

    `qk_norm`, `qkv_bias`, `o_bias`, `mlp_bias` and `rope_llama3` (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings) let the same decoder hold Qwen2/3, Llama and
    Mistral weights (model/fast_decoder.py).
    """

    model_type = "minimind"

    def __init__(
        self,
        generation: int = 3,
        vocab_size: int = 6400,
        hidden_size: int | None = None,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        intermediate_size: int | None = None,
        rms_norm_eps: float | None = None,
        rope_theta: float = 1e6,
        max_position_embeddings: int = 32768,
        use_moe: bool = False,
        num_experts: int = 4,
        num_experts_per_tok: int | None = None,
        n_shared_experts: int | None = None,
        norm_topk_prob: bool = True,
        aux_loss_coef: float | None = None,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        use_cache: bool = True,
        qk_norm: bool | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        mlp_bias: bool = False,
        rope_llama3: list[float] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if generation not in GENERATION_DEFAULTS:
            raise ModelConfigError(f"generation={generation!r}: MiniMind has generations 2 (minimind2) and 3 (minimind-3)")
        defaults = GENERATION_DEFAULTS[generation]

        def pick(value: object, name: str) -> object:
            return defaults[name] if value is None else value

        self.generation = generation
        self.vocab_size = vocab_size
        self.hidden_size = pick(hidden_size, "hidden_size")
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = pick(num_key_value_heads, "num_key_value_heads")
        if head_dim is None and self.hidden_size % num_attention_heads:
            raise ModelConfigError(f"hidden_size {self.hidden_size} is not divisible by "
                                   f"--num_attention_heads {num_attention_heads}")
        self.head_dim = head_dim or self.hidden_size // num_attention_heads
        if num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(f"--num_attention_heads {num_attention_heads} is not a multiple of "
                                   f"--num_key_value_heads {self.num_key_value_heads}")
        self.intermediate_size = intermediate_size or default_intermediate_size(self.hidden_size, generation)
        self.rms_norm_eps = pick(rms_norm_eps, "rms_norm_eps")
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.use_moe = bool(use_moe)
        self.num_experts = num_experts
        self.num_experts_per_tok = pick(num_experts_per_tok, "num_experts_per_tok")
        self.n_shared_experts = pick(n_shared_experts, "n_shared_experts")
        self.norm_topk_prob = norm_topk_prob
        self.aux_loss_coef = pick(aux_loss_coef, "aux_loss_coef")
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.use_cache = use_cache
        # Switches for the transformers layouts that share this decoder (model/fast_decoder.py); MiniMind
        # itself has q/k RMSNorm in minimind-3 only and no biases.
        self.qk_norm = generation == 3 if qk_norm is None else bool(qk_norm)
        self.qkv_bias, self.o_bias, self.mlp_bias = bool(qkv_bias), bool(o_bias), bool(mlp_bias)
        self.rope_llama3 = list(rope_llama3) if rope_llama3 else None


# ----------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """`weight * x / sqrt(mean(x²) + eps)`, normalised in fp32 so bf16 activations keep their precision."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last dimension."""
        if x.is_cuda and x.dtype == self.weight.dtype and not torch.compiler.is_compiling():
            # Eager on a GPU: torch's fused kernel, one launch each way instead of eight operators and their
            # autograd nodes (the uncompiled step is bound by the host). It also normalises in fp32; autocast
            # would run it in fp32 and return fp32, hence off. Compiled, Inductor fuses the plain form below.
            with torch.autocast("cuda", enabled=False):
                return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 llama3: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables `[B, T, head_dim]` for the given positions, in the rotate-half layout (`llama3`: see
    `llama3_inv_freq`)."""
    return _rope_tables(position_ids, head_dim, theta, dtype, llama3)


# A custom op, opaque to torch.compile: Inductor would otherwise inline cos/sin into every kernel that
# reads the tables (each layer's q and k norm+rope, forward and backward) and recompute them per head
# there, 4 ms of a 72 ms Qwen3-0.6B step (docs/PERF.md). Opaque, they are computed once per forward and
# read from memory, without the graph break that torch.compiler.disable would cost.
# (typing's Optional[Sequence], not `list | None`, in the op's signature: torch 2.6's schema inference reads only those.)
@torch.library.custom_op("minilora::rope_tables", mutates_args=())
def _rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                 llama3: Optional[Sequence[float]] = None) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: UP045
    return _rope_math(position_ids, head_dim, theta, dtype, llama3)


def _rope_math(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
               llama3: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # Computed per call from the positions (no cached table): packed rows and KV-cache steps need
    # arbitrary positions anyway, and there is no buffer to re-create after meta-device loading.
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if llama3:
        inv_freq = llama3_inv_freq(inv_freq, *llama3)
    angles = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_positions: float) -> torch.Tensor:
    """Llama 3.1's frequency rescaling: long wavelengths slowed by `factor`, short ones kept, a smooth
    blend between (the same float32 steps as transformers' `_compute_llama3_parameters`)."""
    low_freq_wavelen = original_max_positions / low_freq_factor
    high_freq_wavelen = original_max_positions / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


@_rope_tables.register_fake
def _rope_tables_shape(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                       llama3: Optional[Sequence[float]] = None) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: UP045
    shape = (*position_ids.shape, head_dim)
    return position_ids.new_empty(shape, dtype=dtype), position_ids.new_empty(shape, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, T, heads, head_dim]` by the positions encoded in `cos`/`sin` `[B, T, head_dim]`."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if x.is_cuda and x.requires_grad and not torch.compiler.is_compiling():
        return _Rope.apply(x, cos, sin)  # eager GPU training: one autograd node instead of seven
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x₁, x₂) -> (−x₂, x₁) over the two halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class _Rope(torch.autograd.Function):
    """apply_rope's math with a hand-written backward, for the eager GPU step (bound by the host, so the
    autograd nodes count). y = x·cos + R(x)·sin with R the half rotation, whose transpose is −R, so
    dx = g·cos − R(g·sin)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return torch.addcmul(x * cos, _rotate_half(x), sin)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        cos, sin = ctx.saved_tensors
        return grad * cos - _rotate_half(grad * sin), None, None


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """x through several linear layers that all read it (q/k/v, gate/up). Layers whose class can run them
    together do (`project_together`: LoRA layers in fused training make one GEMM of their stacked weights,
    model/model_lora.py); otherwise each runs on its own."""
    together = getattr(type(linears[0]), "project_together", None)
    if together is not None and all(type(m) is type(linears[0]) for m in linears):
        out = together(x, linears)
        if out is not None:
            return out
    return tuple(m(x) for m in linears)


class Attention(nn.Module):
    """Grouped-query self-attention through `F.scaled_dot_product_attention` (optional q/k RMSNorm)."""

    def __init__(self, config: MiniMindConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_bias)
        self.use_qk_norm = config.qk_norm
        if self.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: AttentionMask,
                is_causal: bool, past_key_values: Cache | None) -> torch.Tensor:
        """Attend over the current tokens (and the cached ones); `attn_mask` is boolean (True = may attend),
        or for packed rows the samples' boundaries (PackedSegments) or, compiled, a FlexAttention block mask."""
        bsz, seq_len, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(bsz, seq_len, self.num_heads, self.head_dim)
        k = k.view(bsz, seq_len, self.num_kv_heads, self.head_dim)
        v = v.view(bsz, seq_len, self.num_kv_heads, self.head_dim)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(attn_mask, PackedSegments):  # the rows as one sequence cut into samples: [B*T, heads, D]
            out = attend_segments(*(t.reshape(bsz * seq_len, t.shape[2], self.head_dim) for t in (q, k, v)),
                                  attn_mask)
            return self.o_proj(out.view(bsz, seq_len, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        # Without a mask, the fused SDPA kernels read the shared kv heads as they are (enable_gqa: 0.49 vs
        # 0.63 ms fwd+bwd per Qwen3-0.6B layer on an H100, docs/PERF.md). The masked (memory-efficient)
        # kernels do not take GQA and would silently fall back to the slow math path: repeat kv heads there.
        n_rep = self.num_heads // self.num_kv_heads
        if isinstance(attn_mask, BlockMask):  # reads the shared kv heads as they are, like enable_gqa
            out = flex_attention(q, k, v, block_mask=attn_mask, enable_gqa=n_rep > 1)
        else:
            gqa = n_rep > 1 and attn_mask is None
            if n_rep > 1 and not gqa:
                k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: `down_proj(silu(gate_proj(x)) * up_proj(x))`."""

    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to the last dimension."""
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class MoEFeedForward(nn.Module):
    """Softmax-routed top-k experts (+ shared experts in minimind2) with MiniMind's load-balancing loss."""

    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.generation = config.generation
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.aux_loss_coef = config.aux_loss_coef
        # minimind2 renormalises the top-k weights only when k > 1; minimind-3 always does (top-1 → weight 1).
        self.renormalise = config.norm_topk_prob and (self.top_k > 1 or config.generation == 3)
        # minimind2's gate is a bare `weight` parameter, minimind-3's an nn.Linear: both are `gate.weight`.
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.num_experts))
        if config.n_shared_experts > 0:
            self.shared_experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_shared_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the mixed expert output and this layer's aux loss (0 outside training)."""
        bsz, seq_len, hidden = x.shape
        flat = x.reshape(-1, hidden)
        scores = F.softmax(self.gate(flat), dim=-1)
        weights, chosen = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.renormalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        out = self._dispatch(flat, chosen, weights)
        for expert in getattr(self, "shared_experts", []):
            out = out + expert(flat)
        if self.training and self.aux_loss_coef > 0:
            aux = self._aux_loss(scores.view(bsz, seq_len, -1), chosen.view(bsz, seq_len, -1))
        else:
            aux = scores.new_zeros(())
        return out.view(bsz, seq_len, hidden), aux

    def _dispatch(self, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Run each expert once on the tokens routed to it and add the weighted results back in place."""
        picks = chosen.reshape(-1)                        # [N*k] expert of each (token, slot) pick
        order = picks.argsort(stable=True)                # group the picks by expert
        token_of = order // self.top_k                    # token index of each grouped pick
        counts = torch.bincount(picks, minlength=self.num_experts).tolist()  # one host sync per layer
        grouped = flat.index_select(0, token_of).split(counts)
        # Every expert runs, even on zero tokens, so all expert weights join the graph (DDP needs that).
        expert_out = torch.cat([expert(tokens) for expert, tokens in zip(self.experts, grouped)])
        expert_out = expert_out * weights.reshape(-1).index_select(0, order)[:, None]
        return torch.zeros_like(flat).index_add(0, token_of, expert_out.to(flat.dtype))

    def _aux_loss(self, scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """MiniMind's load-balancing loss; `scores` `[B, T, E]`, `chosen` `[B, T, k]`."""
        scores = scores.float()
        one_hot = F.one_hot(chosen, self.num_experts).float()          # [B, T, k, E]
        if self.generation == 2:
            # Per sequence: (share of its picks that went to e) · E, times its mean score for e.
            share = one_hot.sum(dim=(1, 2)) / (chosen.shape[1] * self.top_k) * self.num_experts
            return self.aux_loss_coef * (share * scores.mean(dim=1)).sum(dim=1).mean()
        # Over the whole batch: fraction of tokens that picked e, times the mean score for e.
        load = one_hot.sum(dim=(0, 1, 2)) / (chosen.shape[0] * chosen.shape[1])
        return self.aux_loss_coef * self.num_experts * (load * scores.mean(dim=(0, 1))).sum()


class MiniMindBlock(nn.Module):
    """Pre-norm decoder layer: `h = x + attn(norm(x))`, `out = h + mlp(norm(h))`."""

    def __init__(self, config: MiniMindConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: AttentionMask,
                is_causal: bool, past_key_values: Cache | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the layer output and its MoE aux loss (None for a dense layer)."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, is_causal, past_key_values)
        if isinstance(self.mlp, MoEFeedForward):
            mlp_out, aux = self.mlp(self.post_attention_layernorm(h))
            return h + mlp_out, aux
        return h + self.mlp(self.post_attention_layernorm(h)), None


# Keyword arguments transformers' `generate` may pass that carry nothing this model needs: positions come
# from the cache length, and outputs are always a dataclass.
IGNORED_GENERATION_KWARGS = {"return_dict", "cache_position"}
# Accepted only when false: this model returns neither per-layer attentions nor hidden states.
UNSUPPORTED_OUTPUTS = {"output_attentions", "output_hidden_states"}


def check_generation_kwargs(kwargs: dict) -> None:
    """Refuse keyword arguments the forward would otherwise drop without a word."""
    unknown = sorted(set(kwargs) - IGNORED_GENERATION_KWARGS - UNSUPPORTED_OUTPUTS)
    if unknown:
        raise TypeError(f"MiniMind forward got unexpected keyword arguments {unknown}; it takes input_ids, "
                        "attention_mask, position_ids, cache (or past_key_values), use_cache, inputs_embeds, "
                        f"labels, logits_to_keep and ignores {sorted(IGNORED_GENERATION_KWARGS)}")
    asked = sorted(name for name in UNSUPPORTED_OUTPUTS if kwargs.get(name))
    if asked:
        raise ValueError(f"MiniMind does not return {asked}; pass them as False (the default)")


def one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache given under either name (transformers renamed `past_key_values` to `cache`)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


AttentionMask = torch.Tensor | BlockMask | PackedSegments | None


def build_attention_mask(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                         seq_len: int, past_len: int, device: torch.device,
                         flex: bool = False) -> tuple[AttentionMask, bool]:
    """Return `(attn_mask, is_causal)` for SDPA: a bool mask `[B|1, 1, T, past+T]`, or None with `is_causal`.

    With `flex`, packed rows get a FlexAttention block mask instead of the dense one (see `MiniMindModel`).
    """
    q_pos = torch.arange(past_len, past_len + seq_len, device=device)
    k_pos = torch.arange(past_len + seq_len, device=device)
    causal = k_pos[None, :] <= q_pos[:, None]                           # [T, K]
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != past_len + seq_len:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected 2-D "
                             f"[batch, {past_len + seq_len}] (cached + new tokens, 1 = token, 0 = pad)")
        allowed = causal[None] & attention_mask[:, None, :].bool()
        # Every query may always see itself, so a query row is never fully masked (that gives NaN);
        # this only changes outputs at pad positions, which are ignored anyway.
        allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None]
        return allowed[:, None], False
    if past_len == 0 and position_ids is not None:
        # Packed rows: attention stays inside each sample (numbered along each row).
        sample = sample_starts(position_ids).cumsum(dim=-1)   # [B, T]
        if flex:
            return document_block_mask(sample), False
        same_sample = sample[:, :, None] == sample[:, None, :]
        return (same_sample & causal[None])[:, None], False
    if past_len == 0:
        return None, True
    if seq_len == 1:
        return None, False                                                # one new token sees the whole cache
    return causal[None, None], False


def document_block_mask(sample: torch.Tensor) -> BlockMask:
    """The packed-row mask (causal, inside each sample; `sample` `[B, T]` numbers the samples of each row)
    as a FlexAttention block mask: the kernel skips the 128 × 128 tiles that lie wholly outside it."""

    def same_sample_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (sample[b, q] == sample[b, kv]) & (kv <= q)

    bsz, seq_len = sample.shape
    return create_block_mask(same_sample_causal, bsz, None, seq_len, seq_len, device=sample.device)


# ----------------------------------------------------------------------------------------------------
# Models


@dataclass
class MiniMindModelOutput(BaseModelOutputWithPast):
    """Hidden states of the decoder stack plus the summed MoE load-balancing loss (0-d tensor)."""

    aux_loss: torch.Tensor | None = None


@dataclass
class MiniMindCausalLMOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output plus MiniMind's MoE aux loss (already included in `loss`)."""

    aux_loss: torch.Tensor | None = None


class MiniMindPreTrainedModel(PreTrainedModel):
    """Ties MiniMind into transformers' loading, saving and weight initialisation."""

    config_class = MiniMindConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniMindBlock"]
    _supports_sdpa = True


class MiniMindModel(nn.Module):
    """Embedding, decoder layers and final norm; `forward` returns hidden states and `.aux_loss`."""

    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MiniMindBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # transformers' gradient_checkpointing_enable() sets this flag; so can a trainer, directly.
        self.gradient_checkpointing = False
        # How packed rows attend in a compiled decoder (whole, or layer by layer in training): "sdpa" with a dense
        # block-diagonal mask, or "flex": FlexAttention with a block mask, which skips the masked tiles and keeps
        # GQA (docs/PERF.md). Layer by layer, the mask is built here, in the eager part, once per forward (the
        # trainer records it in the micro-step's CUDA graph). Uncompiled, Flex would materialise the whole score
        # matrix (and it has no backward on CPU), so eager forwards and evaluation keep SDPA either way.
        self.packed_attention = "sdpa"
        # Set by trainer.compiling.compile_decoder when each layer is compiled on its own: the first layer's input
        # then needs a gradient too, as every other layer's does, so that all layers share one compiled graph.
        self.layers_share_graph = False

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool | None = None, inputs_embeds: torch.Tensor | None = None,
                cache: Cache | None = None, cu_seqlens: torch.Tensor | None = None, **kwargs) -> MiniMindModelOutput:
        """Run the decoder; see `build_attention_mask` for how padding and packing are read.

        `cu_seqlens` (packed rows, no mask, no cache): where the rows' samples start (`model.varlen`); attention
        then runs within each sample through Flash attention's varlen kernel (on CUDA), `position_ids` still
        give the positions. The KV cache comes as `cache` (transformers >= 5.2x) or `past_key_values`
        (older); other keyword arguments are checked by `check_generation_kwargs`.
        """
        check_generation_kwargs(kwargs)
        past_key_values = one_cache(cache, past_key_values)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        bsz, seq_len, _ = x.shape
        # A cache only when one is passed in or asked for (generate does both): a training forward
        # should not build one, whatever config.use_cache says.
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if cu_seqlens is not None and (attention_mask is not None or past_len):
            raise ValueError("cu_seqlens marks the samples of packed rows: pass it without attention_mask and cache")
        if cu_seqlens is not None:
            attn_mask, is_causal = PackedSegments(cu_seqlens, seq_len), False
        else:
            compiled = torch.compiler.is_compiling() or (self.layers_share_graph and self.training)
            flex = self.packed_attention == "flex" and compiled
            attn_mask, is_causal = build_attention_mask(attention_mask, position_ids, seq_len, past_len, x.device,
                                                        flex)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=x.device)[None]
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype,
                                self.config.rope_llama3)

        aux_loss = x.new_zeros((), dtype=torch.float32)
        checkpointing = self.gradient_checkpointing and self.training and past_key_values is None
        if self.layers_share_graph and torch.is_grad_enabled() and not x.requires_grad:
            # The frozen embedding's output needs no gradient, which would give the first layer a compiled graph
            # of its own (a second compile); its gradient costs a few small GEMMs per step.
            x = x.detach().requires_grad_()
        for layer in self.layers:
            if checkpointing:
                x, aux = checkpoint(layer, x, cos, sin, attn_mask, is_causal, None, use_reentrant=False)
            else:
                x, aux = layer(x, cos, sin, attn_mask, is_causal, past_key_values)
            if aux is not None:
                aux_loss = aux_loss + aux
        return MiniMindModelOutput(last_hidden_state=self.norm(x), aux_loss=aux_loss,
                                   **{CACHE_NAME: past_key_values})


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    """MiniMind with its (tied) language-model head; `labels` give the shifted mean CE + MoE aux loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig) -> None:
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, inputs_embeds: torch.Tensor | None = None,
                cache: Cache | None = None, **kwargs) -> MiniMindCausalLMOutput:
        """Logits (only the last `logits_to_keep` positions when > 0) and, with `labels`, the loss."""
        check_generation_kwargs(kwargs)
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=one_cache(cache, past_key_values), use_cache=use_cache,
                         inputs_embeds=inputs_embeds)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            loss = F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100) + out.aux_loss
        return MiniMindCausalLMOutput(loss=loss, logits=logits, aux_loss=out.aux_loss,
                                      **{CACHE_NAME: getattr(out, CACHE_NAME)})


AutoConfig.register("minimind", MiniMindConfig, exist_ok=True)
AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM, exist_ok=True)


# ----------------------------------------------------------------------------------------------------
# Loading MiniMind's own .pth files


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a MiniMind `.pth` lazily (mmap) and give it plain `model.` / `lm_head` keys, both tied keys present."""
    if not path.is_file():
        raise ModelConfigError(f"{path}: no such file; pass the MiniMind weights file (e.g. full_sft_768.pth)")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            # Files written with the legacy (non-zip) torch.save format cannot be memory-mapped.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code, a truncated download, not a torch file at all
        if is_out_of_memory(err):  # not a damaged file: say so (run_job), keep it
            raise
        raise ModelConfigError(f"{path}: cannot be read as a PyTorch state dict: {unreadable_checkpoint(path, err)}"
                               ) from None
    if not isinstance(state, dict):
        raise ModelConfigError(f"{path}: holds a {type(state).__name__}, not a state dict of MiniMind weights")
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]                     # MiniMind's resume checkpoints nest the weights
    cleaned = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):  # DDP and torch.compile wrappers, any order
            key = key.split(".", 1)[1]
        cleaned[key] = value
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    if embed not in cleaned and head not in cleaned:
        raise ModelConfigError(f"{path}: holds no {embed}; it is not a MiniMind model state dict "
                               "(a LoRA-only file loads on top of a base model with load_lora)")
    cleaned.setdefault(embed, cleaned.get(head))
    cleaned.setdefault(head, cleaned[embed])
    if cleaned[head] is not cleaned[embed] and not torch.equal(cleaned[head], cleaned[embed]):
        raise ModelConfigError(f"{path}: lm_head.weight differs from model.embed_tokens.weight; MiniMind "
                               "ties them and this model cannot represent an untied head")
    return cleaned


def _infer_architecture(state: dict[str, torch.Tensor], path: Path, overrides: dict) -> dict:
    """Read the architecture off the tensor shapes; raise if an override contradicts the file."""
    generation = 3 if any(k.endswith("self_attn.q_norm.weight") for k in state) else 2
    vocab_size, hidden_size = state["model.embed_tokens.weight"].shape
    layer_ids = {int(k.split(".")[2]) for k in state if k.startswith("model.layers.")}
    use_moe = "model.layers.0.mlp.gate.weight" in state
    mlp = "model.layers.0.mlp.experts.0." if use_moe else "model.layers.0.mlp."
    attn = "model.layers.0.self_attn."
    try:
        q_out = state[attn + "q_proj.weight"].shape[0]
        kv_out = state[attn + "k_proj.weight"].shape[0]
        intermediate_size = state[mlp + "gate_proj.weight"].shape[0]
    except KeyError as err:
        raise ModelConfigError(f"{path}: has no {err.args[0]}; it is not a MiniMind model state dict") from err
    if generation == 3:
        head_dim = state[attn + "q_norm.weight"].shape[0]   # minimind-3 may set head_dim freely
        num_heads = q_out // head_dim
    else:
        num_heads = overrides.get("num_attention_heads", 8)  # minimind2 files cannot tell; 8 in all releases
        if hidden_size % num_heads:
            raise ModelConfigError(f"{path}: hidden size {hidden_size} is not divisible by "
                                   f"--num_attention_heads {num_heads}")
        head_dim = hidden_size // num_heads
    if kv_out % head_dim:
        raise ModelConfigError(f"{path}: k_proj has {kv_out} outputs, not a multiple of head_dim {head_dim}; "
                               "fix --num_attention_heads")
    found = dict(generation=generation, vocab_size=vocab_size, hidden_size=hidden_size,
                 num_hidden_layers=max(layer_ids) + 1 if layer_ids else 0, num_attention_heads=num_heads,
                 num_key_value_heads=kv_out // head_dim, head_dim=head_dim,
                 intermediate_size=intermediate_size, use_moe=use_moe)
    if use_moe:
        found["num_experts"] = state["model.layers.0.mlp.gate.weight"].shape[0]
        shared = {k.split(".")[5] for k in state if k.startswith("model.layers.0.mlp.shared_experts.")}
        found["n_shared_experts"] = len(shared)
    for key, value in found.items():
        if key in overrides and type(value)(overrides[key]) != value:
            raise ModelConfigError(f"{path} holds {key}={value}, but {key}={overrides[key]} was asked for; "
                                   f"pass --{key} {int(value)} (or the checkpoint that matches your flags)")
    return found


def load_minimind(path: str | Path, dtype: torch.dtype | None = None, **overrides) -> MiniMindForCausalLM:
    """Build the model that a MiniMind `.pth` file describes and load it strictly (eval mode, tied head).

    Sizes come from the tensor shapes; `overrides` set what the file cannot tell (e.g.
    `num_experts_per_tok`, `num_attention_heads` for minimind2) and must agree with what it can.
    `dtype=None` keeps the file's dtype.
    """
    path = Path(path)
    state = _read_state_dict(path)
    config = MiniMindConfig(**{**overrides, **_infer_architecture(state, path, overrides)})
    with torch.device("meta"):                     # no throw-away random init; weights come from the file
        model = MiniMindForCausalLM(config)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ModelConfigError(f"{path}: does not match the MiniMind architecture read from it; "
                               f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.lm_head.weight = model.model.embed_tokens.weight   # assign=True loaded two separate tensors
    if dtype is not None:
        model.to(dtype)
    return model.eval()
